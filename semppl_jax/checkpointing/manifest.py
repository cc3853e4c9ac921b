"""Checksum manifests of checkpoint directories: every file's size and SHA-256.

:func:`write_manifest` runs once a checkpoint is complete (committed) on disk, never before:
the manifest describes the finished files. :func:`verify_manifest` checks them before a
restore, so a flipped bit or a torn copy is a damaged checkpoint, named with its file.
"""
import hashlib
import json
import logging
import os
from typing import Any

import jax

from semppl_jax.checkpointing.errors import CheckpointError, clip

MANIFEST_NAME = "semppl_manifest.json"
_HASH = "sha256"


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

