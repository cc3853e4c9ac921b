"""Runs the real launcher (experiments/launch.py) in subprocesses, for end-to-end tests.

Shared by tests/test_experiment.py and tests/test_faults.py: the command and environment of a
launch on ``num_devices`` fake CPU devices with the tiny config (tests/configs), a bounded
blocking launch, a background launch logging to a file, and readers of what a run left on disk.
"""
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

from semppl_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny_fashion_mnist.py")
LAUNCH_TIMEOUT_S = 600  # Bounds every launch: a hung run fails its test instead of the suite.


def launch_env(run_dir: Any, num_devices: int) -> Dict[str, str]:
  """The environment of a launch: ``num_devices`` fake CPU devices, the run directory."""
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", SEMPPL_TEST_RUN_DIR=str(run_dir),
              PYTHONUNBUFFERED="1")


def launch_command(*overrides: str, config: str = TINY_CONFIG) -> List[str]:
  """``python experiments/launch.py --config=<config> <overrides>``."""
  return [sys.executable, os.path.join(ROOT, "experiments", "launch.py"), f"--config={config}",
          *overrides]


def run_launch(run_dir: Any, num_devices: int, *overrides: str,
               timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
  """Runs a launch to its end (at most ``timeout`` seconds) and returns it, whatever its exit
  status; stdout and stderr are captured as text."""
  return subprocess.run(launch_command(*overrides), env=launch_env(run_dir, num_devices),
                        capture_output=True, text=True, timeout=timeout)


def launch(run_dir: Any, num_devices: int, *overrides: str, wait: bool = True,
           log_path: Optional[Any] = None, timeout: float = LAUNCH_TIMEOUT_S):
  """Launches the tiny config; with ``wait`` returns its stdout after checking it succeeded.

  Without ``wait`` returns the ``subprocess.Popen`` at once: its output (stdout and stderr)
  goes to ``log_path`` if given (no pipe can fill up and stall a long run), else to a pipe.
  """
  if not wait:
    cmd, env = launch_command(*overrides), launch_env(run_dir, num_devices)
    if log_path is None:
      return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    with open(log_path, "w") as log:
      return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
  out = run_launch(run_dir, num_devices, *overrides, timeout=timeout)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
  return out.stdout


def final_module_state(run_dir: Any) -> Tuple[Optional[int], Any]:
  """(global step, experiment-module snapshot) of the newest 'latest' checkpoint, as numpy."""
  return checkpointing.read_experiment_snapshot(os.path.join(run_dir, "checkpoints"))


def checkpoint_state(run_dir: Any, step: int) -> Tuple[Optional[int], Any]:
  """(global step, experiment-module snapshot) of 'latest' checkpoint ``step``, as numpy."""
  return checkpointing.read_experiment_snapshot(
      os.path.join(run_dir, "checkpoints", "latest", str(step)))


def saved_steps(run_dir: Any) -> List[int]:
  """The numbers of the complete 'latest' checkpoints of a run, ascending."""
  directory = os.path.join(run_dir, "checkpoints", "latest")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())
