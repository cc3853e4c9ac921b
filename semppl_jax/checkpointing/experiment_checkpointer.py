"""The jaxline checkpointer: experiment states as Orbax checkpoints, optionally saved async.

:class:`OrbaxCheckpointer` is a disk checkpointer for jaxline 0.0.8
(``platform.main(..., checkpointer_factory=...)``) with the interface of jaxline's
``InMemoryCheckpointer``; :class:`ExperimentState` is the per-series state it hands jaxline.
Orbax saves are collective: with several processes every process must call save (jaxline:
``train_checkpoint_all_hosts=True``). Readers of its checkpoints that need no experiment
(:func:`~semppl_jax.checkpointing.training.read_experiment_snapshot`) are in :mod:`.training`.
"""
import json
import logging
import os
import re
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np

from semppl_jax.checkpointing.errors import CheckpointError
from semppl_jax.checkpointing.manifest import verify_manifest
from semppl_jax.checkpointing.manifest import write_manifest
from semppl_jax.checkpointing.training import _abstract
from semppl_jax.checkpointing.training import _check_max_to_keep
from semppl_jax.checkpointing.training import _check_shapes
from semppl_jax.checkpointing.training import _dir
from semppl_jax.checkpointing.training import _like_template
from semppl_jax.checkpointing.training import _manager
from semppl_jax.checkpointing.training import _ocp
from semppl_jax.checkpointing.training import _restore_newest_readable
from semppl_jax.checkpointing.training import _savable
from semppl_jax.checkpointing.training import _save_failed
from semppl_jax.checkpointing.training import _tmp_dirs
from semppl_jax.checkpointing.training import from_json_entry
from semppl_jax.checkpointing.training import json_entry
from semppl_jax.checkpointing.training import META_ITEM
from semppl_jax.checkpointing.training import MODULE_KEY

_SERIES_NAME = re.compile(r"[A-Za-z0-9_.-]+")


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


class _PendingSave:
  """One asynchronous save in flight: a thread waits for Orbax to commit the checkpoint, then
  writes its manifest. ``join`` waits for both; ``save_error`` / ``manifest_error`` then hold
  what failed (None if nothing)."""

  def __init__(self, manager: Any, series_dir: str, step: int, tmp_before: set[str]):
    self.series_dir, self.step, self.tmp_before = series_dir, step, tmp_before
    self.save_error: Exception | None = None
    self.manifest_error: Exception | None = None
    self._manager = manager
    # Not a daemon: the interpreter joins it at exit, so the save and its manifest finish.
    self._thread = threading.Thread(target=self._finish, name=f"checkpoint-{step}")
    self._thread.start()

  def _finish(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self.save_error = e  # Reported (and cleaned up) by the caller of join().
      return
    try:
      # After the commit (the rename of Orbax's temporary directory): the finished files.
      write_manifest(os.path.join(self.series_dir, str(self.step)))
    except Exception as e:  # pylint: disable=broad-except
      self.manifest_error = e

  def join(self) -> None:
    self._thread.join()


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
  written into it (:func:`~semppl_jax.checkpointing.manifest.write_manifest`); ``restore``
  verifies it first, so a flipped bit or a torn copy is a damaged checkpoint (skipped with a
  warning naming the file and the step).

  Asynchronous saves (``save_async``): ``save`` returns once Orbax holds a host copy of the
  arrays; a background thread then waits for Orbax to write and commit (rename) the checkpoint
  and writes its manifest, so the manifest always describes finished files and the hashing is
  off the training thread too. At most one save per series is in flight: the next ``save``,
  ``wait_for_checkpointing_to_finish``, ``close`` and every lookup of the series
  (``can_be_restored``, ``restore`` ...) first wait for it and raise its error, if any. The thread
  is not a daemon, so a process that ends with an exception still finishes its last save
  before it exits (and a run lock held by the process is held until then). The price is one
  host copy of the state held until its write ends.

  Run identity: ``run_metadata`` (e.g. the resolved config and the package version) is stored
  with every checkpoint; on ``restore`` the stored one is handed to ``check_resume``, which
  raises :class:`ResumeRefused` to refuse resuming (that is never skipped like damage).

  Args:
    directory: root directory (local path or an Orbax-supported URL).
    max_to_keep: checkpoints kept per series (>= 1).
    save_async: write in the background (see above); False: ``save`` returns after the
      checkpoint and its manifest are on disk.
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
    # Series -> its asynchronous save in flight.
    self._pending: dict[str, _PendingSave] = {}

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
    """Writes the series' current experiment state as a new checkpoint (in the background
    with ``save_async``, after waiting for the series' save in flight).

    Raises:
      ValueError: an entry cannot be stored (e.g. a string inside the module snapshot).
      CheckpointError: this save, or the asynchronous one before it, failed (e.g. disk full;
        its own temporary files are removed, the complete checkpoints are kept).
    """
    ocp = _ocp()
    self._join_pending(ckpt_series)  # One save in flight per series (and its errors first).
    manager = self._series_manager(ckpt_series)
    state = self.get_experiment_state(ckpt_series)
    items, meta = {}, {"json": {}, "arrays": []}
    for key, value in state.items():
      if key == MODULE_KEY:
        value = value.snapshot_state()
      elif (entry := json_entry(value)) is not None:
        meta["json"][key] = entry
        continue
      items[key] = ocp.args.StandardSave({"value": _savable(value, key)})
      meta["arrays"].append(key)
    if self._run_metadata is not None:
      meta["run"] = self._run_metadata
    items[META_ITEM] = ocp.args.JsonSave(meta)
    number = self._checkpoint_number(ckpt_series, state)
    if number is None:
      return
    series_dir = os.path.join(self._directory, ckpt_series)
    tmp_before = _tmp_dirs(series_dir)
    try:
      manager.save(number, args=ocp.args.Composite(**items))
      if not self._save_async:
        manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._drop_manager(ckpt_series)
      raise _save_failed(series_dir, number, e, tmp_before) from e
    if self._save_async:
      self._pending[ckpt_series] = _PendingSave(manager, series_dir, number, tmp_before)
      logging.info("Saving checkpoint %s/%s in the background.", ckpt_series, number)
      return
    write_manifest(os.path.join(series_dir, str(number)))
    logging.info("Saved checkpoint %s/%s.", ckpt_series, number)

  def _join_pending(self, ckpt_series: str) -> None:
    """Waits for the series' save in flight (and its manifest); raises what it failed with.

    Raises:
      CheckpointError: the save failed (e.g. disk full); only its own temporary files are
        removed, and the series' manager is replaced.
    """
    pending = self._pending.pop(ckpt_series, None)
    if pending is None:
      return
    pending.join()
    if pending.save_error is not None:
      self._drop_manager(ckpt_series)
      raise _save_failed(pending.series_dir, pending.step, pending.save_error,
                         pending.tmp_before) from pending.save_error
    if pending.manifest_error is not None:
      raise pending.manifest_error
    logging.info("Saved checkpoint %s/%s.", ckpt_series, pending.step)

  def _drop_manager(self, ckpt_series: str) -> None:
    """Forgets a series' manager after a failed save (the next use opens a fresh one), once
    Orbax's background work on that save has ended."""
    manager = self._managers.pop(ckpt_series)
    try:
      manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # The failure being reported.
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
    self._join_pending(ckpt_series)  # The background thread uses the manager until then.
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
          **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
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
      if key == MODULE_KEY:
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
        **{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
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
      template = state[key].snapshot_state() if key == MODULE_KEY else state[key]
      if template is None:
        untargeted.append(key)
      else:
        templates[key] = template
    if MODULE_KEY in templates:
      _check_shapes(step_dir, templates[MODULE_KEY])
    restored = dict(manager.restore(step, args=ocp.args.Composite(**{
        key: ocp.args.StandardRestore({"value": _abstract(t, key)})
        for key, t in templates.items()})))
    if untargeted:
      restored.update(manager.restore(step, args=ocp.args.Composite(
          **{key: ocp.args.StandardRestore() for key in untargeted})))
    values = {}
    for key in state.keys():
      if key in meta["json"]:
        values[key] = from_json_entry(meta["json"][key])
      elif key in templates:
        values[key] = _like_template(restored[key]["value"], templates[key])
      else:
        values[key] = jax.device_get(restored[key]["value"])
    return values

  def wait_for_checkpointing_to_finish(self) -> None:
    """Blocks until every pending (async) save and its manifest are on disk.

    Raises:
      CheckpointError: a pending save failed (e.g. disk full); only its own temporary files
        are removed.
    """
    for series in list(self._pending):
      self._join_pending(series)

  def close(self) -> None:
    """Waits for pending saves and releases the Orbax managers (the object stays usable).

    Raises:
      CheckpointError: as :meth:`wait_for_checkpointing_to_finish` (the managers are released
        all the same).
    """
    try:
      self.wait_for_checkpointing_to_finish()
    finally:
      for manager in self._managers.values():
        manager.close()
      self._managers.clear()
