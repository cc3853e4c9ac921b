"""Tests for semppl_jax.checkpointing.export: writing the release format, read back by release."""
import os
import pickle
import warnings

from checkpointing_testlib import assert_tree_equal
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import checkpointing as ck


@pytest.mark.slow
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
  assert_tree_equal(loaded.params, params)
  assert_tree_equal(loaded.state, state)
  assert_tree_equal(loaded.head_params, heads[0])
  assert_tree_equal(loaded.head_state, heads[1])
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))
  with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias
    warnings.simplefilter("ignore")
    plain = pickle.loads(data)  # the release's own (dill/pickle) loader reads it too
  assert plain["experiment_state"]["online_params"]["res_net50/~/initial_conv"]["w"].shape == (
      1, 7, 7, 3, 64)
  ck.export_release_checkpoint(path, params, state, step=0, replica_axis=False)
  loaded = ck.load_released_checkpoint_full(path)
  assert not loaded.replica_axis_stripped and loaded.rng is None
  assert_tree_equal(loaded.params, params)
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
