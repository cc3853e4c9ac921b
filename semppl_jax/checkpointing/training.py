"""Orbax training checkpoints: pytrees of arrays, and readers of the jaxline checkpointer's.

:func:`save_state` / :func:`restore_latest` / :func:`latest_step` store any pytree of arrays with
Orbax (written to a temporary directory and renamed when complete, keeping the last
``max_to_keep``), each with a checksum manifest (:mod:`.manifest`).
:func:`read_experiment_snapshot` / :func:`newest_checkpoint_dir` read what the jaxline
checkpointer (:class:`~semppl_jax.checkpointing.experiment_checkpointer.OrbaxCheckpointer`)
wrote; the Orbax helpers here are shared with it. Orbax saves are collective: with several
processes every process must call save.
"""
import errno
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterable, Mapping

from etils import epath
import jax
import numpy as np

from semppl_jax.checkpointing.errors import CheckpointError, clip
# Re-exported: callers name them here (checkpointing.training.MANIFEST_NAME ...).
from semppl_jax.checkpointing.manifest import MANIFEST_NAME  # noqa: F401
from semppl_jax.checkpointing.manifest import verify_manifest
from semppl_jax.checkpointing.manifest import write_manifest

# Items of a checkpoint written by the jaxline checkpointer (experiment_checkpointer.py).
META_ITEM = "jaxline_meta"
MODULE_KEY = "experiment_module"


def _ocp():
  # Imported lazily: Orbax pulls in TensorStore & co., which release-checkpoint users need not.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _dir(directory: Any) -> str:
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


def _check_max_to_keep(max_to_keep: Any) -> int:
  if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
    raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
  return max_to_keep


def _is_host_local(x: Any) -> bool:
  """Whether ``x`` is a jax.Array that only this process holds in a multi-process run.

  Orbax saves a jax.Array collectively, each process writing its shards, so it refuses arrays
  that are not global (e.g. jaxline's ``train_step_rng``, a ``SingleDeviceSharding`` key). These
  are stored as numpy instead, which Orbax writes once, from process 0.
  """
  return isinstance(x, jax.Array) and jax.process_count() > 1 and x.is_fully_addressable


def _savable(tree: Any, what: str) -> Any:
  """Leaves Orbax's StandardSave accepts: global jax arrays, numpy arrays, Python int / float.

  Host-local jax arrays of a multi-process run become numpy (process 0's copy is written).
  """
  def leaf(path, x):
    if _is_host_local(x):
      return np.asarray(x)
    if isinstance(x, (jax.Array, np.ndarray)) or (isinstance(x, (int, float))
                                                  and not isinstance(x, bool)):
      return x
    if isinstance(x, (np.generic, bool)):
      return np.asarray(x)
    raise ValueError(f"{what}{jax.tree_util.keystr(path)}: cannot store a "
                     f"{type(x).__name__} in an array checkpoint (arrays and numbers only)")
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _abstract(tree: Any, what: str) -> Any:
  """Restore target: jax arrays -> ShapeDtypeStruct with their sharding; others as they are.

  Host-local jax arrays of a multi-process run are read as numpy (see :func:`_like_template`).
  """
  def leaf(path, x):
    if _is_host_local(x):
      return np.asarray(x)
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, (np.generic, bool)):
      return np.asarray(x)
    if isinstance(x, (np.ndarray, int, float)):
      return x
    raise ValueError(f"{what}{jax.tree_util.keystr(path)}: cannot restore into a "
                     f"{type(x).__name__} (arrays, ShapeDtypeStruct and numbers only)")
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _like_template(restored: Any, template: Any) -> Any:
  """Gives numpy-scalar / bool leaves of the template their type back (saved as 0-d arrays),
  and host-local jax-array leaves (restored as numpy) the template's device placement."""
  def leaf(r, t):
    if _is_host_local(t):
      return jax.device_put(r, t.sharding)
    if isinstance(t, bool):
      return bool(r)
    if isinstance(t, np.generic):
      return np.asarray(r, dtype=t.dtype)[()]
    return r
  return jax.tree_util.tree_map(leaf, restored, template)


def _manager(directory: str, max_to_keep: int | None = None, *, save_async: bool = False,
             read_only: bool = False, single_item: bool = False):
  """An Orbax CheckpointManager; ``single_item``: one pytree per step (:func:`save_state`).

  Declaring the single item up front keeps Orbax from inferring the layout from the newest
  step directory, which fails for every step when the newest one is empty or damaged.
  """
  ocp = _ocp()
  # A writer removes the temporary directories of saves that crashed (Orbax's own
  # '*.orbax-checkpoint-tmp*' names only) when it starts.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=save_async, read_only=read_only,
      create=not read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers=ocp.StandardCheckpointHandler() if single_item else None)


def _tmp_dirs(directory: str) -> set[str]:
  """Names of Orbax's temporary directories (unfinished saves) directly under ``directory``."""
  if "://" in directory or not os.path.isdir(directory):
    return set()
  return {n for n in os.listdir(directory) if _ocp().path.step.TMP_DIR_SUFFIX in n}


# How long a failed save's temporary directory is watched after its removal.
_SETTLE_S = 1.0


def _remove_own_tmp_dirs(directory: str, step: int, before: set[str]) -> None:
  """Removes the temporary directories of this save of ``step`` only: those named for ``step``
  that were not there before it started (never another writer's save in progress).

  A failed save is reported at its first error, while Orbax's other writers of that save (its
  helper threads, TensorStore) may still create files there for a moment, re-creating the
  directory after a first removal (seen with asynchronous saves on a full disk); so it is
  removed again for :data:`_SETTLE_S` seconds. Failure paths only.
  """
  deadline = time.monotonic() + _SETTLE_S
  while True:
    for name in _tmp_dirs(directory) - before:
      if name.split(".", 1)[0] == str(step):
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if time.monotonic() > deadline:
      return
    time.sleep(0.05)


def _complete_steps(directory: str) -> list[int]:
  if "://" in directory or not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _save_failed(directory: str, step: int, error: Exception,
                 tmp_before: set[str]) -> CheckpointError:
  """The error for a failed save, after removing the temporary files this save left."""
  _remove_own_tmp_dirs(directory, step, tmp_before)
  text = str(error)
  # TensorStore puts the OS error at the end of a long message; name the common cause first.
  disk_full = (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text
               or "os_error_code='28'" in text)
  cause = "the disk is full: " if disk_full else ""
  kept = _complete_steps(directory)
  return CheckpointError(
      f"saving checkpoint {step} to {directory!r} failed ({cause}{type(error).__name__}: "
      f"{clip(text, 300)}); this save's temporary files were removed, the complete "
      f"checkpoints there are {kept or 'none'}")


class ResumeRefused(CheckpointError):
  """The run being resumed was saved with a config that differs in a run-defining field."""


def _restore_newest_readable(where: str, steps: Iterable[int],
                             restore_step: Callable[[int], Any]) -> tuple[int, Any]:
  """``(step, restore_step(step))`` for the newest step that ``restore_step`` can read.

  A checkpoint that fails (corrupt or missing files, an empty step directory, a layout that
  does not fit) is logged with its reason and the next older one is tried.

  Raises:
    CheckpointError: no step could be restored; lists each step's reason.
  """
  failures = []
  for step in sorted(steps, reverse=True):
    try:
      value = restore_step(step)
    except ResumeRefused:
      raise  # Not damage: an older checkpoint of the same run would be refused as well.
    except Exception as e:  # pylint: disable=broad-except
      # Orbax and TensorStore report unreadable data with many types (ValueError, KeyError,
      # FileNotFoundError, OSError, TypeError, their own errors ...).
      reason = f"{type(e).__name__}: {clip(str(e), 300)}"
      logging.warning("Checkpoint %s/%s cannot be restored (%s); trying an older one.", where,
                      step, reason)
      failures.append(f"{where}/{step}: {reason}")
      continue
    if failures:
      logging.warning("Restored %s/%s, the newest readable checkpoint (%d newer ones are not).",
                      where, step, len(failures))
    return step, value
  raise CheckpointError(f"no checkpoint in {where!r} could be restored: " + "; ".join(failures))


def save_state(directory: Any, step: int, state_tree: Any, *, max_to_keep: int) -> str:
  """Saves a pytree of arrays as Orbax checkpoint ``step`` under ``directory``.

  Orbax writes into a temporary directory and renames it when complete, so a crash never
  leaves a half-written checkpoint behind; only the newest ``max_to_keep`` steps are kept.
  Shardings are recorded; restore onto the same or another layout with :func:`restore_latest`.
  Returns after the checkpoint is complete on disk.

  Args:
    directory: checkpoint root (created if missing).
    step: int >= 0, larger than every step already saved there.
    state_tree: pytree whose leaves are jax arrays (any sharding), numpy arrays / scalars or
      Python numbers.
    max_to_keep: number of newest checkpoints kept (>= 1).

  Returns:
    The directory of the new checkpoint.

  Raises:
    ValueError: bad ``step`` / ``max_to_keep``, an unsupported leaf type, or ``step`` already
      saved (or older than the latest).
    CheckpointError: the write failed (e.g. disk full); what it wrote is removed and the
      complete checkpoints are kept (the error lists them).
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an int >= 0, got {step!r}")
  step = int(step)
  tree = _savable(state_tree, "state_tree")
  ocp = _ocp()
  directory = _dir(directory)
  with _manager(directory, _check_max_to_keep(max_to_keep), single_item=True) as manager:
    latest = manager.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"step must be larger than the latest saved step {latest} in "
                       f"{directory!r}, got {step}")
    tmp_before = _tmp_dirs(directory)
    try:
      manager.save(step, args=ocp.args.StandardSave(tree))
      manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise _save_failed(directory, step, e, tmp_before) from e
  write_manifest(os.path.join(directory, str(step)))
  return os.path.join(directory, str(step))


def latest_step(directory: Any) -> int | None:
  """The newest complete checkpoint step under ``directory``, or None (also if it is absent)."""
  directory = _dir(directory)
  if "://" not in directory and not os.path.isdir(directory):
    return None
  with _manager(directory, read_only=True) as manager:
    return manager.latest_step()


def restore_latest(directory: Any, target_tree: Any) -> tuple[int, Any] | None:
  """Restores the newest checkpoint under ``directory`` into the structure of ``target_tree``.

  Args:
    directory: checkpoint root written by :func:`save_state`.
    target_tree: pytree with the saved structure; its leaves give each restored leaf's
      placement: a ``jax.Array`` or ``jax.ShapeDtypeStruct(sharding=...)`` comes back as a
      ``jax.Array`` with that sharding (a sharded queue comes back sharded), a numpy array /
      scalar comes back as numpy, a Python number as a Python number.

  A checkpoint that cannot be restored (a file failing its checksum, corrupt, an empty step
  directory, not matching ``target_tree``) is logged as a warning and the next older one is
  tried.

  Returns:
    ``(step, tree)`` of the newest restorable checkpoint, or None when there is no checkpoint.

  Raises:
    CheckpointError: no checkpoint can be restored (each one's reason is listed; e.g. none
      matches ``target_tree`` in structure or shapes).
    ValueError: ``target_tree`` has leaves of an unsupported type.
  """
  if latest_step(directory) is None:
    return None
  ocp = _ocp()
  target = _abstract(target_tree, "target_tree")

  def restore_step(manager, step):
    verify_manifest(os.path.join(_dir(directory), str(step)))
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  with _manager(_dir(directory), read_only=True, single_item=True) as manager:
    step, restored = _restore_newest_readable(
        _dir(directory), manager.all_steps(), lambda step: restore_step(manager, step))
  return step, _like_template(restored, target_tree)


def _checkpoint_dirs(path: Any) -> list[str]:
  """The complete checkpoint directories under ``path``, newest first (see
  :func:`newest_checkpoint_dir`)."""
  # epath: local paths and bucket URLs (gs://...) alike.
  root = epath.Path(_dir(path))
  if not root.is_dir():
    raise CheckpointError(f"{path!r} is not a directory; expected a run's "
                          "'<checkpoint_dir>/checkpoints' (e.g. runs/fashion_mnist/checkpoints).")
  if (root / MODULE_KEY).is_dir():
    return [str(root)]
  series = root / "latest"
  series = series if series.is_dir() else root
  if latest_step(str(series)) is None:
    raise CheckpointError(f"no complete checkpoint under {path!r}; expected a run's "
                          "'<checkpoint_dir>/checkpoints' with a 'latest/<n>' checkpoint.")
  with _manager(str(series), read_only=True) as manager:
    steps = sorted(manager.all_steps(), reverse=True)
  return [str(series / str(step)) for step in steps]


def newest_checkpoint_dir(path: Any) -> str:
  """The newest complete checkpoint written by :class:`OrbaxCheckpointer`.

  Args:
    path: the checkpointer's root (``<checkpoint_dir>/checkpoints``; its ``latest`` series is
      used), a series directory, or one checkpoint directory.

  Returns:
    the checkpoint directory (``.../<series>/<n>``); not verified (see
    :func:`read_experiment_snapshot`).

  Raises:
    CheckpointError: ``path`` is not a directory or holds no complete checkpoint.
  """
  return _checkpoint_dirs(path)[0]


def _read_snapshot_dir(step_dir: str, select: Any) -> tuple[int | None, Any]:
  """:func:`read_experiment_snapshot` of one checkpoint directory (any failure raises)."""
  ocp = _ocp()
  verify_manifest(step_dir)
  item_dir = epath.Path(step_dir) / MODULE_KEY
  handler = ocp.PyTreeCheckpointer()
  metadata = handler.metadata(item_dir)
  item_metadata = getattr(metadata, "item_metadata", None)
  if item_metadata is None or getattr(item_metadata, "tree", None) is None:
    raise CheckpointError(f"{step_dir}: the metadata of {MODULE_KEY} is unreadable")
  tree = item_metadata.tree["value"]
  try:
    wanted = {"value": select(tree) if select is not None else tree}
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{step_dir!r} does not hold the expected experiment snapshot "
                          f"({type(e).__name__}: {e}).") from e
  item = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), wanted)
  restore_args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=select is not None))["value"]
  global_step = None
  meta_dir = epath.Path(step_dir) / META_ITEM
  if meta_dir.is_dir():
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    entry = meta.get("json", {}).get("global_step")
    global_step = None if entry is None else int(from_json_entry(entry))
  return global_step, jax.tree_util.tree_map(np.asarray, restored)


def read_experiment_snapshot(path: Any, *, select: Any = None) -> tuple[int | None, Any]:
  """Reads an experiment's snapshot from a checkpoint written by :class:`OrbaxCheckpointer`,
  without building the experiment (host numpy arrays, no template needed).

  Every file is first checked against the checkpoint's checksum manifest. Given a run or a
  series, the newest checkpoint that verifies and reads is used: a damaged one is skipped with
  a warning naming it and why (as a resumed run does).

  Args:
    path: as for :func:`newest_checkpoint_dir`.
    select: optional function from the snapshot's metadata tree (same structure, metadata
      leaves) to the sub-tree to read; only that part is read from disk (partial restore).

  Returns:
    ``(global_step, snapshot)``: the jaxline global step of the checkpoint (None if absent) and
    the experiment module's ``snapshot_state()`` tree (or the selected part) as numpy arrays.

  Raises:
    CheckpointError: no checkpoint, none readable (each one's reason listed), or ``select``
      does not fit the snapshot. Never another exception type for a damaged checkpoint.
  """
  step_dirs = _checkpoint_dirs(path)
  failures = []
  for step_dir in step_dirs:
    try:
      result = _read_snapshot_dir(step_dir, select)
    except Exception as e:  # pylint: disable=broad-except
      # Orbax reports damaged files with many types (ValueError, KeyError, AttributeError on
      # unreadable metadata, TensorStore errors ...).
      if isinstance(e, CheckpointError) and "does not hold the expected" in str(e):
        raise
      reason = f"{type(e).__name__}: {clip(str(e), 300)}"
      logging.warning("Checkpoint %s cannot be read (%s); trying an older one.", step_dir,
                      reason)
      failures.append(f"{step_dir}: {reason}")
      continue
    if failures:
      logging.warning("Read %s, the newest readable checkpoint (%d newer ones are not).",
                      step_dir, len(failures))
    return result
  raise CheckpointError(f"no checkpoint under {os.fspath(path)!r} could be read: "
                        + "; ".join(failures))


def _check_shapes(step_dir: str, template: Any) -> None:
  """Raises :class:`ResumeRefused` naming every leaf of the experiment snapshot whose saved shape
  differs from this run's (a config that sizes it changed); unreadable metadata is left to the
  restore to report."""
  try:
    saved = _ocp().PyTreeCheckpointer().metadata(
        epath.Path(step_dir) / MODULE_KEY).item_metadata.tree["value"]
    saved_shapes = {jax.tree_util.keystr(p): tuple(m.shape)
                    for p, m in jax.tree_util.tree_leaves_with_path(saved)}
  except Exception:  # pylint: disable=broad-except
    return
  diffs = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(template):
    name = jax.tree_util.keystr(path)
    shape = tuple(np.shape(leaf))
    if name in saved_shapes and saved_shapes[name] != shape:
      diffs.append(f"  {name}: saved {saved_shapes[name]}, this run {shape}")
  if diffs:
    shown = diffs[:20] + ([f"  ... and {len(diffs) - 20} more"] if len(diffs) > 20 else [])
    raise ResumeRefused(
        f"refusing to resume {step_dir}: {len(diffs)} array(s) of the saved state have another "
        "shape than this run's (a config field that sizes them changed: network width or head "
        "sizes, queue size, number of views or classes ...):\n" + "\n".join(shown))


def json_entry(value: Any) -> dict | None:
  """JSON form of a scalar / string / None experiment-state entry; None if it is not one."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return {"value": value, "numpy_dtype": None}
  if isinstance(value, np.generic) and value.dtype.kind in "biuf":
    return {"value": value.item(), "numpy_dtype": value.dtype.str}
  return None


def from_json_entry(entry: Mapping) -> Any:
  if entry["numpy_dtype"] is None:
    return entry["value"]
  return np.asarray(entry["value"], dtype=np.dtype(entry["numpy_dtype"]))[()]
