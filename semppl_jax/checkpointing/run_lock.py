"""One writer per run directory: an OS lock held for the life of a process.

:func:`lock_run_directory` takes an exclusive ``fcntl.flock`` on ``<directory>/run.lock``
before the run writes anything else there. The kernel releases it when the process ends, however
it ends (SIGKILL and power loss included: a lock file left on disk holds no lock), so there is
no stale lock to clean up. A second process asking for the same directory gets
:class:`RunDirectoryLocked` at once, naming the holder's pid and host (written into the lock
file by the holder).

Bucket URLs (``gs://...``) cannot be locked this way (no ``flock`` on object stores); for them
:func:`lock_run_directory` returns None and the caller must make sure one run writes there.
``flock`` works on local file systems and on NFS v4 (Linux maps it to byte-range locks there);
on older network file systems it may lock only the local machine.
"""
import fcntl
import os
import socket
import time
from typing import Any

from semppl_jax.checkpointing.errors import CheckpointError, clip

LOCK_NAME = "run.lock"


class RunDirectoryLocked(CheckpointError):
  """Another live process holds the run directory's lock."""


class RunLock:
  """An acquired run-directory lock; :meth:`release` (or process exit) frees it."""

  def __init__(self, path: str, fd: int):
    self.path, self._fd = path, fd

  def release(self) -> None:
    """Releases the lock (idempotent); the lock file stays (it holds no lock by itself)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _holder(fd: int) -> str:
  """The holder's 'pid N, host H' as it wrote it into the lock file (bounded, escaped)."""
  try:
    text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
  except OSError:
    text = ""
  fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
  if "pid" not in fields:
    return "pid unknown, host unknown: it has not written its name yet"
  return f"pid {clip(fields['pid'], 20)}, host {clip(fields.get('host', 'unknown'), 80)}"


def lock_run_directory(directory: Any) -> RunLock | None:
  """Takes the exclusive lock of a run directory (created if missing), or fails at once.

  Args:
    directory: the run's directory (``config.checkpoint_dir``); a bucket URL (``gs://...``)
      is not locked (returns None).

  Returns:
    The held :class:`RunLock` (keep a reference for the life of the run), or None for a
    bucket URL.

  Raises:
    RunDirectoryLocked: another process holds it: "another run (pid ..., host ...) holds
      <directory>".
    CheckpointError: ``directory`` (or a parent) is a file, or cannot be created / written.
  """
  directory = os.fspath(directory)
  if "://" in directory:
    return None
  directory = os.path.abspath(directory)
  try:
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
  except (FileExistsError, NotADirectoryError):
    raise CheckpointError(f"the run directory {directory!r} (config.checkpoint_dir) is a file, "
                          "or lies under one; give a directory path") from None
  except OSError as e:
    raise CheckpointError(f"cannot create or open the run directory {directory!r} "
                          f"(config.checkpoint_dir): {e}") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise RunDirectoryLocked(
        f"another run ({holder}) holds {directory}: two runs writing one directory would "
        "overwrite each other's checkpoints. Wait for it to end, stop it, or pick another "
        "config.checkpoint_dir.") from None
  except OSError as e:
    os.close(fd)
    raise CheckpointError(f"cannot lock the run directory {directory!r}: {e} (the file system "
                          "may not support flock)") from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()} "
                f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
  return RunLock(os.path.join(directory, LOCK_NAME), fd)
