"""Tests for semppl_jax.checkpointing.release: the release format (load, verify)."""
import pickle

from checkpointing_testlib import assert_tree_equal, load_bytes, release_dict
import numpy as np
import pytest

from semppl_jax import checkpointing as ck


@pytest.mark.slow
def test_plain_pickle_numpy2_and_numpy1_names_load_and_forward_matches(tmp_path, r50, forward):
  params, state = r50
  data = pickle.dumps(release_dict(params, state), protocol=2)
  assert b"numpy._core.multiarray\n_reconstruct" in data
  data_np1 = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  assert b"numpy._core" not in data_np1 and b"numpy.core.multiarray\n_reconstruct" in data_np1
  reference = forward(params, state)
  assert np.isfinite(reference).all() and np.std(reference) > 0
  for blob in (data, data_np1):
    loaded = load_bytes(tmp_path, blob)
    assert_tree_equal(loaded.params, params)
    assert_tree_equal(loaded.state, state)
    assert loaded.head_params == {} and loaded.head_state == {}
    assert loaded.step == 1234 and not loaded.replica_axis_stripped
    np.testing.assert_array_equal(loaded.rng, np.arange(16).reshape(8, 2))
    assert (loaded.architecture, loaded.width_multiplier) == ("resnet50", 1)
    assert loaded.encoder_prefix == "res_net50"
    np.testing.assert_array_equal(forward(loaded.params, loaded.state), reference)
  assert len(params) == 106 and sum(len(v) for v in params.values()) == 159



def test_replica_axis_is_stripped_taking_replica_zero(tmp_path, r50, heads, forward):
  params, state = r50
  # Replica 1 differs from replica 0, so taking the wrong one is caught.
  stack = lambda tree: {m: {n: np.stack([v, v + 1]) for n, v in d.items()}
                        for m, d in tree.items()}
  all_params, all_state = {**params, **heads[0]}, {**state, **heads[1]}
  data = pickle.dumps(release_dict(stack(all_params), stack(all_state)), protocol=2)
  loaded = load_bytes(tmp_path, data)
  assert loaded.replica_axis_stripped
  assert_tree_equal(loaded.params, params)
  assert_tree_equal(loaded.state, state)
  assert_tree_equal(loaded.head_params, heads[0])
  assert_tree_equal(loaded.head_state, heads[1])
  counter = loaded.state["res_net50/~/initial_batchnorm/~/mean_ema"]["counter"]
  assert counter.shape == () and counter.dtype == np.int32
  np.testing.assert_array_equal(forward(loaded.params, loaded.state), forward(params, state))



def test_load_released_checkpoint_returns_encoder_only(tmp_path, heads):
  params = {"res_net50/~/initial_conv": {"w": np.ones((7, 7, 3, 128), np.float32)}}
  state = {"res_net50/~/initial_batchnorm/~/mean_ema": {"counter": np.asarray(1, np.int32)}}
  path = tmp_path / "c.pkl"
  path.write_bytes(pickle.dumps(release_dict({**params, **heads[0]}, {**state, **heads[1]}),
                                protocol=2))
  got_params, got_state = ck.load_released_checkpoint(str(path))
  assert_tree_equal(got_params, params)
  assert_tree_equal(got_state, state)
  full = ck.load_released_checkpoint_full(path)
  assert full.width_multiplier == 2 and full.architecture == "resnet50"
  assert sorted(full.head_params) == sorted(heads[0])




def test_ambiguous_replica_axis_and_encoder_scope(tmp_path):
  w = np.ones((3, 3, 3, 16), np.float32)
  counter = np.ones((2,), np.int32)  # replica axis on the state only
  blob = pickle.dumps(release_dict({"res_net18/~/initial_conv": {"w": w}},
                               {"res_net18/~/initial_batchnorm/~/mean_ema": {"counter": counter}}),
                      protocol=2)
  with pytest.raises(ck.CheckpointError, match="replica axis"):
    load_bytes(tmp_path, blob)
  two = {"res_net18/~/initial_conv": {"w": w}, "res_net50/~/initial_conv": {"w": w}}
  blob = pickle.dumps(release_dict(two, {}), protocol=2)
  with pytest.raises(ck.CheckpointError, match=r"res_net18', 'res_net50'.*encoder_prefix"):
    load_bytes(tmp_path, blob)
  loaded = load_bytes(tmp_path, blob, encoder_prefix="res_net50")
  assert list(loaded.params) == ["res_net50/~/initial_conv"]
  assert list(loaded.head_params) == ["res_net18/~/initial_conv"]
  with pytest.raises(ck.CheckpointError, match="encoder_prefix 'nope'"):
    load_bytes(tmp_path, blob, encoder_prefix="nope")
  # Unknown naming but a single non-head scope: that scope is the encoder.
  tree = {"my_net/~/conv": {"w": w}, "projector/linear": {"b": w[0, 0, 0]}}
  blob = pickle.dumps(release_dict(tree, {}), protocol=2)
  loaded = load_bytes(tmp_path, blob)
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


@pytest.mark.parametrize("bad", ["nan", "inf", "int32", "bool", "float16", "float64",
                                 "float_counter"])
def test_release_with_nonfinite_or_wrongly_typed_leaves_is_refused_naming_the_leaf(tmp_path,
                                                                                   bad):
  w = np.ones((3, 3, 3, 4), np.float32)
  counter = np.asarray(1, np.int32)
  if bad == "nan":
    w[0, 0, 0, :2] = np.nan
  elif bad == "inf":
    w[1, 1, 1, 1] = -np.inf
  elif bad == "float_counter":
    counter = np.asarray(1.0, np.float64)
  else:
    w = w.astype(bad)
  params = {"res_net18/~/initial_conv": {"w": w}}
  state = {"res_net18/~/initial_batchnorm/~/mean_ema": {"counter": counter}}
  path = tmp_path / "c.pkl"
  path.write_bytes(pickle.dumps(release_dict(params, state), protocol=2))
  if bad == "float_counter":
    leaf = r"\['online_state'\]\['res_net18/~/initial_batchnorm/~/mean_ema'\]\['counter'\]"
  else:
    leaf = r"\['online_params'\]\['res_net18/~/initial_conv'\]\['w'\]"
  why = {"nan": "2 of 108 values are not finite", "inf": "1 of 108 values are not finite",
         "float_counter": "dtype float64, expected an integer dtype or float32"
         }.get(bad, f"dtype {bad}, expected float32")
  pattern = rf"{leaf}: {why}"
  with pytest.raises(ck.CheckpointError, match=pattern):
    ck.load_released_checkpoint(path)
  with pytest.raises(ck.CheckpointError, match=pattern):
    ck.verify_released_checkpoint(path, "resnet18", raise_on_mismatch=False)
