"""Tests for semppl_jax.checkpointing: safe release reader, verifier, exporter, Orbax."""
import collections
import contextlib
import os
import pickle
import re
import subprocess
import sys
import types
import typing
import warnings

import dill
import haiku as hk
from haiku._src import data_structures  # pylint: disable=g-direct-haiku-import
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semppl_jax import checkpointing as ck
from semppl_jax import networks

# ----------------------------------------------------------------------------------------------
# Fixtures: a random ResNet-50 tree with the release names, heads, and a jitted forward.
# ----------------------------------------------------------------------------------------------


def _random_tree(shapes, rng):
  """Random leaves for a {module: {name: ShapeDtypeStruct}} tree (finite ResNet activations)."""
  def leaf(module, name, sd):
    shape = sd.shape
    if name == "w":
      return (rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    if name == "counter":
      return np.asarray(rng.randint(1, 1000), np.int32)
    if module.endswith("var_ema"):
      return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    return (0.1 * rng.normal(size=shape)).astype(np.float32)
  return {m: {n: leaf(m, n, sd) for n, sd in leaves.items()} for m, leaves in shapes.items()}


@pytest.fixture(scope="module")
def r50():
  """(params, state) of ResNet-50 1x with random values, as plain numpy dicts."""
  shapes_p, shapes_s = ck.expected_tree("resnet50")
  rng = np.random.RandomState(0)
  return _random_tree(shapes_p, rng), _random_tree(shapes_s, rng)


@pytest.fixture(scope="module")
def heads():
  """Projector / predictor / classifier entries as the release's BYOL-style heads."""
  rng = np.random.RandomState(1)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  params, state = {}, {}
  for head in ("projector", "predictor"):
    d_in = 2048 if head == "projector" else 16
    params[f"{head}/linear"] = {"w": f(d_in, 32), "b": f(32)}
    params[f"{head}/batch_norm"] = {"scale": f(1, 32), "offset": f(1, 32)}
    params[f"{head}/linear_1"] = {"w": f(32, 16)}
    for ema in ("mean_ema", "var_ema"):
      state[f"{head}/batch_norm/~/{ema}"] = {"counter": np.asarray(3, np.int32),
                                             "hidden": f(1, 32), "average": f(1, 32)}
  params["classifier"] = {"w": f(2048, 10), "b": f(10)}
  return params, state


@pytest.fixture(scope="module")
def forward():
  """Jitted ResNet-50 inference forward on a fixed [2, 32, 32, 3] batch (one compilation)."""
  model = hk.transform_with_state(lambda x: networks.ResNet50()(x, is_training=False))
  apply = jax.jit(model.apply)
  images = np.random.RandomState(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  return lambda params, state: np.asarray(apply(params, state, None, images)[0])


def _release(params, state, **extra):
  experiment_state = {"online_params": params, "online_state": state}
  return {"experiment_state": experiment_state, "step": 1234,
          "rng": np.arange(16, dtype=np.uint32).reshape(8, 2), **extra}


def _load_bytes(tmp_path, data, name="ckpt.pkl", **kwargs):
  """Writes ``data`` to a file, loads it with load_released_checkpoint_full, deletes it."""
  path = tmp_path / name
  path.write_bytes(data)
  try:
    return ck.load_released_checkpoint_full(path, **kwargs)
  finally:
    path.unlink()


def _assert_tree_equal(got, want):
  assert sorted(got) == sorted(want)
  for module in want:
    assert sorted(got[module]) == sorted(want[module]), module
    for name, value in want[module].items():
      g = got[module][name]
      assert isinstance(g, np.ndarray), (module, name, type(g))
      assert g.dtype == value.dtype and g.shape == value.shape, (module, name)
      np.testing.assert_array_equal(g, value, err_msg=f"{module}/{name}")


@contextlib.contextmanager
def _fake_module_globals(module_name, **objects):
  """Makes ``module_name.<name>`` importable while pickling, to write an old library's names."""
  module = types.ModuleType(module_name)
  for name, obj in objects.items():
    obj.__module__ = module_name
    obj.__qualname__ = name
    setattr(module, name, obj)
  sys.modules[module_name] = module
  try:
    yield
  finally:
    del sys.modules[module_name]


# ----------------------------------------------------------------------------------------------
# Release formats.
# ----------------------------------------------------------------------------------------------


def test_plain_pickle_numpy2_and_numpy1_names_load_and_forward_matches(tmp_path, r50, forward):
  params, state = r50
  data = pickle.dumps(_release(params, state), protocol=2)
  assert b"numpy._core.multiarray\n_reconstruct" in data
  data_np1 = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy._core" not in data_np1 and b"numpy.core.multiarray\n_reconstruct" in data_np1
  reference = forward(params, state)
  assert np.isfinite(reference).all() and np.std(reference) > 0
  for blob in (data, data_np1):
    loaded = _load_bytes(tmp_path, blob)
    _assert_tree_equal(loaded.params, params)
    _assert_tree_equal(loaded.state, state)
    assert loaded.head_params == {} and loaded.head_state == {}
    assert loaded.step == 1234 and not loaded.replica_axis_stripped
    np.testing.assert_array_equal(loaded.rng, np.arange(16).reshape(8, 2))
    assert (loaded.architecture, loaded.width_multiplier) == ("resnet50", 1)
    assert loaded.encoder_prefix == "res_net50"
    np.testing.assert_array_equal(forward(loaded.params, loaded.state), reference)
  assert len(params) == 106 and sum(len(v) for v in params.values()) == 159


def test_dill_create_array_and_namedtuple_state_load(tmp_path, r50, forward):
  params, state = r50

  class ExperimentState(typing.NamedTuple):  # like BYOL's _ByolExperimentState
    online_params: dict
    target_params: dict
    online_state: dict
    opt_state: typing.Any

  release = _release(params, state)
  release["experiment_state"] = ExperimentState(params, params, state, None)
  data = dill.dumps(release, protocol=2)
  assert b"dill._dill\n_create_array" in data and b"_create_namedtuple" in data
  assert b"__builtin__\nsetattr" in data  # dill fixes the local class's __qualname__
  loaded = _load_bytes(tmp_path, data)
  _assert_tree_equal(loaded.params, params)
  _assert_tree_equal(loaded.state, state)
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))


def test_replica_axis_is_stripped_taking_replica_zero(tmp_path, r50, heads, forward):
  params, state = r50
  # Replica 1 differs from replica 0, so taking the wrong one is caught.
  stack = lambda tree: {m: {n: np.stack([v, v + 1]) for n, v in d.items()}
                        for m, d in tree.items()}
  all_params, all_state = {**params, **heads[0]}, {**state, **heads[1]}
  data = pickle.dumps(_release(stack(all_params), stack(all_state)), protocol=2)
  loaded = _load_bytes(tmp_path, data)
  assert loaded.replica_axis_stripped
  _assert_tree_equal(loaded.params, params)
  _assert_tree_equal(loaded.state, state)
  _assert_tree_equal(loaded.head_params, heads[0])
  _assert_tree_equal(loaded.head_state, heads[1])
  counter = loaded.state["res_net50/~/initial_batchnorm/~/mean_ema"]["counter"]
  assert counter.shape == () and counter.dtype == np.int32
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))


def test_heads_flatmapping_and_jax_array_reconstructors(tmp_path, r50, heads, forward):
  params, state = r50
  flat = data_structures.FlatMap
  release = _release(flat({**params, **heads[0]}), flat({**state, **heads[1]}))
  release["rng"] = jax.random.key_data(jax.random.key(3))  # jax>=0.4 _reconstruct_array
  data = pickle.dumps(release, protocol=2)
  assert b"haiku._src.data_structures\nFlatMapping" in data
  assert b"jax._src.array\n_reconstruct_array" in data
  loaded = _load_bytes(tmp_path, data)
  _assert_tree_equal(loaded.params, params)
  _assert_tree_equal(loaded.state, state)
  _assert_tree_equal(loaded.head_params, heads[0])
  _assert_tree_equal(loaded.head_state, heads[1])
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
  tree = _release({"res_net18/~/initial_conv": {"w": OldDeviceArray(w[None])}},
                  {bn: {"counter": OldDeviceArray(c[None])}})
  tree["rng"] = OldDeviceArray(np.arange(4, dtype=np.uint32).reshape(2, 2))
  with _fake_module_globals("jax._src.device_array",
                            reconstruct_device_array=reconstruct_device_array):
    data = pickle.dumps(tree, protocol=2)
  assert b"jax._src.device_array\nreconstruct_device_array" in data
  loaded = _load_bytes(tmp_path, data)
  assert loaded.replica_axis_stripped
  np.testing.assert_array_equal(loaded.params["res_net18/~/initial_conv"]["w"], w)
  assert loaded.state["res_net18/~/initial_batchnorm/~/mean_ema"]["counter"].shape == ()
  np.testing.assert_array_equal(loaded.rng, np.arange(4).reshape(2, 2))
  assert loaded.architecture == "resnet18" and loaded.width_multiplier is None


def test_load_released_checkpoint_returns_encoder_only(tmp_path, heads):
  params = {"res_net50/~/initial_conv": {"w": np.ones((7, 7, 3, 128), np.float32)}}
  state = {"res_net50/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(1, np.int32)}}
  path = tmp_path / "c.pkl"
  path.write_bytes(pickle.dumps(_release({**params, **heads[0]}, {**state, **heads[1]}),
                                protocol=2))
  got_params, got_state = ck.load_released_checkpoint(str(path))
  _assert_tree_equal(got_params, params)
  _assert_tree_equal(got_state, state)
  full = ck.load_released_checkpoint_full(path)
  assert full.width_multiplier == 2 and full.architecture == "resnet50"
  assert sorted(full.head_params) == sorted(heads[0])


# ----------------------------------------------------------------------------------------------
# Unsafe and malformed files.
# ----------------------------------------------------------------------------------------------


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
    for payload in (obj, _release(params, state, extra=obj)):
      with pytest.raises(ck.CheckpointError, match="refusing") as err:
        _load_bytes(tmp_path, _dumps(payload, protocol, rewrite))
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
      _load_bytes(tmp_path, blob)


def test_build_on_allowed_callable_is_refused(tmp_path):
  # GLOBAL numpy.dtype, {'a': 1}, BUILD: would set an attribute on the loader's dtype function.
  blob = b"\x80\x02cnumpy\ndtype\n}X\x01\x00\x00\x00aK\x01sb."
  with pytest.raises(ck.CheckpointError, match="BUILD"):
    _load_bytes(tmp_path, blob)
  assert not hasattr(ck.ALLOWED_GLOBALS[("numpy", "dtype")], "a")
  # numpy.dtype with a flexible / object spec is refused (its state could set object flags).
  for spec in (b"V8", b"O8"):
    blob = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00" + spec + b"\x89\x88\x87R."
    with pytest.raises(ck.CheckpointError, match="numpy.dtype"):
      _load_bytes(tmp_path, blob)


def test_malformed_files_raise_checkpoint_error(tmp_path):
  good_params = {"res_net50/~/initial_conv": {"w": np.ones((7, 7, 3, 64), np.float32)}}
  good_state = {"res_net50/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(1, np.int32)}}
  good = pickle.dumps(_release(good_params, good_state), protocol=2)
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
      "string leaf": (pickle.dumps(_release({"res_net50/~/c": {"w": "x"}}, {}), protocol=2),
                      "expected a numeric array, found str"),
      "flat params": (pickle.dumps(_release({"w": np.ones(3)}, {}), protocol=2),
                      "expected .module_name"),
  }
  for name, (blob, message) in cases.items():
    with pytest.raises(ck.CheckpointError, match=message):
      _load_bytes(tmp_path, blob)
  with pytest.raises(ck.CheckpointError, match="does not exist"):
    ck.load_released_checkpoint(tmp_path / "missing.pkl")
  with pytest.raises(ck.CheckpointError, match="directory"):
    ck.load_released_checkpoint(tmp_path)
  assert issubclass(ck.CheckpointError, ValueError)


def test_ambiguous_replica_axis_and_encoder_scope(tmp_path):
  w = np.ones((3, 3, 3, 16), np.float32)
  counter = np.ones((2,), np.int32)  # replica axis on the state only
  blob = pickle.dumps(_release({"res_net18/~/initial_conv": {"w": w}},
                               {"res_net18/~/initial_batchnorm/~/mean_ema": {"counter": counter}}),
                      protocol=2)
  with pytest.raises(ck.CheckpointError, match="replica axis"):
    _load_bytes(tmp_path, blob)
  two = {"res_net18/~/initial_conv": {"w": w}, "res_net50/~/initial_conv": {"w": w}}
  blob = pickle.dumps(_release(two, {}), protocol=2)
  with pytest.raises(ck.CheckpointError, match=r"res_net18', 'res_net50'.*encoder_prefix"):
    _load_bytes(tmp_path, blob)
  loaded = _load_bytes(tmp_path, blob, encoder_prefix="res_net50")
  assert list(loaded.params) == ["res_net50/~/initial_conv"]
  assert list(loaded.head_params) == ["res_net18/~/initial_conv"]
  with pytest.raises(ck.CheckpointError, match="encoder_prefix 'nope'"):
    _load_bytes(tmp_path, blob, encoder_prefix="nope")
  # Unknown naming but a single non-head scope: that scope is the encoder.
  blob = pickle.dumps(_release({"my_net/~/conv": {"w": w}, "projector/linear": {"b": w[0, 0, 0]}},
                               {}), protocol=2)
  loaded = _load_bytes(tmp_path, blob)
  assert loaded.encoder_prefix == "my_net" and loaded.architecture is None


# ----------------------------------------------------------------------------------------------
# Verification.
# ----------------------------------------------------------------------------------------------


def test_verify_checkpoint_tree_reports_each_difference():
  expected_p = {"a/~/conv": {"w": (3, 3, 3, 8)}, "a/~/bn": {"scale": (1, 1, 1, 8)}}
  expected_s = {"a/~/bn/~/mean_ema": {"counter": ()}}
  got_p = {"a/~/conv": {"w": np.zeros((3, 3, 3, 4))}, "a/~/extra": {"b": np.zeros(2)}}
  got_s = {"a/~/bn/~/mean_ema": {"counter": np.zeros(())}}
  assert ck.verify_checkpoint_tree(expected_p, expected_s, expected_p, expected_s) == []
  assert ck.verify_checkpoint_tree(got_p, got_s, expected_p, expected_s) == [
      "params: missing a/~/bn/scale (expected shape (1, 1, 1, 8))",
      "params: a/~/conv/w has shape (3, 3, 3, 4), expected (3, 3, 3, 8)",
      "params: unexpected a/~/extra/b with shape (2,)",
  ]
  with pytest.raises(ValueError, match="params"):
    ck.verify_checkpoint_tree({"m": 1}, {}, {}, {})


def test_expected_tree_matches_release_counts():
  params, state = ck.expected_tree("resnet50")
  shapes = [sd.shape for leaves in params.values() for sd in leaves.values()]
  assert len(shapes) == 159 and sum(int(np.prod(s)) for s in shapes) == 23_508_032
  assert params["res_net50/~/initial_conv"]["w"].shape == (7, 7, 3, 64)
  assert state["res_net50/~/initial_batchnorm/~/mean_ema"]["counter"].shape == ()
  params2, _ = ck.expected_tree("resnet50", 2)
  assert params2["res_net50/~/initial_conv"]["w"].shape == (7, 7, 3, 128)


def test_verify_released_checkpoint(tmp_path, r50, heads):
  params, state = r50
  path = tmp_path / "r50.pkl"
  ck.export_release_checkpoint(path, params, state, step=5, head_params=heads[0],
                               head_state=heads[1])
  report = ck.verify_released_checkpoint(path, "resnet50", 1)
  assert report.ok and report.differences == ()
  assert report.num_params == report.expected_num_params == 23_508_032
  assert report.num_param_arrays == 159 and report.num_state_arrays == 318
  assert report.encoder_prefix == "res_net50" and report.step == 5
  assert "classifier" in report.head_modules and "23,508,032" in report.summary()
  # An SK checkpoint (unknown naming) is compared name by name, never guessed.
  with pytest.raises(ck.CheckpointError) as err:
    ck.verify_released_checkpoint(path, "sk_resnet50", 1)
  assert "missing sk_res_net50/~/initial_conv_0/w" in str(err.value)
  assert "unexpected res_net50/~/initial_conv/w with shape (7, 7, 3, 64)" in str(err.value)
  report = ck.verify_released_checkpoint(path, "resnet50", 2, raise_on_mismatch=False)
  assert not report.ok
  assert ("params: res_net50/~/initial_conv/w has shape (7, 7, 3, 64), expected (7, 7, 3, 128)"
          in report.differences)
  assert report.expected_num_params > 90_000_000
  path.unlink()


# ----------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------


def test_export_round_trip(tmp_path, r50, heads, forward):
  params, state = r50
  jax_params = jax.tree.map(jnp.asarray, params)  # exporting jax arrays works too
  path = tmp_path / "sub" / "out.pkl"
  path.parent.mkdir()
  path.write_bytes(b"old content")  # replaced atomically
  ck.export_release_checkpoint(path, jax_params, state, step=77, rng=jax.random.key(1),
                               head_params=heads[0], head_state=heads[1])
  assert os.listdir(path.parent) == ["out.pkl"]
  data = path.read_bytes()
  assert data[:2] == b"\x80\x02" and b"numpy.core.multiarray\n_reconstruct" in data
  assert b"numpy._core" not in data
  loaded = ck.load_released_checkpoint_full(path)
  assert loaded.replica_axis_stripped and loaded.step == 77
  np.testing.assert_array_equal(loaded.rng, jax.random.key_data(jax.random.key(1)))
  _assert_tree_equal(loaded.params, params)
  _assert_tree_equal(loaded.state, state)
  _assert_tree_equal(loaded.head_params, heads[0])
  _assert_tree_equal(loaded.head_state, heads[1])
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))
  with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias
    warnings.simplefilter("ignore")
    plain = pickle.loads(data)  # the release's own (dill/pickle) loader reads it too
  assert plain["experiment_state"]["online_params"]["res_net50/~/initial_conv"]["w"].shape == (
      1, 7, 7, 3, 64)
  ck.export_release_checkpoint(path, params, state, step=0, replica_axis=False)
  loaded = ck.load_released_checkpoint_full(path)
  assert not loaded.replica_axis_stripped and loaded.rng is None
  _assert_tree_equal(loaded.params, params)
  path.unlink()


def test_export_rejects_bad_input(tmp_path):
  params = {"res_net18/~/initial_conv": {"w": np.ones((3, 3, 3, 4), np.float32)}}
  path = tmp_path / "x.pkl"
  with pytest.raises(ValueError, match="collide"):
    ck.export_release_checkpoint(path, params, {}, step=0, head_params=params)
  with pytest.raises(ValueError, match="step"):
    ck.export_release_checkpoint(path, params, {}, step=-1)
  with pytest.raises(ValueError, match="numeric"):
    ck.export_release_checkpoint(path, {"m": {"w": np.array(["a"])}}, {}, step=0)
  with pytest.raises(ValueError, match="params"):
    ck.export_release_checkpoint(path, [1], {}, step=0)
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Orbax.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def test_save_restore_round_trip_keeps_sharding(tmp_path, mesh):
  assert len(jax.devices()) == 8
  sharding = NamedSharding(mesh, P("data"))
  queue = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), sharding)
  replicated = jax.device_put(jnp.ones((3,), jnp.int32), NamedSharding(mesh, P()))
  tree = {"queue": queue, "rep": replicated, "w": np.arange(6.0).reshape(2, 3),
          "count": 3, "scale": np.float32(0.5), "key": jax.random.key(4)}
  ck.save_state(tmp_path / "ckpt", 10, tree, max_to_keep=2)
  assert ck.latest_step(tmp_path / "ckpt") == 10
  target = dict(tree, queue=jnp.zeros((16, 4), jnp.float32, device=sharding))
  step, restored = ck.restore_latest(tmp_path / "ckpt", target)
  assert step == 10
  assert isinstance(restored["queue"], jax.Array)
  assert restored["queue"].sharding == sharding
  np.testing.assert_array_equal(restored["queue"], np.arange(64).reshape(16, 4))
  assert restored["rep"].sharding == replicated.sharding
  assert isinstance(restored["w"], np.ndarray)
  np.testing.assert_array_equal(restored["w"], tree["w"])
  assert restored["count"] == 3 and isinstance(restored["count"], int)
  assert restored["scale"] == np.float32(0.5) and isinstance(restored["scale"], np.float32)
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(tree["key"]))
  # Restoring onto a different placement (ShapeDtypeStruct) reshards.
  other = NamedSharding(mesh, P())
  abstract = dict(target, queue=jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=other))
  _, restored = ck.restore_latest(tmp_path / "ckpt", abstract)
  assert restored["queue"].sharding == other
  np.testing.assert_array_equal(restored["queue"], np.arange(64).reshape(16, 4))
  with pytest.raises(ck.CheckpointError):
    ck.restore_latest(tmp_path / "ckpt", {"queue": target["queue"]})


def test_save_state_keeps_last_n(tmp_path):
  directory = tmp_path / "ckpt"
  assert ck.latest_step(directory) is None
  assert ck.restore_latest(directory, {"x": np.zeros(2)}) is None
  for step in range(4):
    ck.save_state(directory, step, {"x": np.full(2, step, np.float32)}, max_to_keep=2)
  assert sorted(os.listdir(directory)) == ["2", "3"]
  step, tree = ck.restore_latest(directory, {"x": np.zeros(2, np.float32)})
  assert step == 3
  np.testing.assert_array_equal(tree["x"], [3, 3])
  with pytest.raises(ValueError, match="larger than the latest"):
    ck.save_state(directory, 3, {"x": np.zeros(2)}, max_to_keep=2)
  with pytest.raises(ValueError, match="max_to_keep"):
    ck.save_state(directory, 9, {"x": np.zeros(2)}, max_to_keep=0)
  with pytest.raises(ValueError, match="str"):
    ck.save_state(directory, 9, {"x": "text"}, max_to_keep=2)


class _DummyExperiment:
  """Implements the two methods the checkpointer uses, with a sharded and a host leaf."""

  def __init__(self, mesh, value):
    self.params = jax.device_put(jnp.full((8, 2), value, jnp.float32),
                                 NamedSharding(mesh, P("data")))
    self.count = np.int32(value)

  def snapshot_state(self):
    return {"params": self.params, "count": self.count}

  def restore_from_snapshot(self, snapshot):
    self.params, self.count = snapshot["params"], snapshot["count"]


def test_orbax_checkpointer_save_restore_and_restart(tmp_path, mesh):
  directory = tmp_path / "exp"
  rng_sharding = NamedSharding(mesh, P())
  ckpt = ck.OrbaxCheckpointer(directory, max_to_keep=2)
  state = ckpt.get_experiment_state("latest")
  assert ckpt.get_experiment_state("latest") is state
  state.global_step = 0
  state.experiment_module = _DummyExperiment(mesh, 1.0)
  state.train_step_rng = jax.device_put(jnp.array([1, 2], jnp.uint32), rng_sharding)
  assert not ckpt.can_be_restored("latest") and ckpt.restore_path("latest") is None
  for step in (0, 5, 9):
    state.global_step = step
    state.experiment_module.params = state.experiment_module.params + 1
    state.experiment_module.count = np.int32(step)
    state.train_step_rng = state.train_step_rng + 1
    ckpt.save("latest")
  ckpt.wait_for_checkpointing_to_finish()
  assert sorted(os.listdir(directory / "latest")) == ["1", "2"]
  assert ckpt.restore_path("latest") == os.path.join(str(directory), "latest", "2")

  # A restarted job: new checkpointer, fresh experiment with other values.
  ckpt2 = ck.OrbaxCheckpointer(directory, max_to_keep=2)
  state2 = ckpt2.get_experiment_state("latest")
  state2.global_step = 0
  state2.experiment_module = _DummyExperiment(mesh, -7.0)
  state2.train_step_rng = jax.device_put(jnp.array([0, 0], jnp.uint32), rng_sharding)
  assert ckpt2.can_be_restored("latest")
  ckpt2.restore("latest")
  assert state2.global_step == 9 and isinstance(state2.global_step, int)
  module = state2.experiment_module
  np.testing.assert_array_equal(module.params, np.full((8, 2), 4.0))
  assert module.params.sharding == NamedSharding(mesh, P("data"))
  assert module.count == 9 and isinstance(module.count, np.int32)
  np.testing.assert_array_equal(state2.train_step_rng, [4, 5])
  assert state2.train_step_rng.sharding == rng_sharding
  ckpt2.save("latest")  # continues numbering after a restart
  assert sorted(os.listdir(directory / "latest")) == ["2", "3"]

  # jaxline's evaluator: train_step_rng is None there, restored as a host array.
  ckpt3 = ck.OrbaxCheckpointer(directory, max_to_keep=2)
  state3 = ckpt3.get_experiment_state("latest")
  state3.global_step = 0
  state3.experiment_module = _DummyExperiment(mesh, 0.0)
  state3.train_step_rng = None
  ckpt3.restore("latest")
  np.testing.assert_array_equal(np.asarray(state3.train_step_rng), [4, 5])
  assert state3.global_step == 9

  # jaxline's 'best' series: strings / floats go with the checkpoint too.
  best = ckpt3.get_experiment_state("best")
  best.best_eval_metric_value = float("-inf")
  best.best_model_eval_metric = "top1"
  best.experiment_module = state3.experiment_module
  best.best_eval_metric_value = np.float32(0.25)
  ckpt3.save("best")
  ckpt4 = ck.OrbaxCheckpointer(directory, max_to_keep=2)
  best4 = ckpt4.get_experiment_state("best")
  best4.best_eval_metric_value = float("-inf")
  best4.best_model_eval_metric = "top1"
  best4.experiment_module = _DummyExperiment(mesh, 3.0)
  ckpt4.restore("best")
  assert best4.best_eval_metric_value == np.float32(0.25)
  assert best4.best_model_eval_metric == "top1"
  np.testing.assert_array_equal(best4.experiment_module.params, np.full((8, 2), 4.0))

  # Errors: an entry the checkpoint lacks, a series name with a path in it.
  state4 = ckpt4.get_experiment_state("latest")
  state4.experiment_module = _DummyExperiment(mesh, 0.0)
  state4.something_new = 1
  with pytest.raises(ck.CheckpointError, match="something_new"):
    ckpt4.restore("latest")
  with pytest.raises(ValueError, match="ckpt_series"):
    ckpt4.get_experiment_state("../x")
  for c in (ckpt, ckpt2, ckpt3, ckpt4):
    c.close()


def test_orbax_checkpointer_async_save(tmp_path, mesh):
  ckpt = ck.OrbaxCheckpointer(tmp_path, max_to_keep=1, save_async=True)
  state = ckpt.get_experiment_state("latest")
  state.global_step = 3
  state.experiment_module = _DummyExperiment(mesh, 2.0)
  ckpt.save("latest")
  state.experiment_module.params = state.experiment_module.params * 0  # after save returned
  ckpt.wait_for_checkpointing_to_finish()
  restored = ck.OrbaxCheckpointer(tmp_path, max_to_keep=1)
  state2 = restored.get_experiment_state("latest")
  state2.experiment_module = _DummyExperiment(mesh, 0.0)
  state2.global_step = 0
  restored.restore("latest")
  np.testing.assert_array_equal(state2.experiment_module.params, np.full((8, 2), 2.0))
  assert state2.global_step == 3
  ckpt.close()
  restored.close()


def test_orbax_checkpointer_drives_jaxline_train_and_resumes(tmp_path):
  """jaxline's own train loop with our checkpointer; a second run resumes instead of restarting."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from semppl_jax import jaxline_compat  # pylint: disable=g-import-not-at-top
  jaxline_compat.install()
  from jaxline import base_config, experiment, train  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  class Counter(experiment.AbstractExperiment):
    CHECKPOINT_ATTRS = {}
    NON_BROADCAST_CHECKPOINT_ATTRS = {"_w": "w"}

    def __init__(self, mode, init_rng=None):
      super().__init__(mode=mode, init_rng=init_rng)
      self._w = jnp.zeros((2,))

    def step(self, global_step, rng, writer):
      self._w = self._w + 1
      return {}

    def evaluate(self, global_step, rng, writer):
      return {}

  config = base_config.get_base_config()
  config.training_steps = 3
  config.save_checkpoint_interval = 1
  config.interval_type = "steps"
  config.experiment_kwargs = {}
  train.train(Counter, config, ck.OrbaxCheckpointer(tmp_path, max_to_keep=2), None)
  config.training_steps = 5
  checkpointer = ck.OrbaxCheckpointer(tmp_path, max_to_keep=2)
  train.train(Counter, config, checkpointer, None)
  state = checkpointer.get_experiment_state("latest")
  assert state.global_step == 5
  np.testing.assert_array_equal(state.experiment_module._w, [5, 5])  # 3 + 2, not 5 + ...
  assert len(os.listdir(tmp_path / "latest")) == 2
  checkpointer.close()


def test_other_pickle_protocols_load(tmp_path):
  w = np.arange(432, dtype=np.float32).reshape(3, 3, 3, 16)
  params = {"res_net18/~/initial_conv": {"w": w}}
  state = {"res_net18/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(2, np.int32)}}
  for protocol in (0, 3, 4, 5):
    loaded = _load_bytes(tmp_path, pickle.dumps(_release(params, state), protocol=protocol))
    _assert_tree_equal(loaded.params, params)
    _assert_tree_equal(loaded.state, state)
