"""scripts/bench_accelerator.sh --tiny end to end (experiments/bench_step.py's tiny path): every
shape and objective gets a timed row with FLOPs and memory, and the short ImageNet-shape training
run (tfds mock data) reports its speed. Runs in a subprocess on one CPU device."""
import json
import os
import subprocess

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_accelerator_tiny_runs_on_cpu(tmp_path):
  out = tmp_path / "bench"
  env = dict(os.environ, OUT=str(out), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="")  # One CPU device, not the suite's 8 fake ones.
  proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "bench_accelerator.sh"),
                         "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
  results = json.loads((out / "bench_step.json").read_text())
  rows = results["steps"]
  assert {(r["shape"], r["objective"]) for r in rows} == {
      ("demo", "semppl"), ("demo", "relic"), ("demo", "supervised"), ("r50", "semppl")}
  for r in rows:
    assert r["ms"] > 0 and r["flops"] > 0 and r["temp_mib"] > 0 and r["args_mib"] > 0
    assert 0 < r["peak_share"] < 100
  demo_semppl = [r for r in rows if r["shape"] == "demo" and r["objective"] == "semppl"][0]
  assert demo_semppl["pipeline_ms"] > 0
  run = results["train_run"]
  assert run["steps"] == 3 and run["steps_per_s"] > 0 and run["data"] == "tfds mock"
  report = (out / "bench_step.md").read_text()
  assert "| demo (tiny_resnet) | semppl |" in report and "Training run (tfds mock" in report
