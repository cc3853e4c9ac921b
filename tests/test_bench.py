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


def test_bench_parts_tiny_parts_add_up_and_knn_grows_with_the_queue():
  """experiments/bench_parts.py at a tiny shape on 2 of the suite's fake devices: every part is
  measured, the parts account for the whole SemPPL step's FLOPs and bytes, the kNN's cost grows
  with the queue, and the roofline and the SemPPL-specific share follow their definitions."""
  from experiments import bench_parts  # pylint: disable=g-import-not-at-top
  small, large = 64, 1024
  rows = bench_parts.measure(2, [small, large], steps=("semppl",), step_queue_sizes=[small],
                             tiny=True)
  measured = {(r["part"], r["objective"], r["queue_size"]) for r in rows}
  fixed = {("views", "", 0), ("encoder", "", 0), ("heads", "", 0), ("loss", "semppl", 0),
           ("loss", "relic", 0), ("optimizer", "", 0)}
  per_q = {(p, "", q) for p in bench_parts.QUEUE_PARTS for q in (small, large)}
  assert measured == fixed | per_q | {("step", "semppl", small)}
  for r in rows:
    assert r["flops"] > 0 and r["bytes"] > 0, r
  find = lambda part, objective="", q=0: bench_parts._find(rows, part, objective, q)
  # The kNN scores every query against Q / devices entries per device.
  assert find("knn", q=large)["flops"] > 4 * find("knn", q=small)["flops"]
  # Its lax.map over the 4 queues is a while loop whose body XLA counts once; unrolled for
  # counting, the FLOPs are those of all 4.
  knn = find("knn", q=large)
  assert 3.5 < knn["flops"] / knn["program_flops"] < 4.5
  # The semantic cross-entropy adds its positives' logits (it shares the augmentation term's
  # negatives' logits in the default form: losses._semantic_terms_shared).
  assert find("loss", "semppl")["flops"] > find("loss", "relic")["flops"]
  # The encoder's gradients are all-reduced inside its part.
  assert find("encoder")["all_reduce_bytes"] > 0
  extra, shares = bench_parts.derived(rows, [small, large])
  share = shares[0]
  assert 0.9 < share["parts_flops"] / share["step_flops"] < 1.1
  assert 0.9 < share["parts_bytes"] / share["step_bytes"] < 1.1
  for name, peak, bandwidth, _ in bench_parts.CHIPS:
    r = find("knn", q=small)
    assert r[f"ms_{name}"] == 1e3 * max(r["flops"] / peak, r["bytes"] / bandwidth)
    expected = (find("knn", q=small)[f"ms_{name}"] + find("sampler", q=small)[f"ms_{name}"]
                + find("loss", "semppl")[f"ms_{name}"] - find("loss", "relic")[f"ms_{name}"])
    assert abs(share[f"specific_ms_{name}"] - expected) < 1e-12
    assert share[f"step_ms_{name}"] == find("step", "semppl", small)[f"ms_{name}"]
    # Without a compiled step at the large Q the share falls back to the sum of the parts.
    assert shares[1][f"step_ms_{name}"] == shares[1][f"parts_ms_{name}"]
  assert extra["flops"] == find("loss", "semppl")["flops"] - find("loss", "relic")["flops"]
  text = bench_parts.report(rows, [small, large], "test", "header")[0]
  assert "| test | knn | 2^10 |" in text and "semantic loss extra" in text


def test_bench_parts_roofline_and_collective_time():
  from experiments import bench_parts  # pylint: disable=g-import-not-at-top
  assert bench_parts.roofline_ms(2e12, 1e9, 1e12, 1e12) == 2000.0  # compute-bound
  assert bench_parts.roofline_ms(1e9, 3e12, 1e12, 1e12) == 3000.0  # memory-bound
  assert bench_parts.collective_ms(1e9, 2e9, 1e12) == 4.0


def test_bench_parts_while_trip_counts_and_unrolled_loops():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import bench_parts  # pylint: disable=g-import-not-at-top

  def f(x):
    return jax.lax.fori_loop(0, 5, lambda i, y: jnp.tanh(y @ x), x)

  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  looped = jax.jit(f).lower(x).compile()
  assert bench_parts.while_trip_counts(looped.as_text()) == [5]
  with bench_parts.unrolled_loops():
    flat = jax.jit(lambda x: f(x)).lower(x).compile()
  assert bench_parts.while_trip_counts(flat.as_text()) == []
  ratio = flat.cost_analysis()["flops"] / looped.cost_analysis()["flops"]
  assert 4.5 < ratio < 5.5


def test_bench_parts_counts_the_knn_chunk_loop_at_its_trip_count():
  """The kNN scores each device's slots in chunks (a fori_loop inside the lax.map over the
  queues): counted with both loops unrolled, its FLOPs and bytes are those of every chunk of
  every queue, i.e. those of the same kNN scored in one block; its temporaries fall."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from experiments import bench_parts  # pylint: disable=g-import-not-at-top
  from semppl_jax import knn  # pylint: disable=g-import-not-at-top
  size = 1024  # 512 slots per device; 4 views x 48 unlabelled images = 192 query rows.
  one_block = bench_parts.measure(2, [size], parts=("knn",), steps=(), tiny=True)[0]
  with mock.patch.object(knn, "CHUNK_ELEMENTS", 192 * 64):  # Chunks of 64 slots: 8 per queue.
    chunked = bench_parts.measure(2, [size], parts=("knn",), steps=(), tiny=True)[0]
  assert one_block["flops"] / one_block["program_flops"] < 4.5  # Only the 4 queues looped.
  assert chunked["flops"] / chunked["program_flops"] > 20  # 4 x 8 bodies, each counted once.
  assert abs(chunked["flops"] / one_block["flops"] - 1) < 0.1, (chunked, one_block)
  assert abs(chunked["bytes"] / one_block["bytes"] - 1) < 0.2, (chunked, one_block)
  assert chunked["temp_bytes"] < one_block["temp_bytes"] / 2, (chunked, one_block)
