"""Benchmarks of semppl_jax.knn's sharded kNN vote and semppl_jax.semantic_positives' sampler.

``--bench vote`` (default): for every queue size Q and k, the median wall time of the jitted
``knn_vote`` (512 queries, D = 256, l2-normalised, 10 % empty slots) after a warm-up call, the
time of a jitted ``queries @ queue.T`` of the same size placed the same way (the floor for any
exact kNN), the achieved GFLOP/s of both (2·B·Q·D flops) and their ratio, and the compiled
per-device memory of ``knn_vote`` (``memory_analysis()``: temporaries and arguments).

``--bench sample``: ``semantic_positives.sample_semantic_positives`` (per-shard label counts,
one integer rank per draw, the owning device sends the entry) against the previous sampler (one
random number per (queue, draw, image, slot) and a top-1 over them through the sharded top-k;
reimplemented here as ``_noise_top1_sampler``), with L = 4 queues, N = 3 draws, D = 256, 1000
classes, 10 % empty slots, for a grid of batch sizes B and queue sizes Q. Both are timed as
jitted calls (median after a warm-up) and compared with a jitted ``einsum('lbd,lqd->lbq')`` of
the B queries against all L queues (one kNN-vote worth of matmul), with each one's compiled
temporary memory. The old sampler is skipped where ``N · B · Q`` exceeds
``--max-old-elements`` (its score block alone is that many float32 values per queue).

Usage:
  python experiments/bench_knn.py                 # vote: 1 device, then 8 fake CPU devices
  python experiments/bench_knn.py --devices 8     # vote, one configuration
  python experiments/bench_knn.py --sizes 14 16   # vote, Q = 2^14, 2^16 only
  python experiments/bench_knn.py --bench sample --devices 1   # sampler, per-device shapes
  python experiments/bench_knn.py --bench sample --devices 1 --batches 512 --sizes 14

With ``--devices N > 1`` the script sets ``--xla_force_host_platform_device_count=N`` before
importing jax (CPU) and runs inside ``jax.set_mesh`` with the queue sharded along Q, so the
sharded path is measured (on fake CPU devices that share the host's cores, so times are only
indicative). Without ``--devices`` it runs itself once per configuration in a subprocess and
prints one markdown table.
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


SAMPLE_QUEUES = 4
SAMPLE_DRAWS = 3


def _noise_top1_sampler(knn, num_positives):
  """The previous sampler: iid integer noise per (queue, draw, image, slot), top-1 per draw.

  Noise of slot q of queue l for draw n of image i: element [n, i] of
  ``bits(fold_in(fold_in(key, l), q), (N, B)) >> 8`` on label-matched slots, -inf elsewhere;
  the winner is found with ``knn._sharded_top_k(k=1)`` (per-device top-1, merge, psum).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def score_fn(shared, group, keys, labels, slots):
    del keys
    key, targets = shared
    batch = targets.shape[0]
    slot_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        jax.random.fold_in(key, group), slots)
    bits = jax.vmap(lambda k: jax.random.bits(k, (num_positives, batch), jnp.uint32),
                    out_axes=-1)(slot_keys)  # [N, B, Ql]
    match = (labels[None, :] == targets[:, None]) & (targets[:, None] >= 0)
    noise = (bits >> 8).astype(jnp.float32)
    return jnp.where(match[None], noise, -jnp.inf).reshape(num_positives * batch, -1)

  sharded_top_k = knn._sharded_top_k  # pylint: disable=protected-access

  def sample(key, targets, queue):
    num_queues, _, dim = queue.embeddings.shape
    top = sharded_top_k(score_fn, (key, targets), queue.embeddings, queue.labels, k=1,
                        with_embeddings=True)
    shape = (num_queues, num_positives, targets.shape[0])
    return (top.embeddings[:, :, 0].reshape(shape + (dim,)),
            (top.scores[:, :, 0] > -jnp.inf).reshape(shape))

  return sample


def _measure_sample(devices, batches, log2_sizes, repeats, max_old_elements):
  """Times the new and the old sampler and a matmul for every (B, Q); returns result dicts."""
  if devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from semppl_jax import knn, parallel  # pylint: disable=g-import-not-at-top
  from semppl_jax import queue as queue_lib  # pylint: disable=g-import-not-at-top
  from semppl_jax import semantic_positives  # pylint: disable=g-import-not-at-top

  if len(jax.devices()) < devices:
    raise SystemExit(f"asked for {devices} devices, jax has {len(jax.devices())}")
  mesh = parallel.make_mesh(jax.devices()[:devices]) if devices > 1 else None
  P = jax.sharding.PartitionSpec
  slots = P(None, "data")

  def placed(shape_fn, spec):
    if mesh is None:
      return jax.jit(shape_fn)()
    return jax.jit(shape_fn, out_shardings=jax.sharding.NamedSharding(mesh, spec))()

  def timed(fn, *args):
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))  # Warm-up (first allocation).
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
    return statistics.median(times), compiled.memory_analysis().temp_size_in_bytes

  new_sampler = jax.jit(lambda key, y, q: semantic_positives.sample_semantic_positives(
      key, y, q, SAMPLE_DRAWS))
  old_sampler = jax.jit(_noise_top1_sampler(knn, SAMPLE_DRAWS))
  matmul = jax.jit(lambda x, q: jnp.einsum("lbd,lqd->lbq", x, q.embeddings))
  rows = []
  context = jax.set_mesh(mesh) if mesh is not None else _Null()
  with context:
    for log2_size in log2_sizes:
      size = 2 ** log2_size
      normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
      embeddings = placed(lambda: normalize(jax.random.normal(
          jax.random.key(1), (SAMPLE_QUEUES, size, DIM))), slots)
      labels = placed(lambda: jnp.where(
          jax.random.uniform(jax.random.key(2), (SAMPLE_QUEUES, size)) < 0.1, -1,
          jax.random.randint(jax.random.key(3), (SAMPLE_QUEUES, size), 0, NUM_CLASSES)),
                      slots)
      queue = queue_lib.Queue(embeddings, labels, jnp.zeros((), jnp.int32))
      for batch in batches:
        queries = placed(lambda: normalize(jax.random.normal(
            jax.random.key(0), (SAMPLE_QUEUES, batch, DIM))), P())
        targets = placed(lambda: jax.random.randint(
            jax.random.key(4), (batch,), -1, NUM_CLASSES), P())
        key = jax.random.key(5)
        new_s, new_temp = timed(new_sampler, key, targets, queue)
        matmul_s, _ = timed(matmul, queries, queue)
        row = dict(devices=devices, batch=batch, log2_size=size.bit_length() - 1,
                   new_ms=new_s * 1e3, matmul_ms=matmul_s * 1e3, new_temp_mib=new_temp / 2**20,
                   old_ms=None, old_temp_mib=None)
        if SAMPLE_DRAWS * batch * size <= max_old_elements:
          old_s, old_temp = timed(old_sampler, key, targets, queue)
          row.update(old_ms=old_s * 1e3, old_temp_mib=old_temp / 2**20)
        rows.append(row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
      del embeddings, labels, queue
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


def _sample_table(rows):
  fmt = lambda x, spec: "skipped" if x is None else format(x, spec)
  lines = [
      f"| devices | B | Q | new sampler ms | old sampler ms | old / new | matmul ms "
      f"(L={SAMPLE_QUEUES} queues) | new / matmul | old / matmul | new temp MiB | "
      "old temp MiB |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    old = r["old_ms"]
    lines.append(
        f"| {r['devices']} | {r['batch']} | 2^{r['log2_size']} | {r['new_ms']:.2f} | "
        f"{fmt(old, '.1f')} | {fmt(old and old / r['new_ms'], '.0f')} | "
        f"{r['matmul_ms']:.1f} | {r['new_ms'] / r['matmul_ms']:.3f} | "
        f"{fmt(old and old / r['matmul_ms'], '.2f')} | {r['new_temp_mib']:.1f} | "
        f"{fmt(r['old_temp_mib'], '.1f')} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bench", choices=("vote", "sample"), default="vote",
                      help="what to measure: knn_vote, or sample_semantic_positives")
  parser.add_argument("--devices", type=int, default=None,
                      help="run one configuration with this many (fake CPU) devices")
  parser.add_argument("--sizes", type=int, nargs="+", default=None,
                      help="log2 of the queue sizes (default: vote 14 16 18 20, sample 12 14 16)")
  parser.add_argument("--ks", type=int, nargs="+", default=[1, 20], help="vote: k values")
  parser.add_argument("--batches", type=int, nargs="+", default=[128, 512, 2048],
                      help="sample: batch sizes B")
  parser.add_argument("--max-old-elements", type=int, default=3 * 512 * 2 ** 16,
                      help="sample: skip the old sampler above this N * B * Q")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up")
  parser.add_argument("--json", action="store_true", help="print rows as JSON (internal)")
  args = parser.parse_args()
  if args.sizes is None:
    args.sizes = [14, 16, 18, 20] if args.bench == "vote" else [12, 14, 16]
  table = _table if args.bench == "vote" else _sample_table

  if args.devices is not None:
    if args.bench == "vote":
      rows = _measure(args.devices, args.sizes, args.ks, args.repeats)
    else:
      rows = _measure_sample(args.devices, args.batches, args.sizes, args.repeats,
                             args.max_old_elements)
    print(json.dumps(rows) if args.json else table(rows))
    return

  rows = []
  for devices in (1, 8):
    cmd = [sys.executable, os.path.abspath(__file__), "--bench", args.bench, "--devices",
           str(devices), "--json", "--repeats", str(args.repeats),
           "--sizes", *map(str, args.sizes), "--ks", *map(str, args.ks),
           "--batches", *map(str, args.batches),
           "--max-old-elements", str(args.max_old_elements)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    rows += json.loads(out.strip().splitlines()[-1])
  print(table(rows))


if __name__ == "__main__":
  main()
