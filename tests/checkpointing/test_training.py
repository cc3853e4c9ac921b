"""Tests for semppl_jax.checkpointing.training: Orbax training checkpoints and the jaxline
checkpointer."""
import errno
import logging
import os
import shutil

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from semppl_jax import checkpointing as ck


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
  ckpt.save("latest")  # jaxline's final save repeats the last periodic one: skipped
  ckpt.wait_for_checkpointing_to_finish()
  # Directories are numbered by global step.
  assert sorted(os.listdir(directory / "latest"), key=int) == ["5", "9"]
  assert ckpt.restore_path("latest") == os.path.join(str(directory), "latest", "9")

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
  state2.global_step = 12
  ckpt2.save("latest")  # continues after a restart
  assert sorted(os.listdir(directory / "latest"), key=int) == ["9", "12"]
  state2.global_step = 11
  with pytest.raises(ck.CheckpointError, match="newer checkpoint 12"):
    ckpt2.save("latest")
  state2.global_step = 12

  # jaxline's evaluator: train_step_rng is None there, restored as a host array.
  ckpt3 = ck.OrbaxCheckpointer(directory, max_to_keep=2)
  state3 = ckpt3.get_experiment_state("latest")
  state3.global_step = 0
  state3.experiment_module = _DummyExperiment(mesh, 0.0)
  state3.train_step_rng = None
  ckpt3.restore("latest")
  np.testing.assert_array_equal(np.asarray(state3.train_step_rng), [4, 5])
  assert state3.global_step == 12

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
  from semppl_jax.jaxline import compat as jaxline_compat  # pylint: disable=g-import-not-at-top
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
  assert sorted(os.listdir(tmp_path / "latest"), key=int) == ["4", "5"]  # global steps
  checkpointer.close()



# ----------------------------------------------------------------------------------------------
# Bad checkpoints, crashed and failed saves.
# ----------------------------------------------------------------------------------------------


def _corrupt(step_dir):
  """Truncates every data file of a checkpoint (what a torn copy or bad disk leaves)."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name not in ("_CHECKPOINT_METADATA", "commit_success.txt"):
        with open(os.path.join(root, name), "wb"):
          pass


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


def test_restore_latest_falls_back_to_newest_readable(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  for step in (1, 2, 3):
    ck.save_state(directory, step, {"x": np.full(2, step, np.float32)}, max_to_keep=5)
  _corrupt(directory / "3")
  os.mkdir(directory / "4")  # A stray empty step directory.
  target = {"x": np.zeros(2, np.float32)}
  with caplog.at_level(logging.WARNING):
    step, tree = ck.restore_latest(directory, target)
  assert step == 2
  np.testing.assert_array_equal(tree["x"], [2, 2])
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"{directory}/4 cannot be restored" in w for w in warnings), warnings
  assert any(f"{directory}/3 cannot be restored" in w for w in warnings), warnings
  assert any(f"Restored {directory}/2" in w for w in warnings), warnings
  _empty(directory / "2")
  _corrupt(directory / "1")
  with pytest.raises(ck.CheckpointError, match=r"no checkpoint in .* could be restored: .*/4: "
                     r".*/3: .*/2: .*/1: "):
    ck.restore_latest(directory, target)


def _checkpointer_at(directory, mesh, global_step, value):
  ckpt = ck.OrbaxCheckpointer(directory, max_to_keep=5)
  state = ckpt.get_experiment_state("latest")
  state.global_step = global_step
  state.experiment_module = _DummyExperiment(mesh, value)
  return ckpt, state


@pytest.mark.parametrize("damage", [_corrupt, _empty])
def test_orbax_checkpointer_resumes_from_newest_readable(tmp_path, mesh, caplog, damage):
  ckpt, state = _checkpointer_at(tmp_path, mesh, 0, 0.0)
  for step in (1, 2, 3):
    state.global_step = step
    state.experiment_module = _DummyExperiment(mesh, float(step))
    ckpt.save("latest")
  ckpt.close()
  damage(tmp_path / "latest" / "3")

  resumed, state = _checkpointer_at(tmp_path, mesh, 0, -1.0)
  assert resumed.can_be_restored("latest")
  with caplog.at_level(logging.WARNING):
    resumed.restore("latest")
  assert state.global_step == 2
  np.testing.assert_array_equal(state.experiment_module.params, np.full((8, 2), 2.0))
  assert any(f"{tmp_path}/latest/3 cannot be restored" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  # Training on from step 2 writes step 3 again, replacing the unreadable one.
  state.global_step = 3
  state.experiment_module = _DummyExperiment(mesh, 33.0)
  resumed.save("latest")
  resumed.close()
  again, state = _checkpointer_at(tmp_path, mesh, 0, -1.0)
  again.restore("latest")
  assert state.global_step == 3
  np.testing.assert_array_equal(state.experiment_module.params, np.full((8, 2), 33.0))
  again.close()

  for step in (1, 2, 3):
    damage(tmp_path / "latest" / str(step))
  broken, _ = _checkpointer_at(tmp_path, mesh, 0, -1.0)
  with pytest.raises(ck.CheckpointError, match=r"no checkpoint in .*latest' could be restored"):
    broken.restore("latest")
  broken.close()


def test_crashed_save_tmp_dirs_are_removed_at_next_start(tmp_path, mesh):
  ckpt, state = _checkpointer_at(tmp_path, mesh, 1, 1.0)
  ckpt.save("latest")
  ckpt.close()
  series = tmp_path / "latest"
  crashed = series / "2.orbax-checkpoint-tmp-1700000000"  # What a save killed midway leaves.
  (crashed / "default").mkdir(parents=True)
  (crashed / "default" / "data").write_bytes(b"partial")
  user_file = series / "notes.txt"
  user_file.write_text("mine")
  restarted, state = _checkpointer_at(tmp_path, mesh, 0, 0.0)
  restarted.restore("latest")
  assert sorted(os.listdir(series)) == ["1", "notes.txt"]
  assert user_file.read_text() == "mine"
  restarted.close()
  # The functional API cleans up on save too.
  (tmp_path / "fn").mkdir()
  crashed = tmp_path / "fn" / "7.orbax-checkpoint-tmp-1700000000"
  crashed.mkdir()
  ck.save_state(tmp_path / "fn", 8, {"x": np.zeros(2)}, max_to_keep=2)
  assert sorted(os.listdir(tmp_path / "fn")) == ["8"]


def _disk_full(monkeypatch, under):
  """Makes every file write Orbax does under ``under`` fail with ENOSPC."""
  path_type = type(epath.Path(str(under)))
  real_write_text = path_type.write_text

  def write_text(self, *args, **kwargs):
    if str(self).startswith(str(under)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real_write_text(self, *args, **kwargs)
  monkeypatch.setattr(path_type, "write_text", write_text)


def test_disk_full_during_save_keeps_previous_checkpoints(tmp_path, mesh, monkeypatch):
  directory = tmp_path / "fn"
  ck.save_state(directory, 1, {"x": np.ones(2, np.float32)}, max_to_keep=1)
  with monkeypatch.context() as patch:
    _disk_full(patch, tmp_path)
    with pytest.raises(ck.CheckpointError,
                       match=rf"saving checkpoint 2 to '{directory}' failed \(the disk is full: "
                       ".*No space left"):
      ck.save_state(directory, 2, {"x": np.full(2, 2.0, np.float32)}, max_to_keep=1)
  assert sorted(os.listdir(directory)) == ["1"]
  step, tree = ck.restore_latest(directory, {"x": np.zeros(2, np.float32)})
  assert step == 1
  np.testing.assert_array_equal(tree["x"], [1, 1])

  ckpt, state = _checkpointer_at(tmp_path / "exp", mesh, 1, 1.0)
  ckpt.save("latest")
  with monkeypatch.context() as patch:
    _disk_full(patch, tmp_path)
    state.global_step = 2
    state.experiment_module = _DummyExperiment(mesh, 2.0)
    with pytest.raises(ck.CheckpointError,
                       match=rf"saving checkpoint 2 to '{tmp_path}/exp/latest' failed \(the "
                       "disk is full"):
      ckpt.save("latest")
  assert sorted(os.listdir(tmp_path / "exp" / "latest")) == ["1"]
  ckpt.save("latest")  # Space again: the same checkpointer saves.
  assert sorted(os.listdir(tmp_path / "exp" / "latest")) == ["1", "2"]
  ckpt.close()
  resumed, state = _checkpointer_at(tmp_path / "exp", mesh, 0, 0.0)
  resumed.restore("latest")
  assert state.global_step == 2
  np.testing.assert_array_equal(state.experiment_module.params, np.full((8, 2), 2.0))
  resumed.close()


def _flip_bit(path, seed):
  """Flips one (seeded) bit of a file in place."""
  data = bytearray(path.read_bytes())
  rng = np.random.RandomState(seed)
  i = rng.randint(len(data))
  data[i] ^= 1 << rng.randint(8)
  path.write_bytes(bytes(data))


def _files(step_dir):
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != ck.training.MANIFEST_NAME)


def test_every_checkpoint_file_is_in_the_manifest_and_a_flipped_bit_is_named(tmp_path, mesh):
  ckpt, state = _checkpointer_at(tmp_path, mesh, 1, 1.0)
  ckpt.save("latest")
  ckpt.close()
  step_dir = tmp_path / "latest" / "1"
  assert (step_dir / ck.training.MANIFEST_NAME).is_file()
  assert ck.verify_manifest(step_dir)
  files = _files(step_dir)
  assert len(files) > 3
  pristine = {p: p.read_bytes() for p in files}
  for seed, path in enumerate(files):
    if path.stat().st_size == 0:
      continue
    _flip_bit(path, seed)
    rel = str(path.relative_to(step_dir))
    with pytest.raises(ck.CheckpointError, match=rf"{step_dir}: file {rel} fails its sha256"):
      ck.verify_manifest(step_dir)
    path.write_bytes(pristine[path])
  files[0].write_bytes(pristine[files[0]] + b"x")
  with pytest.raises(ck.CheckpointError, match="truncated or rewritten"):
    ck.verify_manifest(step_dir)


def test_flipped_bit_falls_back_to_the_previous_checkpoint(tmp_path, mesh, caplog):
  ckpt, state = _checkpointer_at(tmp_path, mesh, 0, 0.0)
  for step in (1, 2):
    state.global_step = step
    state.experiment_module = _DummyExperiment(mesh, float(step))
    ckpt.save("latest")
  ckpt.close()
  step_dir = tmp_path / "latest" / "2"
  data = max(_files(step_dir / "experiment_module"), key=lambda p: p.stat().st_size)
  _flip_bit(data, 0)
  resumed, state = _checkpointer_at(tmp_path, mesh, 0, -1.0)
  with caplog.at_level(logging.WARNING):
    resumed.restore("latest")
  assert state.global_step == 1
  np.testing.assert_array_equal(state.experiment_module.params, np.full((8, 2), 1.0))
  rel = data.relative_to(step_dir)
  assert any(f"Checkpoint {tmp_path}/latest/2 cannot be restored" in r.getMessage()
             and f"file {rel} fails its sha256 checksum" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  resumed.close()
  # Readers (label.py, evaluation, notebooks) fall back the same way.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    global_step, snapshot = ck.read_experiment_snapshot(tmp_path)
  assert global_step == 1
  np.testing.assert_array_equal(snapshot["params"], np.full((8, 2), 1.0))
  assert any(f"file {rel} fails" in r.getMessage() for r in caplog.records)
  # The functional API verifies too.
  directory = tmp_path / "fn"
  for step in (1, 2):
    ck.save_state(directory, step, {"x": np.full(2, step, np.float32)}, max_to_keep=3)
  _flip_bit(max(_files(directory / "2"), key=lambda p: p.stat().st_size), 1)
  step, tree = ck.restore_latest(directory, {"x": np.zeros(2, np.float32)})
  assert step == 1


def test_damaged_metadata_is_a_checkpoint_error_for_readers(tmp_path, mesh):
  ckpt, _ = _checkpointer_at(tmp_path, mesh, 1, 1.0)
  ckpt.save("latest")
  ckpt.close()
  step_dir = tmp_path / "latest" / "1"
  for path in _files(step_dir):
    if path.stat().st_size == 0:
      continue
    pristine = path.read_bytes()
    for seed in range(3):
      _flip_bit(path, seed)
      # With the manifest: named by the checksum. Without it: whatever Orbax trips on, still
      # a CheckpointError.
      with pytest.raises(ck.CheckpointError):
        ck.read_experiment_snapshot(tmp_path)
      manifest = step_dir / ck.training.MANIFEST_NAME
      saved_manifest = manifest.read_bytes()
      manifest.unlink()
      try:
        ck.read_experiment_snapshot(tmp_path)
      except ck.CheckpointError:
        pass
      finally:
        manifest.write_bytes(saved_manifest)
      path.write_bytes(pristine)


def test_failed_save_removes_only_its_own_temporary_directory(tmp_path, mesh, monkeypatch):
  ckpt, state = _checkpointer_at(tmp_path / "exp", mesh, 1, 1.0)
  ckpt.save("latest")
  series = tmp_path / "exp" / "latest"
  # Another writer's save in progress (a later step) and an older crash of this step number.
  foreign = series / "7.orbax-checkpoint-tmp-1700000000"
  foreign.mkdir()
  with monkeypatch.context() as patch:
    _disk_full(patch, tmp_path)
    state.global_step = 2
    with pytest.raises(ck.CheckpointError,
                       match=r"this save's temporary files were removed, the complete "
                             r"checkpoints there are \[1\]"):
      ckpt.save("latest")
  assert sorted(os.listdir(series)) == ["1", foreign.name]
  ckpt.close()


def test_run_metadata_is_stored_and_check_resume_can_refuse(tmp_path, mesh):
  seen = []
  ckpt = ck.OrbaxCheckpointer(tmp_path, max_to_keep=2, run_metadata={"config": {"a": (1, 2)}})
  state = ckpt.get_experiment_state("latest")
  state.global_step = 1
  state.experiment_module = _DummyExperiment(mesh, 1.0)
  ckpt.save("latest")
  ckpt.close()

  def refuse(stored, where):
    seen.append((stored, where))
    raise ck.ResumeRefused("no")
  resumed = ck.OrbaxCheckpointer(tmp_path, max_to_keep=2, check_resume=refuse)
  state = resumed.get_experiment_state("latest")
  state.global_step = 0
  state.experiment_module = _DummyExperiment(mesh, 0.0)
  with pytest.raises(ck.ResumeRefused):
    resumed.restore("latest")
  assert seen == [({"config": {"a": [1, 2]}}, f"{tmp_path}/latest/1")]
  assert state.global_step == 0
  resumed.close()


def test_shape_mismatch_names_the_leaf_and_is_not_taken_for_damage(tmp_path, mesh):
  ckpt, _ = _checkpointer_at(tmp_path, mesh, 1, 1.0)
  ckpt.save("latest")
  ckpt.close()
  resumed, state = _checkpointer_at(tmp_path, mesh, 0, 0.0)
  state.experiment_module.params = jnp.zeros((16, 2), jnp.float32)
  with pytest.raises(ck.ResumeRefused,
                     match=r"1 array\(s\) of the saved state have another shape .*\n"
                           r"  \['params'\]: saved \(8, 2\), this run \(16, 2\)"):
    resumed.restore("latest")
  resumed.close()
