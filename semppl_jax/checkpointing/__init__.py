"""Checkpoints: the released SemPPL pickles (safe reader, verifier, writer) and Orbax on disk.

One concern per module; every public name is re-exported here, so
``from semppl_jax import checkpointing; checkpointing.X`` is the public API (docs/design.md §4):

* :mod:`.errors`: :class:`CheckpointError` (a ``ValueError``) raised for every bad checkpoint.
* :mod:`.unpickler`: the allow-list unpickler (:data:`ALLOWED_GLOBALS`), which never imports a
  module named by the file and bounds the memory / nesting a hostile file can make it use.
* :mod:`.release`: the release ``.pkl`` format (:func:`load_released_checkpoint`,
  :func:`verify_released_checkpoint`, :func:`expected_tree` ...).
* :mod:`.export`: :func:`export_release_checkpoint`, the writer of that format.
* :mod:`.training`: Orbax training checkpoints (:func:`save_state`, :func:`restore_latest`,
  :func:`read_experiment_snapshot` ...).
* :mod:`.experiment_checkpointer`: :class:`OrbaxCheckpointer`, the jaxline checkpointer
  (synchronous or asynchronous saves).
* :mod:`.manifest`: the checksum manifest of every checkpoint (:func:`write_manifest`,
  :func:`verify_manifest`).
* :mod:`.run_lock`: one writer per run directory (:func:`lock_run_directory`).
"""
from semppl_jax.checkpointing.errors import CheckpointError
from semppl_jax.checkpointing.export import export_release_checkpoint
from semppl_jax.checkpointing.release import CheckpointReport
from semppl_jax.checkpointing.release import expected_tree
from semppl_jax.checkpointing.release import load_released_checkpoint
from semppl_jax.checkpointing.release import load_released_checkpoint_full
from semppl_jax.checkpointing.release import ModuleTree
from semppl_jax.checkpointing.release import ReleasedCheckpoint
from semppl_jax.checkpointing.release import verify_checkpoint_tree
from semppl_jax.checkpointing.release import verify_released_checkpoint
from semppl_jax.checkpointing.experiment_checkpointer import ExperimentState
from semppl_jax.checkpointing.experiment_checkpointer import OrbaxCheckpointer
from semppl_jax.checkpointing.training import latest_step
from semppl_jax.checkpointing.training import newest_checkpoint_dir
from semppl_jax.checkpointing.manifest import verify_manifest
from semppl_jax.checkpointing.manifest import write_manifest
from semppl_jax.checkpointing.run_lock import lock_run_directory
from semppl_jax.checkpointing.run_lock import RunDirectoryLocked
from semppl_jax.checkpointing.run_lock import RunLock
from semppl_jax.checkpointing.training import read_experiment_snapshot
from semppl_jax.checkpointing.training import restore_latest
from semppl_jax.checkpointing.training import ResumeRefused
from semppl_jax.checkpointing.training import save_state
from semppl_jax.checkpointing.unpickler import ALLOWED_GLOBALS

__all__ = [
    "ALLOWED_GLOBALS", "CheckpointError", "CheckpointReport", "ExperimentState", "ModuleTree",
    "OrbaxCheckpointer", "ReleasedCheckpoint", "ResumeRefused", "RunDirectoryLocked", "RunLock",
    "expected_tree", "export_release_checkpoint", "latest_step", "load_released_checkpoint",
    "load_released_checkpoint_full", "lock_run_directory", "newest_checkpoint_dir",
    "read_experiment_snapshot", "restore_latest", "save_state", "verify_checkpoint_tree",
    "verify_manifest", "verify_released_checkpoint", "write_manifest",
]
