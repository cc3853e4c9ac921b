"""Orbax training checkpoints: pytrees of arrays, and a jaxline checkpointer.

:func:`save_state` / :func:`restore_latest` / :func:`latest_step` store any pytree of arrays with
Orbax (written to a temporary directory and renamed when complete, keeping the last
``max_to_keep``). :class:`OrbaxCheckpointer` is a disk checkpointer for jaxline 0.0.8
(``platform.main(..., checkpointer_factory=...)``) with the interface of jaxline's
``InMemoryCheckpointer``. Orbax saves are collective: with several processes every process must
call save (jaxline: ``train_checkpoint_all_hosts=True``).
"""
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Iterable, Mapping

from etils import epath
import jax
import numpy as np

from semppl_jax.checkpointing.errors import CheckpointError, clip


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


def _remove_own_tmp_dirs(directory: str, step: int, before: set[str]) -> None:
  """Removes the temporary directories of this save of ``step`` only: those named for ``step``
  that were not there before it started (never another writer's save in progress)."""
  for name in _tmp_dirs(directory) - before:
    if name.split(".", 1)[0] == str(step):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


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


MANIFEST_NAME = "semppl_manifest.json"
_HASH = "sha256"
_CHUNK = 1 << 22


class ResumeRefused(CheckpointError):
  """The run being resumed was saved with a config that differs in a run-defining field."""


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, _HASH).hexdigest()


def _data_files(step_dir: str) -> list[str]:
  """Paths (relative, sorted) of every file of a checkpoint directory but the manifest."""
  out = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST_NAME and not name.startswith(f".{MANIFEST_NAME}."):
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: Any) -> None:
  """Writes ``<step_dir>/semppl_manifest.json``: the size and SHA-256 of every file of a
  complete (committed) checkpoint, written atomically (temporary file, fsync, rename).

  Local directories only; a bucket URL is left without a manifest (restores then say it is
  unverified). Written by process 0 only (Orbax's primary host, which commits the checkpoint
  after every process has written its shards); every process verifies it on restore.
  """
  step_dir = os.fspath(step_dir)
  if "://" in step_dir or jax.process_index() != 0:
    return
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 _HASH: _file_digest(os.path.join(step_dir, rel))}
           for rel in _data_files(step_dir)}
  tmp = os.path.join(step_dir, f".{MANIFEST_NAME}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w") as f:
      json.dump({"algorithm": _HASH, "files": files}, f, indent=0, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST_NAME))
  except OSError as e:
    # The checkpoint itself is complete; without a manifest it is restored unverified.
    if os.path.exists(tmp):
      os.unlink(tmp)
    logging.warning("Checkpoint %s is complete, but its checksum manifest could not be written "
                    "(%s); it will be restored unverified.", step_dir, e)


def verify_manifest(step_dir: Any) -> bool:
  """Checks every file of a checkpoint against its manifest (:func:`write_manifest`).

  Returns:
    True when verified; False when the checkpoint has no manifest (written before manifests
    existed, by a run killed between committing the checkpoint and writing it, or on a bucket):
    a warning says it is unverified.

  Raises:
    CheckpointError: the manifest is unreadable, or a listed file is missing, has another size
      or another checksum (naming the file and the checkpoint).
  """
  step_dir = os.fspath(step_dir)
  if "://" in step_dir:
    return False
  path = os.path.join(step_dir, MANIFEST_NAME)
  if not os.path.exists(path):
    logging.warning("Checkpoint %s has no checksum manifest (%s); its files are not verified.",
                    step_dir, MANIFEST_NAME)
    return False
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
    if manifest["algorithm"] != _HASH or not isinstance(files, dict):
      raise ValueError(f"algorithm {manifest['algorithm']!r}")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"checkpoint {step_dir}: its checksum manifest {MANIFEST_NAME} is "
                          f"unreadable ({type(e).__name__}: {clip(str(e), 200)})") from None
  for rel, entry in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    try:
      size = os.path.getsize(full)
      digest = _file_digest(full) if size == entry["size"] else None
    except FileNotFoundError:
      raise CheckpointError(f"checkpoint {step_dir}: file {rel} is missing (listed in "
                            f"{MANIFEST_NAME})") from None
    except (OSError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint {step_dir}: file {rel} cannot be checked "
                            f"({type(e).__name__}: {clip(str(e), 200)})") from None
    if size != entry["size"]:
      raise CheckpointError(f"checkpoint {step_dir}: file {rel} has {size:,} bytes, its "
                            f"manifest says {entry['size']:,} (truncated or rewritten)")
    if digest != entry.get(_HASH):
      raise CheckpointError(f"checkpoint {step_dir}: file {rel} fails its {_HASH} checksum "
                            "(its bytes changed after the save: a flipped bit or an overwrite)")
  return True


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
  if (root / _MODULE_KEY).is_dir():
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
  item_dir = epath.Path(step_dir) / _MODULE_KEY
  handler = ocp.PyTreeCheckpointer()
  metadata = handler.metadata(item_dir)
  item_metadata = getattr(metadata, "item_metadata", None)
  if item_metadata is None or getattr(item_metadata, "tree", None) is None:
    raise CheckpointError(f"{step_dir}: the metadata of {_MODULE_KEY} is unreadable")
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
  meta_dir = epath.Path(step_dir) / _META_ITEM
  if meta_dir.is_dir():
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    entry = meta.get("json", {}).get("global_step")
    global_step = None if entry is None else int(_from_json_entry(entry))
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
        epath.Path(step_dir) / _MODULE_KEY).item_metadata.tree["value"]
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


class ExperimentState:
  """Attribute container jaxline's train/eval loops fill (``global_step``, ``experiment_module``,
  ``train_step_rng``, ``best_eval_metric_value`` ...); one per checkpoint series."""

  def __init__(self):
    object.__setattr__(self, "_values", {})

  def __getattr__(self, name: str) -> Any:
    try:
      return self._values[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name: str, value: Any) -> None:
    self._values[name] = value

  def __delattr__(self, name: str) -> None:
    del self._values[name]

  def __contains__(self, name: str) -> bool:
    return name in self._values

  def __getitem__(self, name: str) -> Any:
    return self._values[name]

  def __setitem__(self, name: str, value: Any) -> None:
    self._values[name] = value

  def items(self):
    """``(name, value)`` pairs, in assignment order."""
    return list(self._values.items())

  def keys(self):
    """Attribute names, in assignment order."""
    return list(self._values)

  def to_dict(self) -> dict:
    """A shallow dict copy."""
    return dict(self._values)


_META_ITEM = "jaxline_meta"
_MODULE_KEY = "experiment_module"
_SERIES_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _json_entry(value: Any) -> dict | None:
  """JSON form of a scalar / string / None experiment-state entry; None if it is not one."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return {"value": value, "numpy_dtype": None}
  if isinstance(value, np.generic) and value.dtype.kind in "biuf":
    return {"value": value.item(), "numpy_dtype": value.dtype.str}
  return None


def _from_json_entry(entry: Mapping) -> Any:
  if entry["numpy_dtype"] is None:
    return entry["value"]
  return np.asarray(entry["value"], dtype=np.dtype(entry["numpy_dtype"]))[()]


class OrbaxCheckpointer:
  """jaxline 0.0.8 checkpointer writing Orbax checkpoints to disk (``InMemoryCheckpointer`` API).

  Each ``save(series)`` writes one Orbax checkpoint ``directory/<series>/<global_step>`` (the
  series' jaxline ``global_step``; a state without one is numbered after the newest) holding, from
  the series' experiment state: the experiment module's ``snapshot_state()`` pytree (item
  ``experiment_module``), every other array-valued entry (``train_step_rng`` ...) as its own item,
  and the scalar / string / None entries (``global_step``, ``best_eval_metric_value`` ...) as
  JSON. Only the newest ``max_to_keep`` are kept. A save at the global step of the newest
  checkpoint is skipped: jaxline's final save repeats its last periodic one, and nothing has
  changed in between. ``restore(series)`` restores the newest one into the current state: the
  module snapshot is restored with the current ``experiment_module.snapshot_state()`` as the
  template (so each array comes back with the template's sharding and dtype) and handed to
  ``restore_from_snapshot``; other array entries use their current value as the template, or come
  back as host numpy arrays when the current value is None. A new checkpointer on the same
  directory (a restarted job) sees the saved checkpoints.

  Integrity: once a checkpoint is complete on disk, a manifest of its files' SHA-256 sums is
  written into it (:func:`write_manifest`); ``restore`` verifies it first, so a flipped bit or
  a torn copy is a damaged checkpoint (skipped with a warning naming the file and the step).

  Run identity: ``run_metadata`` (e.g. the resolved config and the package version) is stored
  with every checkpoint; on ``restore`` the stored one is handed to ``check_resume``, which
  raises :class:`ResumeRefused` to refuse resuming (that is never skipped like damage).

  Args:
    directory: root directory (local path or an Orbax-supported URL).
    max_to_keep: checkpoints kept per series (>= 1).
    save_async: write in a background thread (``save`` returns after the device-to-host copy);
      ``wait_for_checkpointing_to_finish`` waits for it.
    run_metadata: JSON-serialisable mapping stored with every checkpoint.
    check_resume: ``check_resume(stored_run_metadata_or_None, checkpoint_dir)``, called before
      a checkpoint is restored.
  """

  def __init__(self, directory: Any, max_to_keep: int, save_async: bool = False, *,
               run_metadata: Mapping[str, Any] | None = None,
               check_resume: Callable[[Any, str], None] | None = None):
    self._directory = _dir(directory)
    self._max_to_keep = _check_max_to_keep(max_to_keep)
    self._save_async = bool(save_async)
    self._run_metadata = None if run_metadata is None else json.loads(json.dumps(run_metadata))
    self._check_resume = check_resume
    self._states: dict[str, ExperimentState] = {}
    self._managers: dict[str, Any] = {}
    # Series -> steps newer than the one restore() fell back to.
    self._unreadable: dict[str, set[int]] = {}
    # Series -> (step, temporary directories before it) of the last save started.
    self._pending: dict[str, tuple[int, set[str]]] = {}

  def _series_manager(self, series: str):
    if not isinstance(series, str) or not _SERIES_NAME.fullmatch(series) or series in (".", ".."):
      raise ValueError(f"ckpt_series must be a plain name ([A-Za-z0-9_.-]+), got {series!r}")
    if series not in self._managers:
      manager = _manager(os.path.join(self._directory, series), self._max_to_keep,
                         save_async=self._save_async)
      self._managers[series] = manager
    return self._managers[series]

  def get_experiment_state(self, ckpt_series: str) -> ExperimentState:
    """The mutable experiment state of a series (created empty on first use)."""
    self._series_manager(ckpt_series)
    return self._states.setdefault(ckpt_series, ExperimentState())

  def save(self, ckpt_series: str) -> None:
    """Writes the series' current experiment state as a new checkpoint.

    Raises:
      ValueError: an entry cannot be stored (e.g. a string inside the module snapshot).
    """
    ocp = _ocp()
    manager = self._series_manager(ckpt_series)
    state = self.get_experiment_state(ckpt_series)
    items, meta = {}, {"json": {}, "arrays": []}
    for key, value in state.items():
      if key == _MODULE_KEY:
        value = value.snapshot_state()
      elif (entry := _json_entry(value)) is not None:
        meta["json"][key] = entry
        continue
      items[key] = ocp.args.StandardSave({"value": _savable(value, key)})
      meta["arrays"].append(key)
    if self._run_metadata is not None:
      meta["run"] = self._run_metadata
    items[_META_ITEM] = ocp.args.JsonSave(meta)
    self._finish_manifest(ckpt_series)
    number = self._checkpoint_number(ckpt_series, state)
    if number is None:
      return
    series_dir = os.path.join(self._directory, ckpt_series)
    tmp_before = _tmp_dirs(series_dir)
    self._pending[ckpt_series] = (number, tmp_before)
    try:
      manager.save(number, args=ocp.args.Composite(**items))
      if not self._save_async:
        manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._pending.pop(ckpt_series, None)
      self._drop_manager(ckpt_series)
      raise _save_failed(series_dir, number, e, tmp_before) from e
    if not self._save_async:
      self._finish_manifest(ckpt_series)
    logging.info("Saved checkpoint %s/%s.", ckpt_series, number)

  def _finish_manifest(self, ckpt_series: str) -> None:
    """Writes the manifest of the series' last save once it is complete on disk."""
    pending = self._pending.pop(ckpt_series, None)
    if pending is None:
      return
    self._managers[ckpt_series].wait_until_finished()
    step_dir = os.path.join(self._directory, ckpt_series, str(pending[0]))
    if os.path.isdir(step_dir):
      write_manifest(step_dir)

  def _drop_manager(self, ckpt_series: str) -> None:
    """Forgets a series' manager after a failed save (the next use opens a fresh one)."""
    manager = self._managers.pop(ckpt_series)
    try:
      manager.close()
    except Exception:  # pylint: disable=broad-except
      logging.warning("Closing the checkpoint manager of %s after a failed save failed too.",
                      ckpt_series)

  def _checkpoint_number(self, ckpt_series: str, state: ExperimentState) -> int | None:
    """The directory number of the next save: the global step; None if it is already saved.

    Raises:
      CheckpointError: the global step is not an int >= 0, or older than the newest checkpoint
        (two runs writing to one directory).
    """
    manager = self._managers[ckpt_series]
    # Checkpoints that restore() found unreadable are replaced, not kept as the newest ones.
    for bad in sorted(self._unreadable.pop(ckpt_series, ())):
      logging.warning("Removing the unreadable checkpoint %s/%s/%s before saving.",
                      self._directory, ckpt_series, bad)
      manager.delete(bad)
    latest = manager.latest_step()
    step = state.global_step if "global_step" in state else None
    if step is None:
      return 0 if latest is None else latest + 1
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise CheckpointError(f"{ckpt_series}: global_step must be an int >= 0 to number the "
                            f"checkpoint, got {step!r}")
    step = int(step)
    if latest is not None and step == latest:
      logging.info("Checkpoint %s/%s exists; nothing to save.", ckpt_series, step)
      return None
    if latest is not None and step < latest:
      raise CheckpointError(
          f"cannot save {ckpt_series} at global step {step}: {self._directory}/{ckpt_series} "
          f"already holds the newer checkpoint {latest} (is another run writing there?)")
    return step

  def _latest(self, ckpt_series: str) -> int | None:
    manager = self._series_manager(ckpt_series)
    manager.reload()  # See checkpoints written by other checkpointers (eval vs train).
    return manager.latest_step()

  def can_be_restored(self, ckpt_series: str) -> bool:
    """Whether the series has a complete checkpoint on disk."""
    return self._latest(ckpt_series) is not None

  def restore_path(self, ckpt_series: str) -> str | None:
    """Directory of the newest checkpoint of the series, or None."""
    step = self._latest(ckpt_series)
    return None if step is None else os.path.join(self._directory, ckpt_series, str(step))

  def check_resume(self, ckpt_series: str) -> None:
    """Runs ``check_resume`` on the newest checkpoint of the series now (before any state is
    built); a checkpoint whose metadata is unreadable is left to :meth:`restore`.

    Raises:
      ResumeRefused: from ``check_resume``.
    """
    if self._check_resume is None or self._latest(ckpt_series) is None:
      return
    ocp = _ocp()
    step = self._managers[ckpt_series].latest_step()
    try:
      meta = self._managers[ckpt_series].restore(step, args=ocp.args.Composite(
          **{_META_ITEM: ocp.args.JsonRestore()}))[_META_ITEM]
    except Exception:  # pylint: disable=broad-except
      return  # Damaged: restore() reports it and falls back (and checks the older one).
    self._check_resume(meta.get("run"), os.path.join(self._directory, ckpt_series, str(step)))

  def restore(self, ckpt_series: str) -> None:
    """Restores the newest readable checkpoint into the series' experiment state.

    A checkpoint that cannot be restored (files failing their checksums, corrupt or missing
    files, an empty step directory, entries that do not fit the current state) is logged as a
    warning naming its directory and the reason, and the next older one is tried; the state is
    only changed by the one that restores completely.

    Raises:
      CheckpointError: no checkpoint, or none can be restored (each one's reason is listed).
      ResumeRefused: ``check_resume`` refused the stored run metadata, or arrays of the saved
        snapshot have other shapes than the current state's (each named); older checkpoints
        are not tried (they belong to the same run).
    """
    if self._latest(ckpt_series) is None:
      raise CheckpointError(f"no checkpoint to restore in {self._directory}/{ckpt_series}")
    manager = self._managers[ckpt_series]
    state = self.get_experiment_state(ckpt_series)
    steps = manager.all_steps()
    step, values = _restore_newest_readable(
        os.path.join(self._directory, ckpt_series), steps,
        lambda step: self._read_step(manager, ckpt_series, step, state))
    self._unreadable[ckpt_series] = {s for s in steps if s > step}
    for key, value in values.items():
      if key == _MODULE_KEY:
        state[key].restore_from_snapshot(value)
      else:
        state[key] = value
    logging.info("Restored checkpoint %s/%s.", ckpt_series, step)

  def _read_step(self, manager: Any, ckpt_series: str, step: int, state: ExperimentState
                 ) -> dict[str, Any]:
    """The values of checkpoint ``step`` for every entry of ``state`` (state is unchanged)."""
    ocp = _ocp()
    step_dir = os.path.join(self._directory, ckpt_series, str(step))
    verify_manifest(step_dir)
    meta = manager.restore(step, args=ocp.args.Composite(
        **{_META_ITEM: ocp.args.JsonRestore()}))[_META_ITEM]
    if self._check_resume is not None:
      self._check_resume(meta.get("run"), step_dir)
    saved = set(meta["json"]) | set(meta["arrays"])
    missing = [k for k in state.keys() if k not in saved]
    if missing:
      raise CheckpointError(f"checkpoint {ckpt_series}/{step} lacks experiment-state entries "
                            f"{missing}; it has {sorted(saved)}")
    templates, untargeted = {}, []
    for key in state.keys():
      if key not in meta["arrays"]:
        continue
      template = state[key].snapshot_state() if key == _MODULE_KEY else state[key]
      if template is None:
        untargeted.append(key)
      else:
        templates[key] = template
    if _MODULE_KEY in templates:
      _check_shapes(step_dir, templates[_MODULE_KEY])
    restored = dict(manager.restore(step, args=ocp.args.Composite(**{
        key: ocp.args.StandardRestore({"value": _abstract(t, key)})
        for key, t in templates.items()})))
    if untargeted:
      restored.update(manager.restore(step, args=ocp.args.Composite(
          **{key: ocp.args.StandardRestore() for key in untargeted})))
    values = {}
    for key in state.keys():
      if key in meta["json"]:
        values[key] = _from_json_entry(meta["json"][key])
      elif key in templates:
        values[key] = _like_template(restored[key]["value"], templates[key])
      else:
        values[key] = jax.device_get(restored[key]["value"])
    return values

  def wait_for_checkpointing_to_finish(self) -> None:
    """Blocks until every pending (async) save is on disk.

    Raises:
      CheckpointError: a pending save failed (e.g. disk full); only its own temporary files
        are removed.
    """
    for series, manager in list(self._managers.items()):
      try:
        manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        self._drop_manager(series)
        step, tmp_before = self._pending.pop(series, (manager.latest_step(), set()))
        raise _save_failed(os.path.join(self._directory, series), step, e, tmp_before) from e
      self._finish_manifest(series)

  def close(self) -> None:
    """Waits for pending saves and releases the Orbax managers (the object stays usable)."""
    for series, manager in self._managers.items():
      manager.wait_until_finished()
      self._finish_manifest(series)
      manager.close()
    self._managers.clear()
