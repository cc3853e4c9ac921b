"""Fault injection through the real launcher (experiments/launch.py) with the tiny config.

What is injected, and what must hold afterwards:

* SIGKILL at seeded random points -- inside a checkpoint save (as soon as Orbax's temporary
  directory appears), and a random delay after a random step -- then a damaged newest
  checkpoint; the run resumed to the end is bit-identical to an uninterrupted one, the crashed
  save's temporary directory is removed and the fallback is reported.
* A learning rate of 1e30: the run stops with ``FloatingPointError`` naming the step and the
  first non-finite check, and the checkpoints left are the finite states before that step.
* A full disk (a size-limited tmpfs in a private mount namespace, filled at a seeded random
  checkpoint): the run stops with ``CheckpointError`` naming the checkpoint and the cause, and
  every checkpoint left is bit-identical to the uninterrupted run's at that step.

Checkpoints are saved asynchronously, as the launcher does by default
(``config.save_checkpoint_async``), so every kill and failure above also hits the background
writer. Launches are slow (30-60 s each on 2 cores), so the uninterrupted reference run is
shared by the tests of this module, and each launch is bounded by a timeout.
"""
import os
import random
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import launch_util

pytestmark = pytest.mark.e2e

STEPS = 10
SEED = 20260401
ONE_DEVICE = 1
NO_EVAL = "--config.experiment_kwargs.config.evaluate_at_end=False"
RUN = (f"--config.training_steps={STEPS}", NO_EVAL)
TMP_SUFFIX = ".orbax-checkpoint-tmp"
KILL_TIMEOUT_S = 300  # A run that never reaches its kill point fails instead of hanging.


def _latest_dir(run_dir):
  return os.path.join(run_dir, "checkpoints", "latest")


def _tmp_dirs(run_dir):
  """Orbax's temporary directories (unfinished saves) of the run's 'latest' series."""
  directory = _latest_dir(run_dir)
  return sorted(n for n in os.listdir(directory) if TMP_SUFFIX in n) if os.path.isdir(
      directory) else []


def _leaves(tree):
  return [(jax.tree_util.keystr(path), np.asarray(x))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def _assert_bit_identical(got, expected, what):
  got, expected = _leaves(got), _leaves(expected)
  assert [p for p, _ in got] == [p for p, _ in expected], what
  for (path, a), (_, b) in zip(got, expected):
    np.testing.assert_array_equal(a, b, err_msg=f"{what}: {path}")


def _assert_finite(tree, what):
  for path, x in _leaves(tree):
    if np.issubdtype(x.dtype, np.inexact):
      assert np.all(np.isfinite(x)), f"{what}: {path} is not finite"


def _assert_matches_reference(run_dir, reference, what):
  """Every checkpoint the run left is bit-identical to the reference's at the same step."""
  steps = launch_util.saved_steps(run_dir)
  assert steps, f"{what}: no checkpoint left"
  for step in steps:
    got_step, got = launch_util.checkpoint_state(run_dir, step)
    assert got_step == step
    _assert_bit_identical(got, launch_util.checkpoint_state(reference, step)[1],
                          f"{what}, checkpoint {step}")
  return steps


class _Background:
  """A launch running in the background, its output in a log file."""

  def __init__(self, run_dir, log_path, *overrides):
    self.run_dir, self.log_path = run_dir, log_path
    self.proc = launch_util.launch(run_dir, ONE_DEVICE, *RUN, *overrides, wait=False,
                                   log_path=log_path)

  def log(self):
    with open(self.log_path) as f:
      return f.read()

  def wait_for(self, condition, what):
    """Polls ``condition()`` every 2 ms until it holds; fails if the run ends first."""
    deadline = time.time() + KILL_TIMEOUT_S
    while not condition():
      if self.proc.poll() is not None:
        pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}:\n"
                    f"{self.log()[-3000:]}")
      if time.time() > deadline:
        self.proc.kill()
        pytest.fail(f"no {what} within {KILL_TIMEOUT_S} s:\n{self.log()[-3000:]}")
      time.sleep(0.002)

  def sigkill(self):
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(timeout=60)
    assert self.proc.returncode == -signal.SIGKILL, (
        f"the run ended by itself (rc {self.proc.returncode}) before the kill")


def _truncate_data_files(step_dir):
  """Cuts every data file of a checkpoint to half its length (a torn copy or write)."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      if name in ("_CHECKPOINT_METADATA", "commit_success.txt") or name.endswith(".json"):
        continue
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(base):
  """An uninterrupted run keeping every checkpoint (steps 1..STEPS)."""
  run_dir = base / "reference"
  launch_util.launch(run_dir, ONE_DEVICE, *RUN, "--config.max_checkpoints_to_keep=100")
  assert launch_util.saved_steps(run_dir)[-STEPS:] == list(range(1, STEPS + 1))
  return run_dir


@pytest.fixture(scope="module")
def killed_run(base):
  """Kills one run twice at seeded random points, damages its newest checkpoint, resumes it.

  Returns a dict of what happened: kill points, what each kill left, the final output.
  """
  rng = random.Random(SEED)
  run_dir, seen = base / "killed", {}

  # 1. Inside a checkpoint save: SIGKILL as soon as the temporary directory of checkpoint
  #    `save_step` (or a later one) appears.
  save_step = rng.randint(2, 4)
  run = _Background(run_dir, base / "killed_1.log")

  def saving():
    return any(int(n.split(".")[0]) >= save_step for n in _tmp_dirs(run_dir))
  run.wait_for(saving, f"the save of checkpoint {save_step}")
  run.sigkill()
  seen["save_step"] = save_step
  seen["crashed_tmp_dirs"] = _tmp_dirs(run_dir)
  seen["crashed_steps"] = [int(n.split(".")[0]) for n in seen["crashed_tmp_dirs"]]
  seen["after_kill_1"] = launch_util.saved_steps(run_dir)

  # 2. Resumed, then killed a random 0-300 ms after a random step's progress line.
  resumed_at = max(seen["after_kill_1"], default=0)
  kill_step = rng.randint(resumed_at + 1, STEPS - 2)
  delay = rng.uniform(0.0, 0.3)
  run = _Background(run_dir, base / "killed_2.log")
  run.wait_for(lambda: f"[train] step {kill_step}/{STEPS}" in run.log(),
               f"step {kill_step}")
  time.sleep(delay)
  run.sigkill()
  seen.update(kill_step=kill_step, delay=delay, log_2=run.log(),
              tmp_dirs_after_kill_2=_tmp_dirs(run_dir),
              after_kill_2=launch_util.saved_steps(run_dir))

  # 3. The newest complete checkpoint damaged, then resumed to the end.
  damaged = max(seen["after_kill_2"])
  _truncate_data_files(os.path.join(_latest_dir(run_dir), str(damaged)))
  out = launch_util.run_launch(run_dir, ONE_DEVICE, *RUN)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
  seen.update(damaged=damaged, final_stdout=out.stdout, final_stderr=out.stderr)
  return run_dir, seen


def test_kill_inside_a_save_leaves_only_complete_checkpoints(killed_run):
  run_dir, seen = killed_run
  # The kill landed inside a save: its temporary directory was left, not a checkpoint.
  assert seen["crashed_tmp_dirs"], "the kill did not land inside a checkpoint save"
  assert min(seen["crashed_steps"]) >= seen["save_step"]
  assert all(s < min(seen["crashed_steps"]) for s in seen["after_kill_1"]), seen
  # The next start removed it (the later runs may leave their own).
  assert not set(seen["crashed_tmp_dirs"]) & set(seen["tmp_dirs_after_kill_2"])
  assert not _tmp_dirs(run_dir)


def test_killed_run_resumes_where_its_checkpoints_end(killed_run):
  _, seen = killed_run
  resumed_at = max(seen["after_kill_1"], default=0)
  assert f"[train] step {resumed_at + 1}/{STEPS} | compiled" in seen["log_2"]
  assert f"[train] step {resumed_at}/{STEPS}" not in seen["log_2"]
  # Saves are asynchronous (the launch default): a step's save starts before its progress line
  # is printed, after the previous step's save has finished (each save waits for the one in
  # flight), so the kill leaves at least the checkpoint of the step before.
  assert max(seen["after_kill_2"]) >= seen["kill_step"] - 1
  assert seen["kill_step"] > resumed_at


def test_damaged_newest_checkpoint_is_reported_and_skipped(killed_run):
  run_dir, seen = killed_run
  damaged = seen["damaged"]
  where = f"{_latest_dir(run_dir)}/{damaged}"
  assert f"Checkpoint {where} cannot be restored" in seen["final_stderr"], (
      seen["final_stderr"][-3000:])
  assert "trying an older one" in seen["final_stderr"]
  # Training repeated the damaged checkpoint's step from the one before it.
  assert f"[train] step {damaged}/{STEPS} | compiled" in seen["final_stdout"]


def test_killed_and_damaged_run_ends_bit_identical_to_uninterrupted_run(killed_run, reference):
  run_dir, _ = killed_run
  steps = _assert_matches_reference(run_dir, reference, "killed run")
  assert steps[-1] == STEPS


@pytest.fixture(scope="module")
def nan_run(base):
  """A run whose learning rate (1e30) makes training non-finite within a few steps."""
  run_dir = base / "nan"
  out = launch_util.run_launch(
      run_dir, ONE_DEVICE, *RUN, "--config.experiment_kwargs.config.optimizer."
      "base_learning_rate=1e30")
  return run_dir, out


def test_nonfinite_run_stops_naming_the_step_and_the_check(nan_run):
  _, out = nan_run
  assert out.returncode != 0, out.stdout[-3000:]
  match = re.search(r"FloatingPointError: step (\d+): non-finite (\w+)", out.stderr)
  assert match, out.stderr[-3000:]
  step = int(match.group(1))
  assert 1 < step <= STEPS
  assert "nothing non-finite was saved" in out.stderr
  assert f"[train] step {step - 1}/{STEPS}" in out.stdout
  assert f"[train] step {step}/{STEPS}" not in out.stdout


def test_nonfinite_run_keeps_its_last_finite_checkpoints(nan_run):
  run_dir, out = nan_run
  step = int(re.search(r"FloatingPointError: step (\d+)", out.stderr).group(1))
  saved = launch_util.saved_steps(run_dir)
  # Saves every step, 2 kept: the two states before the refused step, nothing after.
  assert saved == [s for s in (step - 2, step - 1) if s > 0], (step, saved)
  for s in saved:
    restored_step, snapshot = launch_util.checkpoint_state(run_dir, s)
    assert restored_step == s
    _assert_finite(snapshot, f"checkpoint {s}")


def _private_mount_prefix(probe_dir):
  """``unshare`` arguments that give a private mount namespace where tmpfs can be mounted,
  or None (no user namespaces and not root)."""
  for flags in (["-r", "-m"], ["-m"]):
    cmd = ["unshare", *flags, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe_dir}'"]
    try:
      if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0:
        return ["unshare", *flags]
    except (OSError, subprocess.TimeoutExpired):
      pass
  return None


# Inside the namespace: a 64 MiB tmpfs on the run's checkpoint directory, filled up (with a file
# that is removed afterwards) once checkpoint $2 exists; the launch; its checkpoints copied out.
_FULL_DISK_SCRIPT = """
ck="$1"; fill_after="$2"; copy="$3"; shift 3
mount -t tmpfs -o size=64m tmpfs "$ck" || exit 97
(while [ ! -d "$ck/latest/$fill_after" ]; do sleep 0.002; done
 cat /dev/zero > "$ck/filler" 2> /dev/null; echo "disk full after checkpoint $fill_after") &
filler=$!
"$@"
rc=$?
kill "$filler" 2> /dev/null
rm -f "$ck/filler"
cp -a "$ck/." "$copy/"
exit "$rc"
"""


@pytest.fixture(scope="module")
def full_disk_run(base):
  run_dir, copied = base / "full_disk", base / "full_disk_copy"
  checkpoints = run_dir / "checkpoints"
  os.makedirs(checkpoints)
  os.makedirs(copied / "checkpoints")
  probe = base / "mount_probe"
  probe.mkdir()
  prefix = _private_mount_prefix(probe)
  if prefix is None:
    pytest.skip("a full disk needs a private mount namespace for a tmpfs (unshare -rm); "
                "the checkpointing tests simulate ENOSPC in process instead")
  fill_after = random.Random(SEED + 1).randint(2, 4)
  cmd = [*prefix, "sh", "-c", _FULL_DISK_SCRIPT, "sh", str(checkpoints), str(fill_after),
         str(copied / "checkpoints"), *launch_util.launch_command(*RUN)]
  out = subprocess.run(cmd, env=launch_util.launch_env(run_dir, ONE_DEVICE),
                       capture_output=True, text=True, timeout=launch_util.LAUNCH_TIMEOUT_S)
  assert out.returncode != 97, "mounting the tmpfs failed"
  shutil.rmtree(probe)
  return copied, fill_after, out


def test_full_disk_stops_the_run_with_a_clear_error(full_disk_run):
  _, fill_after, out = full_disk_run
  assert f"disk full after checkpoint {fill_after}" in out.stdout, out.stdout[-2000:]
  assert out.returncode != 0, out.stdout[-3000:]
  match = re.search(r"CheckpointError: saving checkpoint (\d+) to '[^']*/checkpoints/latest' "
                    r"failed \((.*)\); this save's temporary files were removed, the complete "
                    r"checkpoints there are \[[0-9, ]*\]", out.stderr)
  assert match, out.stderr[-3000:]
  assert int(match.group(1)) > fill_after
  # The cause as Python (OSError errno 28) or TensorStore (RESOURCE_EXHAUSTED) words it.
  assert re.search(r"No space left on device|ENOSPC|RESOURCE_EXHAUSTED", match.group(2)), match[0]


def test_full_disk_loses_no_checkpoint(full_disk_run, reference):
  copied, fill_after, out = full_disk_run
  failed = int(re.search(r"CheckpointError: saving checkpoint (\d+)", out.stderr).group(1))
  assert not _tmp_dirs(copied), "the failed save left its temporary directory"
  steps = _assert_matches_reference(copied, reference, "full-disk run")
  assert steps[-1] == failed - 1 >= fill_after, (steps, failed)


# ----- Preemption, config-checked resume, one writer per directory (issue 21). -----

EXIT_LOCKED, EXIT_PREEMPTED, EXIT_CONFIG_CHANGED = 73, 75, 78
NO_PERIODIC_SAVE = "--config.save_checkpoint_interval=1000"


@pytest.fixture(scope="module")
def sigterm_run(base):
  """SIGTERM a random 0-300 ms after a random step's progress line (no periodic saves: the
  only checkpoint is the one the signal makes), then resume to the end."""
  rng = random.Random(SEED + 2)
  run_dir, seen = base / "sigterm", {}
  kill_step = rng.randint(2, STEPS - 3)
  delay = rng.uniform(0.0, 0.3)
  run = _Background(run_dir, base / "sigterm_1.log", NO_PERIODIC_SAVE)
  run.wait_for(lambda: f"[train] step {kill_step}/{STEPS}" in run.log(), f"step {kill_step}")
  time.sleep(delay)
  run.proc.send_signal(signal.SIGTERM)
  run.proc.wait(timeout=120)
  seen.update(kill_step=kill_step, rc=run.proc.returncode, log_1=run.log(),
              saved=launch_util.saved_steps(run_dir),
              tmp_dirs=_tmp_dirs(run_dir))
  out = launch_util.run_launch(run_dir, ONE_DEVICE, *RUN, NO_PERIODIC_SAVE)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
  seen.update(final_stdout=out.stdout, final_stderr=out.stderr)
  return run_dir, seen


def test_sigterm_saves_the_current_step_and_exits_75(sigterm_run, reference):
  run_dir, seen = sigterm_run
  assert seen["rc"] == EXIT_PREEMPTED, seen["log_1"][-3000:]
  match = re.search(r"\[preempt\] stopped by SIGTERM at step (\d+); its checkpoint is saved in "
                    r"\S+; relaunch the same command to resume \(exit code 75\)", seen["log_1"])
  assert match, seen["log_1"][-3000:]
  stopped = int(match.group(1))
  # No step lost: every step trained before the signal was handled is in the checkpoint.
  last_logged = max(int(m) for m in re.findall(rf"\[train\] step (\d+)/{STEPS}", seen["log_1"]))
  assert stopped == last_logged >= seen["kill_step"], (stopped, last_logged)
  assert seen["saved"] == [stopped]
  assert not seen["tmp_dirs"]
  got_step, got = launch_util.checkpoint_state(run_dir, stopped)
  assert got_step == stopped
  _assert_bit_identical(got, launch_util.checkpoint_state(reference, stopped)[1],
                        f"checkpoint {stopped} saved on SIGTERM")
  assert f"[train] step {stopped + 1}/{STEPS} | compiled" in seen["final_stdout"]


def test_sigterm_resumed_run_ends_bit_identical(sigterm_run, reference):
  run_dir, _ = sigterm_run
  _, got = launch_util.checkpoint_state(run_dir, STEPS)
  _assert_bit_identical(got, launch_util.checkpoint_state(reference, STEPS)[1],
                        "SIGTERM-resumed run")


def test_resume_with_another_config_is_refused_naming_each_field(sigterm_run):
  run_dir, _ = sigterm_run
  before = launch_util.saved_steps(run_dir)
  out = launch_util.run_launch(
      run_dir, ONE_DEVICE, *RUN, NO_PERIODIC_SAVE,
      "--config.experiment_kwargs.config.semppl.temperature=0.5",
      "--config.experiment_kwargs.config.objective=relic")
  assert out.returncode == EXIT_CONFIG_CHANGED, (out.stdout[-2000:], out.stderr[-3000:])
  assert "in 2 run-defining field(s)" in out.stderr, out.stderr[-3000:]
  assert "  experiment_kwargs.config.objective: \"semppl\" -> \"relic\"" in out.stderr
  assert "  experiment_kwargs.config.semppl.temperature: 0.2 -> 0.5" in out.stderr
  assert "Traceback" not in out.stderr
  assert launch_util.saved_steps(run_dir) == before


def test_second_launch_on_a_locked_directory_exits_at_once(tmp_path):
  from semppl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  run_dir = tmp_path / "locked"
  with checkpointing.lock_run_directory(run_dir):
    started = time.time()
    out = launch_util.run_launch(run_dir, ONE_DEVICE, *RUN)
  assert out.returncode == EXIT_LOCKED, (out.stdout[-2000:], out.stderr[-3000:])
  assert (f"another run (pid {os.getpid()}, host {os.uname().nodename}) holds {run_dir}"
          in out.stderr), out.stderr[-2000:]
  assert sorted(os.listdir(run_dir)) == ["run.lock"]  # Nothing else written.
  assert time.time() - started < 120
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("x")
  out = launch_util.run_launch(not_a_dir, ONE_DEVICE, *RUN)
  assert out.returncode == 1 and "is a file" in out.stderr and "Traceback" not in out.stderr
