"""Asynchronous saves of the jaxline checkpointer (issue #20): what ``save`` returns before, what
waits for what, and that the checkpoint restores bit for bit."""
import errno
import os
import shutil
import threading

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from semppl_jax import checkpointing as ck
from semppl_jax.checkpointing import experiment_checkpointer

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class _Module:
  """The two methods the checkpointer calls, with a sharded leaf, a host leaf and an integer."""

  def __init__(self, mesh, seed):
    rng = np.random.RandomState(seed)
    # Random bit patterns: every float32 value class (subnormals, -0.0, NaN payloads ...).
    bits = rng.randint(0, 2**32, (64, 3), dtype=np.uint64).astype(np.uint32)
    self.queue = jax.device_put(jnp.asarray(bits.view(np.float32)),
                                NamedSharding(mesh, P("data")))
    self.host = rng.randn(5).astype(np.float64)
    self.count = np.int32(seed)

  def snapshot_state(self):
    return {"queue": self.queue, "host": self.host, "count": self.count}

  def restore_from_snapshot(self, snapshot):
    self.queue, self.host, self.count = snapshot["queue"], snapshot["host"], snapshot["count"]


def _bits(x):
  """The raw bits of a float array (NaN payloads and -0.0 compare too); others as they are."""
  x = np.asarray(x)
  return x.view(f"u{x.dtype.itemsize}") if x.dtype.kind == "f" else x


def _restored(directory, mesh):
  reader = ck.OrbaxCheckpointer(directory, max_to_keep=5)
  state = reader.get_experiment_state("latest")
  state.global_step = 0
  state.experiment_module = _Module(mesh, 99)
  reader.restore("latest")
  reader.close()
  return state


def test_async_save_returns_first_then_manifests_the_committed_files(tmp_path, mesh, monkeypatch):
  """``save`` returns before the manifest exists; the manifest is written off the calling thread,
  after Orbax renamed its temporary directory, and lists exactly the finished files; the next
  save and ``wait_for_checkpointing_to_finish`` wait for it; the restore is bit-identical."""
  release = threading.Event()
  seen = []
  real_write = experiment_checkpointer.write_manifest

  def spy(step_dir):
    release.wait(timeout=60)
    series = os.path.dirname(step_dir)
    step = os.path.basename(step_dir)
    seen.append({
        "step": int(step), "thread": threading.current_thread() is threading.main_thread(),
        "committed": os.path.isdir(step_dir),
        "tmp_left": [n for n in os.listdir(series) if n.startswith(f"{step}.") and TMP_SUFFIX in n],
        "files": sorted(os.path.relpath(os.path.join(r, f), step_dir)
                        for r, _, fs in os.walk(step_dir) for f in fs)})
    real_write(step_dir)
  monkeypatch.setattr(experiment_checkpointer, "write_manifest", spy)

  ckpt = ck.OrbaxCheckpointer(tmp_path, max_to_keep=2, save_async=True)
  state = ckpt.get_experiment_state("latest")
  state.global_step = 1
  state.experiment_module = _Module(mesh, 1)
  expected = jax.device_get(state.experiment_module.snapshot_state())
  ckpt.save("latest")
  manifest = tmp_path / "latest" / "1" / ck.training.MANIFEST_NAME
  assert not manifest.exists() and not seen  # Returned before the manifest (held by the spy).
  state.experiment_module = _Module(mesh, 2)  # Training goes on while the save finishes.
  state.global_step = 2
  release.set()
  ckpt.save("latest")  # Waits for checkpoint 1 and its manifest first.
  assert manifest.is_file() and [s["step"] for s in seen] == [1]
  ckpt.wait_for_checkpointing_to_finish()
  assert [s["step"] for s in seen] == [1, 2]
  for entry in seen:
    step_dir = tmp_path / "latest" / str(entry["step"])
    assert not entry["thread"], "the manifest was written on the training thread"
    assert entry["committed"] and not entry["tmp_left"], entry
    # The manifest describes the finished checkpoint: the same files before and after.
    final = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                   if p.is_file() and p.name != ck.training.MANIFEST_NAME)
    assert entry["files"] == final and final
    assert ck.verify_manifest(step_dir)
  ckpt.close()

  # The newest is restored bit for bit; then the older one, after the newest is removed.
  got = _restored(tmp_path, mesh).experiment_module.snapshot_state()
  want = _Module(mesh, 2).snapshot_state()
  for key in want:
    np.testing.assert_array_equal(_bits(got[key]), _bits(want[key]), err_msg=key)
  shutil.rmtree(tmp_path / "latest" / "2")
  got = _restored(tmp_path, mesh).experiment_module.snapshot_state()
  for key in expected:
    np.testing.assert_array_equal(_bits(got[key]), _bits(expected[key]), err_msg=key)


def test_async_save_failure_is_raised_by_the_next_wait_and_cleaned_up(tmp_path, mesh,
                                                                     monkeypatch):
  ckpt = ck.OrbaxCheckpointer(tmp_path, max_to_keep=2, save_async=True)
  state = ckpt.get_experiment_state("latest")
  state.global_step = 1
  state.experiment_module = _Module(mesh, 1)
  ckpt.save("latest")
  ckpt.wait_for_checkpointing_to_finish()
  path_type = type(epath.Path(str(tmp_path)))
  real_write_text = path_type.write_text

  def full(self, *args, **kwargs):
    if str(self).startswith(str(tmp_path)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real_write_text(self, *args, **kwargs)
  with monkeypatch.context() as patch:
    patch.setattr(path_type, "write_text", full)
    state.global_step = 2
    with pytest.raises(ck.CheckpointError,
                       match=rf"saving checkpoint 2 to '{tmp_path}/latest' failed \(the disk is "
                             r"full.*the complete checkpoints there are \[1\]"):
      ckpt.save("latest")  # Fails here or in the background ...
      ckpt.wait_for_checkpointing_to_finish()  # ... and is raised here.
  assert sorted(os.listdir(tmp_path / "latest")) == ["1"]
  state.global_step = 3
  ckpt.save("latest")  # Space again: the same checkpointer saves.
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "latest")) == ["1", "3"]
  assert ck.verify_manifest(tmp_path / "latest" / "3")
