"""Benchmark of the sharded kNN vote (semppl_jax.knn.knn_vote) against a plain matmul.

For every queue size Q and k: the median wall time of the jitted ``knn_vote`` (512 queries,
D = 256, l2-normalised, 10 % empty slots) after a warm-up call, the time of a jitted
``queries @ queue.T`` of the same size placed the same way (the floor for any exact kNN), the
achieved GFLOP/s of both (2·B·Q·D flops) and their ratio, and the compiled per-device memory of
``knn_vote`` (``memory_analysis()``: temporaries and arguments).

Usage:
  python experiments/bench_knn.py                 # 1 device, then 8 fake CPU devices
  python experiments/bench_knn.py --devices 8     # one configuration
  python experiments/bench_knn.py --sizes 14 16   # Q = 2^14, 2^16 only

With ``--devices N > 1`` the script sets ``--xla_force_host_platform_device_count=N`` before
importing jax (CPU) and runs inside ``jax.set_mesh`` with the queue sharded along Q, so the
sharded path (per-device top-k + merge) is measured. Without ``--devices`` it runs itself once
per configuration in a subprocess and prints one markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCH = 512
DIM = 256
NUM_CLASSES = 1000


def _measure(devices, log2_sizes, ks, repeats):
  """Runs one device configuration; returns a list of result dicts."""
  if devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from semppl_jax import knn, parallel  # pylint: disable=g-import-not-at-top

  if len(jax.devices()) < devices:
    raise SystemExit(f"asked for {devices} devices, jax has {len(jax.devices())}")
  mesh = parallel.make_mesh(jax.devices()[:devices]) if devices > 1 else None

  def placed(shape_fn, spec):
    if mesh is None:
      return jax.jit(shape_fn)()
    return jax.jit(shape_fn, out_shardings=jax.sharding.NamedSharding(mesh, spec))()

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))  # Warm-up (compilation, first allocation).
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  P = jax.sharding.PartitionSpec
  rows = []
  for log2_size in log2_sizes:
    size = 2 ** log2_size
    normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    queries = placed(lambda: normalize(jax.random.normal(jax.random.key(0), (BATCH, DIM))), P())
    keys = placed(lambda: normalize(jax.random.normal(jax.random.key(1), (size, DIM))),
                  P("data"))
    labels = placed(lambda: jnp.where(
        jax.random.uniform(jax.random.key(2), (size,)) < 0.1, -1,
        jax.random.randint(jax.random.key(3), (size,), 0, NUM_CLASSES)), P("data"))
    matmul = jax.jit(lambda q, e: q @ e.T)
    context = jax.set_mesh(mesh) if mesh is not None else _Null()
    with context:
      matmul_s = timed(matmul, queries, keys)
      for k in ks:
        vote = jax.jit(lambda q, e, l, k=k: knn.knn_vote(q, e, l, k=k, num_classes=NUM_CLASSES))
        memory = vote.lower(queries, keys, labels).compile().memory_analysis()
        vote_s = timed(vote, queries, keys, labels)
        flops = 2.0 * BATCH * size * DIM
        rows.append(dict(
            devices=devices, log2_size=log2_size, k=k, vote_ms=vote_s * 1e3,
            matmul_ms=matmul_s * 1e3, vote_gflops=flops / vote_s / 1e9,
            matmul_gflops=flops / matmul_s / 1e9, ratio=matmul_s / vote_s,
            temp_mib=memory.temp_size_in_bytes / 2 ** 20,
            args_mib=memory.argument_size_in_bytes / 2 ** 20))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    del queries, keys, labels
  return rows


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def _table(rows):
  lines = [
      "| devices | Q | k | knn_vote ms | matmul ms | knn_vote GFLOP/s | matmul GFLOP/s | "
      "matmul time / knn_vote time | temp MiB / device | args MiB / device |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | 2^{r['log2_size']} | {r['k']} | {r['vote_ms']:.1f} | "
        f"{r['matmul_ms']:.1f} | {r['vote_gflops']:.1f} | {r['matmul_gflops']:.1f} | "
        f"{r['ratio']:.2f} | {r['temp_mib']:.1f} | {r['args_mib']:.1f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=None,
                      help="run one configuration with this many (fake CPU) devices")
  parser.add_argument("--sizes", type=int, nargs="+", default=[14, 16, 18, 20],
                      help="log2 of the queue sizes")
  parser.add_argument("--ks", type=int, nargs="+", default=[1, 20])
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
  parser.add_argument("--json", action="store_true", help="print rows as JSON (internal)")
  args = parser.parse_args()

  if args.devices is not None:
    rows = _measure(args.devices, args.sizes, args.ks, args.repeats)
    print(json.dumps(rows) if args.json else _table(rows))
    return

  rows = []
  for devices in (1, 8):
    cmd = [sys.executable, os.path.abspath(__file__), "--devices", str(devices), "--json",
           "--repeats", str(args.repeats), "--sizes", *map(str, args.sizes),
           "--ks", *map(str, args.ks)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    rows += json.loads(out.strip().splitlines()[-1])
  print(_table(rows))


if __name__ == "__main__":
  main()
