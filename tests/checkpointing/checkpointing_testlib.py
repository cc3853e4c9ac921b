"""Helpers shared by the checkpointing tests: release dicts and loading bytes from a file."""
import contextlib
import sys
import types

import numpy as np

from semppl_jax import checkpointing as ck


def release_dict(params, state, **extra):
  experiment_state = {"online_params": params, "online_state": state}
  return {"experiment_state": experiment_state, "step": 1234,
          "rng": np.arange(16, dtype=np.uint32).reshape(8, 2), **extra}


def load_bytes(tmp_path, data, name="ckpt.pkl", **kwargs):
  """Writes ``data`` to a file, loads it with load_released_checkpoint_full, deletes it."""
  path = tmp_path / name
  path.write_bytes(data)
  try:
    return ck.load_released_checkpoint_full(path, **kwargs)
  finally:
    path.unlink()


def assert_tree_equal(got, want):
  assert sorted(got) == sorted(want)
  for module in want:
    assert sorted(got[module]) == sorted(want[module]), module
    for name, value in want[module].items():
      g = got[module][name]
      assert isinstance(g, np.ndarray), (module, name, type(g))
      assert g.dtype == value.dtype and g.shape == value.shape, (module, name)
      np.testing.assert_array_equal(g, value, err_msg=f"{module}/{name}")


@contextlib.contextmanager
def fake_module_globals(module_name, **objects):
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


