"""Tests for mesh_experiment.Preemption: SIGTERM / SIGINT become a request to stop."""
import os
import signal
import subprocess
import sys
import textwrap

from semppl_jax.jaxline import mesh_experiment


def test_first_signal_requests_a_stop_and_prints_one_line(capfd):
  preemption = mesh_experiment.Preemption()
  preemption.install()
  try:
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested() and preemption.signal_name() == "SIGTERM"
    assert "[preempt] SIGTERM received: stopping after the current step" in capfd.readouterr().err
  finally:
    preemption.uninstall()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_second_signal_ends_the_process_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from semppl_jax.jaxline import mesh_experiment
      p = mesh_experiment.Preemption()
      p.install()
      os.kill(os.getpid(), signal.SIGINT)
      assert p.requested()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(30)
      print("not reached")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert out.returncode == -signal.SIGINT, (out.returncode, out.stderr[-2000:])
  assert "not reached" not in out.stdout


class _Loop(mesh_experiment.MeshExperiment):
  """Just enough of an experiment to ask _should_stop."""

  def __init__(self):  # pylint: disable=super-init-not-called
    pass

  def step(self, **kwargs):
    raise NotImplementedError

  def evaluate(self, **kwargs):
    raise NotImplementedError


def test_processes_agree_on_the_stop_step_at_progress_lines(monkeypatch):
  """Several processes: only the progress-line steps ask, and any process's signal stops all."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = []

  def allgather(local):
    gathered.append(int(local))
    return [int(local), 1]  # The other process got the signal.
  monkeypatch.setattr(mesh_experiment.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  loop = _Loop()
  assert [loop._should_stop(done, log_every=5) for done in range(1, 11)] == [
      False] * 4 + [True] + [False] * 4 + [True]
  assert gathered == [0, 0]  # One collective per progress line, none in between.
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda local: [0, 0])
  assert not loop._should_stop(5, log_every=5)
