"""Tests for semppl_jax.checkpointing.unpickler: what the allow-list unpickler reads and refuses."""
import collections
import os
import pickle
import re
import subprocess
import tracemalloc
import typing

import dill
import jax
import numpy as np
import pytest
from checkpointing_testlib import assert_tree_equal, fake_module_globals, load_bytes, release_dict
from haiku._src import data_structures  # pylint: disable=g-direct-haiku-import

from experiments import hostile_files
from semppl_jax import checkpointing as ck
from semppl_jax.checkpointing import unpickler


def test_dill_create_array_and_namedtuple_state_load(tmp_path, r50, forward):
  params, state = r50

  class ExperimentState(typing.NamedTuple):  # like BYOL's _ByolExperimentState
    online_params: dict
    target_params: dict
    online_state: dict
    opt_state: typing.Any

  release = release_dict(params, state)
  release["experiment_state"] = ExperimentState(params, params, state, None)
  data = dill.dumps(release, protocol=2)
  assert b"dill._dill\n_create_array" in data and b"_create_namedtuple" in data
  assert b"__builtin__\nsetattr" in data  # dill fixes the local class's __qualname__
  loaded = load_bytes(tmp_path, data)
  assert_tree_equal(loaded.params, params)
  assert_tree_equal(loaded.state, state)
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))


def test_heads_flatmapping_and_jax_array_reconstructors(tmp_path, r50, heads, forward):
  params, state = r50
  flat = data_structures.FlatMap
  release = release_dict(flat({**params, **heads[0]}), flat({**state, **heads[1]}))
  release["rng"] = jax.random.key_data(jax.random.key(3))  # jax>=0.4 _reconstruct_array
  data = pickle.dumps(release, protocol=2)
  assert b"haiku._src.data_structures\nFlatMapping" in data
  assert b"jax._src.array\n_reconstruct_array" in data
  loaded = load_bytes(tmp_path, data)
  assert_tree_equal(loaded.params, params)
  assert_tree_equal(loaded.state, state)
  assert_tree_equal(loaded.head_params, heads[0])
  assert_tree_equal(loaded.head_state, heads[1])
  np.testing.assert_array_equal(loaded.rng, np.asarray(jax.random.key_data(jax.random.key(3))))
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))


def test_jax03_device_array_pickles_load(tmp_path):
  """jax 0.3 pickled DeviceArrays as reconstruct_device_array(fun, args, state, aval_state)."""
  def reconstruct_device_array(fun, args, arr_state, aval_state):
    raise AssertionError("the loader must not call the pickled function")

  class OldDeviceArray:
    def __init__(self, value):
      self.value = value

    def __reduce__(self):
      fun, args, arr_state = self.value.__reduce__()
      aval = {"weak_type": False, "named_shape": {}}
      return reconstruct_device_array, (fun, args, arr_state, aval)

  w = np.random.RandomState(0).normal(size=(3, 3, 3, 16)).astype(np.float32)
  c = np.asarray(5, np.int32)
  bn = "res_net18/~/initial_batchnorm/~/mean_ema"
  tree = release_dict({"res_net18/~/initial_conv": {"w": OldDeviceArray(w[None])}},
                  {bn: {"counter": OldDeviceArray(c[None])}})
  tree["rng"] = OldDeviceArray(np.arange(4, dtype=np.uint32).reshape(2, 2))
  with fake_module_globals("jax._src.device_array",
                            reconstruct_device_array=reconstruct_device_array):
    data = pickle.dumps(tree, protocol=2)
  assert b"jax._src.device_array\nreconstruct_device_array" in data
  loaded = load_bytes(tmp_path, data)
  assert loaded.replica_axis_stripped
  np.testing.assert_array_equal(loaded.params["res_net18/~/initial_conv"]["w"], w)
  assert loaded.state["res_net18/~/initial_batchnorm/~/mean_ema"]["counter"].shape == ()
  np.testing.assert_array_equal(loaded.rng, np.arange(4).reshape(2, 2))
  assert loaded.architecture == "resnet18" and loaded.width_multiplier is None


class _Evil:
  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _evil_objects(marker):
  """name -> (object whose unpickling creates ``marker``, pickle protocol, name rewrite)."""
  touch = f"open({str(marker)!r}, 'w').close()"
  as_os = (b"cposix\nsystem\n", b"cos\nsystem\n")  # write the `os.system` spelling
  return {
      "posix.system": (_Evil(os.system, f"touch {marker}"), 2, None),
      "os.system": (_Evil(os.system, f"touch {marker}"), 2, as_os),
      "__builtin__.eval": (_Evil(eval, touch), 2, None),
      "builtins.eval": (_Evil(eval, touch), 4, None),
      "__builtin__.exec": (_Evil(exec, touch), 2, None),
      "subprocess.Popen": (_Evil(subprocess.Popen, ["touch", str(marker)]), 2, None),
      "subprocess.check_output": (_Evil(subprocess.check_output, ["touch", str(marker)]), 2,
                                  None),
  }


def _dumps(obj, protocol, rewrite):
  data = pickle.dumps(obj, protocol=protocol)
  if rewrite:
    assert rewrite[0] in data
    data = data.replace(*rewrite)
  return data


def test_evil_payloads_are_real(tmp_path):
  """Positive control: a plain pickle.loads of each payload does create the marker file."""
  marker = tmp_path / "pwned"
  for name, (obj, protocol, rewrite) in _evil_objects(marker).items():
    result = pickle.loads(_dumps(obj, protocol, rewrite))
    if isinstance(result, subprocess.Popen):
      result.wait()
    assert marker.exists(), name
    marker.unlink()


def test_unsafe_pickles_are_refused_without_side_effect(tmp_path):
  marker = tmp_path / "pwned"
  params = {"res_net50/~/initial_conv": {"w": np.ones((7, 7, 3, 64), np.float32)}}
  state = {"res_net50/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(1, np.int32)}}
  for name, (obj, protocol, rewrite) in _evil_objects(marker).items():
    # Alone, and hidden after the valid entries of a release dict.
    for payload in (obj, release_dict(params, state, extra=obj)):
      with pytest.raises(ck.CheckpointError, match="refusing") as err:
        load_bytes(tmp_path, _dumps(payload, protocol, rewrite))
      assert name in str(err.value), (name, str(err.value))
      assert not marker.exists(), name
  for name, blob in (
      ("__builtin__.getattr", pickle.dumps(_Evil(getattr, 1, "real"), protocol=2)),
      ("__builtin__.__import__", pickle.dumps(_Evil(__import__, "os"), protocol=2)),
      ("copy_reg._reconstructor", b"\x80\x02ccopy_reg\n_reconstructor\n."),
      ("dill._dill._create_function", dill.dumps(lambda: 0, protocol=2)),
      ("dill._dill._load_type('CodeType')",
       pickle.dumps(_Evil(dill._dill._load_type, "CodeType"), protocol=2)),
      ("field or type name 'a b'",
       pickle.dumps(_Evil(dill._dill._create_namedtuple, "X", ("a b",), "os"), protocol=2)),
      ("BUILD", pickle.dumps(collections.OrderedDict(), protocol=2)[:-1] + b"}b.")):
    with pytest.raises(ck.CheckpointError, match=re.escape(name)):
      load_bytes(tmp_path, blob)


def test_build_on_allowed_callable_is_refused(tmp_path):
  # GLOBAL numpy.dtype, {'a': 1}, BUILD: would set an attribute on the loader's dtype function.
  blob = b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00aK\x01sb."
  with pytest.raises(ck.CheckpointError, match="BUILD"):
    load_bytes(tmp_path, blob)
  assert not hasattr(ck.ALLOWED_GLOBALS[("numpy", "dtype")], "a")
  # numpy.dtype with a flexible / object spec is refused (its state could set object flags).
  for spec in (b"V8", b"O8"):
    blob = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00" + spec + b"\x89\x88\x87R."
    with pytest.raises(ck.CheckpointError, match="numpy.dtype"):
      load_bytes(tmp_path, blob)


def test_malformed_files_raise_checkpoint_error(tmp_path):
  good_params = {"res_net50/~/initial_conv": {"w": np.ones((7, 7, 3, 64), np.float32)}}
  good_state = {"res_net50/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(1, np.int32)}}
  good = pickle.dumps(release_dict(good_params, good_state), protocol=2)
  cases = {
      "truncated": (good[: len(good) // 2], "truncated"),
      "empty": (b"", "empty"),
      "garbage": (np.random.RandomState(0).bytes(300), "not a valid pickle|truncated"),
      "text": (b"definitely not a pickle\n", "not a valid pickle|truncated"),
      "trailing": (good + b"xyz", "trailing"),
      "list top level": (pickle.dumps([1, 2], protocol=2), "top level is list"),
      "no experiment_state": (pickle.dumps({"step": 1}, protocol=2),
                              r"keys \['step'\].*expected 'experiment_state'"),
      "no online_params": (pickle.dumps({"experiment_state": {"online_state": {}}}, protocol=2),
                           r"missing \['online_params'\]"),
      "experiment_state not mapping": (pickle.dumps({"experiment_state": [1]}, protocol=2),
                                       "experiment_state is list"),
      "string leaf": (pickle.dumps(release_dict({"res_net50/~/c": {"w": "x"}}, {}), protocol=2),
                      "expected a numeric array, found str"),
      "flat params": (pickle.dumps(release_dict({"w": np.ones(3)}, {}), protocol=2),
                      "expected .module_name"),
  }
  for name, (blob, message) in cases.items():
    with pytest.raises(ck.CheckpointError, match=message):
      load_bytes(tmp_path, blob)
  with pytest.raises(ck.CheckpointError, match="does not exist"):
    ck.load_released_checkpoint(tmp_path / "missing.pkl")
  with pytest.raises(ck.CheckpointError, match="directory"):
    ck.load_released_checkpoint(tmp_path)
  assert issubclass(ck.CheckpointError, ValueError)



def test_other_pickle_protocols_load(tmp_path):
  w = np.arange(432, dtype=np.float32).reshape(3, 3, 3, 16)
  params = {"res_net18/~/initial_conv": {"w": w}}
  state = {"res_net18/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(2, np.int32)}}
  for protocol in (0, 3, 4, 5):
    loaded = load_bytes(tmp_path, pickle.dumps(release_dict(params, state), protocol=protocol))
    assert_tree_equal(loaded.params, params)
    assert_tree_equal(loaded.state, state)



# ----------------------------------------------------------------------------------------------
# Hostile files: resource limits.
# ----------------------------------------------------------------------------------------------


# Files of a few MB at most; every size stays far beyond the loader's limits.
_HOSTILE = hostile_files.corpus(scale=0.2)


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_hostile_files_are_refused_with_little_memory(tmp_path, name):
  path = tmp_path / "hostile.pkl"
  path.write_bytes(_HOSTILE[name])
  tracemalloc.start()
  try:
    with pytest.raises(ck.CheckpointError) as err:
      ck.load_released_checkpoint(path)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # The biggest file holds a 10 MB string, read once and decoded once.
  assert peak < 100e6, (name, peak)
  message = str(err.value)
  assert len(message) < 1_000, (name, len(message))
  assert message.isprintable(), (name, message)


def test_hostile_refusals_name_the_reason(tmp_path):
  cases = {
      hostile_files.bytearray_declared(6 << 30): r"BYTEARRAY8 declares 6,442,450,944 bytes "
                                                 r"but only 1 are left",
      hostile_files.deep_tuple_key(1_000_000): "nesting deeper than 100 levels",
      hostile_files.deep_tuple_key(101): "nesting deeper than 100 levels",
      hostile_files.deep_lists(2_000): "nesting deeper than 100 levels",
      hostile_files.deep_dicts(2_000): "nesting deeper than 100 levels",
      hostile_files.many_marks(2_000): r"nesting deeper than 100 levels \(MARKs\)",
      hostile_files.wide_int_key(4_000): r"LONG4 declaring 4,000 bytes \(at most 16\)",
      hostile_files.long4_declared(2**31 - 1): r"LONG4 declaring 2,147,483,647 bytes",
      hostile_files.binunicode8_declared(1 << 62): "BINUNICODE8 declares",
      hostile_files.binbytes8_declared(1 << 62): "BINBYTES8 declares",
      hostile_files.frame_declared(1 << 62): "FRAME declares",
      hostile_files.namedtuple_fields(5_000): r"5,000 fields \(at most 1000",
      hostile_files.namedtuple_fields(1_000_000): r"stack with 100,001 items",
      hostile_files.wide_list(200_000): r"101,000 items \(at most 100,000\)",
      hostile_files.memo_flood(300_000): "more than 250,000 memoized objects",
      hostile_files.self_containing_list(): "container holding itself",
  }
  for blob, message in cases.items():
    with pytest.raises(ck.CheckpointError, match=message):
      load_bytes(tmp_path, blob)


def test_hostile_text_is_clipped_and_escaped(tmp_path):
  with pytest.raises(ck.CheckpointError) as err:
    load_bytes(tmp_path, hostile_files.control_characters_in_global())
  assert "\x1b" not in str(err.value) and "\x07" not in str(err.value)
  assert r"os\x1b[31m.system\x07" in str(err.value)
  with pytest.raises(ck.CheckpointError, match=r"2Ja{76}\.\.\. \(1,000,004 characters\)") as err:
    load_bytes(tmp_path, hostile_files.huge_module_name(1_000_000))
  assert r"\x1b[2J" in str(err.value) and "\x1b" not in str(err.value)
  with pytest.raises(ck.CheckpointError, match=r"\(2,000,000 characters\)'\], expected"):
    load_bytes(tmp_path, hostile_files.huge_key(2_000_000))


def test_limits_just_above_a_real_release_load(tmp_path):
  """Depth 100, 100,000 items and 16-byte ints are allowed: the limits are strict, not sloppy."""
  deep = (0,)
  for _ in range(90):
    deep = (deep,)
  blob = pickle.dumps({deep: list(range(100_000)), "big": 2**120, "neg": -2**120}, protocol=2)
  path = tmp_path / "ok.pkl"
  path.write_bytes(blob)
  loaded = unpickler.unpickle_file(str(path))
  assert loaded[deep] == list(range(100_000)) and loaded["big"] == 2**120
  assert loaded["neg"] == -2**120
  # The same file under tighter limits is refused.
  for limits, message in ((unpickler.LoadLimits(max_depth=50), "nesting deeper than 50"),
                          (unpickler.LoadLimits(max_items=1_000), "at most 1,000"),
                          (unpickler.LoadLimits(max_int_bytes=8), "wider than 8 bytes"),
                          (unpickler.LoadLimits(max_objects=50), "more than 50")):
    with pytest.raises(ck.CheckpointError, match=message):
      unpickler.unpickle_file(str(path), limits)
