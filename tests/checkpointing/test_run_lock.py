"""Tests for semppl_jax.checkpointing.run_lock: one writer per run directory."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from semppl_jax import checkpointing as ck

_HOLD = """
import sys, time
from semppl_jax.checkpointing import run_lock
lock = run_lock.lock_run_directory(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_second_lock_is_refused_naming_the_holder_until_released(tmp_path):
  run_dir = tmp_path / "run"
  lock = ck.lock_run_directory(run_dir)
  assert os.path.isfile(run_dir / "run.lock")
  with pytest.raises(ck.RunDirectoryLocked,
                     match=rf"another run \(pid {os.getpid()}, host "
                           rf"{socket.gethostname()}\) holds {run_dir}"):
    ck.lock_run_directory(run_dir)
  lock.release()
  with ck.lock_run_directory(run_dir):
    pass
  assert ck.lock_run_directory("gs://bucket/run") is None


def test_lock_of_a_killed_process_is_free(tmp_path):
  run_dir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ck.RunDirectoryLocked, match=rf"\(pid {holder.pid}, host "):
      ck.lock_run_directory(run_dir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  deadline = time.time() + 10
  while True:  # The kernel frees the lock when the process is gone.
    try:
      ck.lock_run_directory(run_dir).release()
      break
    except ck.RunDirectoryLocked:
      assert time.time() < deadline
      time.sleep(0.05)


def test_run_directory_that_is_a_file_is_named(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  with pytest.raises(ck.CheckpointError, match="is a file"):
    ck.lock_run_directory(path)
  with pytest.raises(ck.CheckpointError, match="is a file"):
    ck.lock_run_directory(path / "sub")
