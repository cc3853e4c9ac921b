"""Per-device compiled cost of the loss and the kNN labeller at a paper-like shape (issue #20).

AOT only (nothing runs): each program is lowered and compiled for ``--devices`` fake CPU devices
on a 1-D ``'data'`` mesh, with the batch sharded along ``'data'`` and the queues along their
entries, and read with ``semppl_jax.compiled_cost.program_cost`` (XLA's per-device FLOPs, bytes
accessed, temporaries and collectives). XLA:CPU's cost model, not a TPU's: the numbers compare
variants of the same program, they are not TPU timings.

Rows:

* ``loss``: value and gradient (w.r.t. the online predictions) of ``losses.semppl_loss`` with
  V = 6 views, L = 4 large views, N = 3 semantic draws (16 candidate sets), D = 256, B = 256
  images per device. Variants: ``highest f32`` (before: full-precision float32 matmuls, the
  KL's cross term a HIGHEST dot), ``default f32`` (``precision='default'``), ``bf16``
  (``matmul_dtype=bfloat16``, what ``compute_dtype='bfloat16'`` now runs) and ``bf16
  batched`` (the 16 candidate sets ``vmap``-ed into one batched contraction instead of the
  loop: measured to decide whether to restructure the loss). The HIGHEST column counts the
  dots left at HIGHEST precision in the optimised HLO.
* ``knn``: ``knn.pseudo_labels`` (k = 1, 1000 classes) of the large views' queries against
  L = 4 queues of Q entries. ``before``: all B rows queried against a float32 queue;
  ``after``: the B_u unlabelled rows only (the labelled rows are never used); ``after
  bf16``: the same against a bfloat16 queue. The L queues run in a ``lax.map``, whose body
  XLA's cost analysis counts once: these rows are per queue.

Usage:
  python experiments/bench_loss_knn.py                       # 16 devices, Q = 2^16 and 2^20
  python experiments/bench_loss_knn.py --devices 8 --sizes 16
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=16)
  parser.add_argument("--per-device-batch", type=int, default=256)
  parser.add_argument("--labelled-fraction", type=float, default=0.125,
                      help="B_l / B (imagenet_r50: 512 of 4096)")
  parser.add_argument("--sizes", type=int, nargs="+", default=[16, 20], help="log2 Q")
  parser.add_argument("--skip-loss", action="store_true")
  parser.add_argument("--skip-knn", action="store_true")
  args = parser.parse_args(argv)

  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from semppl_jax import compiled_cost, knn, losses, parallel  # pylint: disable=g-import-not-at-top
  from semppl_jax import queue as queue_lib  # pylint: disable=g-import-not-at-top

  n = args.devices
  mesh = parallel.make_mesh(jax.devices()[:n])
  batch = args.per_device_batch * n
  V, L, N, D, C = 6, 4, 3, 256, 1000
  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, s))
  rows = []

  def cost_row(part, variant, fn, *abstract_args):
    start = time.time()
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(*abstract_args).compile()
    cost = compiled_cost.program_cost(compiled)
    highest = sum("operand_precision={highest" in line for line in compiled.as_text().splitlines()
                  if " dot(" in line or " convolution(" in line)
    rows.append(dict(part=part, variant=variant, gflop=cost.flops / 1e9,
                     gib=cost.bytes_accessed / 2**30, temp_gib=cost.temp_bytes / 2**30,
                     coll_mib=cost.total_bytes() / 2**20, highest=highest,
                     compile_s=time.time() - start))
    print(rows[-1], flush=True)

  if not args.skip_loss:
    batch_rows = P(None, "data")
    online = spec((V, batch, D), jnp.float32, batch_rows)
    target = spec((L, batch, D), jnp.float32, batch_rows)
    semantic = spec((L, N, batch, D), jnp.float32, P(None, None, "data"))
    valid = spec((L, N, batch), jnp.bool_, P(None, None, "data"))

    def loss_grad(**kw):
      return jax.value_and_grad(lambda o, t, s, v: losses.semppl_loss(o, t, s, v, **kw)[0])

    def batched_grad(o, t, s, v):
      """The same objective with the 16 candidate sets vmapped (one batched contraction)."""
      def loss(o):
        o = losses.l2_normalize(o)
        t_n = jax.lax.stop_gradient(losses.l2_normalize(t))
        s_n = jax.lax.stop_gradient(losses.l2_normalize(s)).reshape(L * N, batch, D)
        terms = lambda c, m: losses._candidate_set_terms(  # pylint: disable=protected-access
            o, c, None, 0.2, column_mask=m, matmul_dtype=jnp.bfloat16)
        ce_a, inv_a, _ = jax.vmap(lambda c: terms(c, None))(t_n)
        ce_s, inv_s, _ = jax.vmap(terms)(s_n, v.reshape(L * N, batch))
        denominator = jnp.maximum(jnp.sum(v.astype(jnp.float32)), 1.0)
        return (0.3 * (jnp.mean(ce_a) + 0.2 * jnp.sum(ce_s) / (V * denominator))
                + 5.0 * (jnp.mean(inv_a) + jnp.sum(inv_s) / denominator))
      return jax.value_and_grad(loss)(o)

    cost_row("loss", "highest f32 (before)", loss_grad(), online, target, semantic, valid)
    cost_row("loss", "default f32", loss_grad(precision="default"), online, target, semantic,
             valid)
    cost_row("loss", "bf16 (after)", loss_grad(matmul_dtype=jnp.bfloat16), online, target,
             semantic, valid)
    cost_row("loss", "bf16 batched (not adopted)", batched_grad, online, target, semantic,
             valid)

  if not args.skip_knn:
    unlabelled = batch - int(round(batch * args.labelled_fraction))
    for log2 in args.sizes:
      size = 2**log2
      for variant, num_rows, dtype in (("before: all rows, f32 queue", batch, jnp.float32),
                                       ("after: unlabelled rows", unlabelled, jnp.float32),
                                       ("after: unlabelled rows, bf16 queue", unlabelled,
                                        jnp.bfloat16)):
        queries = spec((L, num_rows, D), jnp.float32, P())
        queue = queue_lib.Queue(spec((L, size, D), dtype, P(None, "data")),
                                spec((L, size), jnp.int32, P(None, "data")),
                                spec((), jnp.int32, P()))
        fn = lambda q, queue: knn.pseudo_labels(q, queue, k=1, num_classes=C)
        cost_row(f"knn Q=2^{log2}", variant, fn, queries, queue)

  print(f"\n{n} devices, {args.per_device_batch} images per device (B = {batch}), "
        f"jax {jax.__version__}, XLA:CPU cost model\n")
  print("| part | variant | GFLOP / device | GiB accessed | temp GiB | collectives MiB | "
        "HIGHEST dots |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['part']} | {r['variant']} | {r['gflop']:.1f} | {r['gib']:.2f} | "
          f"{r['temp_gib']:.2f} | {r['coll_mib']:.1f} | {r['highest']} |")


if __name__ == "__main__":
  main()
