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
