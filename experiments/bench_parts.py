"""Per-part cost of the pre-training step at the paper's shape, per chip (issue #20).

Each part of ``semppl_jax.train.train_step`` is compiled ahead of time as its own jitted
function (``ShapeDtypeStruct`` inputs: nothing runs or is allocated) over a 1-D ``'data'`` mesh
of ``--devices`` fake CPU devices, with the sharding it has inside the step (batch rows and
queue slots sharded, parameters replicated), and the whole step is compiled the same way for
SemPPL and ReLIC-only at every ``--queue-sizes`` (global Q; Q / devices slots per device). From
each compiled per-device program (``semppl_jax.compiled_cost``) it reads FLOPs, bytes accessed,
temporaries and collectives, and turns them into a roofline time per chip kind:
``max(FLOPs / peak, bytes / HBM bandwidth)`` (:data:`CHIPS`).

Parts (each mirrors its call in ``train.forward`` / ``objective_loss`` / ``train_step``; when a
call there changes, change it here too, and the 'rest' row, step minus the sum of the parts,
shows any drift):

* ``views``: ``train.make_views`` on the host-cropped uint8 views (flips, colour, blur, ...);
* ``encoder``: the online encoder's forward + backward (parameter gradients, against a given
  cotangent) on the large and on the small views (two calls, as in the step) and the target
  encoder's forward on the large views; the gradient all-reduce is in this part;
* ``heads``: projector + predictor forward + backward on the online embeddings (large, then
  small) and the target projector's forward on the target embeddings;
* ``loss``: ``losses.semppl_loss`` value + gradient with respect to the online predictions,
  for SemPPL (semantic positives as inputs) and for ReLIC-only (the step's all-invalid zeros
  as constants); their difference is the *semantic loss extra*;
* ``knn``: ``train.knn_pseudo_labels`` (the unlabelled rows, as the step queries them) against
  the queues;
* ``sampler``: ``semantic_positives.sample_semantic_positives``;
* ``enqueue``: ``queue.enqueue`` of the labelled rows' target projections;
* ``optimizer``: LARS update of the online parameters, Adam of the probe, target EMA.

The SemPPL-specific share is (kNN + sampler + semantic loss extra) / the whole SemPPL step, in
roofline time per chip. Numbers are XLA:CPU's cost model of the per-device program: an
accelerator's compiler fuses differently (bytes accessed most of all), and FLOPs are counted
the same whatever the dot's precision (a float32 ``precision=HIGHEST`` dot runs at a fraction
of the bfloat16 peak on a TPU), so the roofline times are estimates, comparable between parts
and between code versions. XLA counts a ``while`` body once (parts with such loops are
counted again with them unrolled, see :func:`unrolled_loops`) and a ``lax.cond`` at its heavier
branch (a monitor under a ``cond`` every N steps is counted in full).

Shape (default): the ImageNet config (``experiments/imagenet_r50.py``: 4096 images a step, 1/8
labelled, ResNet-50, 4 x 224 px + 2 x 96 px views, bfloat16 compute, ``remat='block'``) on 16
devices: 32 labelled + 224 unlabelled images per chip.

Usage:
  python experiments/bench_parts.py                          # paper shape, 16 devices
  python experiments/bench_parts.py --parts knn sampler --no-steps   # a few parts only
  python experiments/bench_parts.py --tiny --devices 2 --queue-sizes 64 256   # seconds
"""
import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARTS = ("views", "encoder", "heads", "loss", "knn", "sampler", "enqueue", "optimizer")
# Parts whose cost depends on the queue size (compiled once per Q).
QUEUE_PARTS = ("knn", "sampler", "enqueue")
STEP_OBJECTIVES = ("semppl", "relic")

# Per-chip peaks: (name, dense bfloat16 FLOP/s, HBM bytes/s, one-way interconnect bytes/s).
# v4: 275 TFLOP/s, 1.2 TB/s HBM, ICI 2,400 Gbps; v5e: 197 TFLOP/s, 0.82 TB/s, ICI 1,600 Gbps
# (Cloud TPU docs); H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s, NVLink 900 GB/s both ways.
CHIPS = (("v4", 275e12, 1.2e12, 300e9), ("v5e", 197e12, 0.82e12, 200e9),
         ("H100", 989e12, 3.35e12, 450e9))


def _imports():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from semppl_jax import train  # pylint: disable=g-import-not-at-top
  return jax, jnp, train


def roofline_ms(flops: float, bytes_accessed: float, peak: float, bandwidth: float) -> float:
  """max(FLOPs / peak, bytes / bandwidth), in ms."""
  return 1e3 * max(flops / peak, bytes_accessed / bandwidth)


def collective_ms(all_reduce_bytes: float, other_bytes: float, link: float) -> float:
  """Rough time of a program's collectives: an all-reduce sends its result twice (reduce-scatter
  + all-gather), the others once, over the chip's one-way interconnect bandwidth; in ms."""
  return 1e3 * (2 * all_reduce_bytes + other_bytes) / link


def paper_config(objective: str, devices: int, queue_size: int, tiny: bool):
  """TrainConfig of the ImageNet config on ``devices`` chips (global batch and queue)."""
  from experiments import bench_step  # pylint: disable=g-import-not-at-top
  from experiments import imagenet_r50  # pylint: disable=g-import-not-at-top
  labelled = imagenet_r50.LABELLED_BATCH_SIZE
  unlabelled = imagenet_r50.BATCH_SIZE - labelled
  if tiny:  # 8 labelled + 24 unlabelled per device.
    labelled, unlabelled = 8 * devices, 24 * devices
  # Resolved for TPU (the roofline's chips): the loss at DEFAULT precision, approximate top-k.
  config = bench_step.r50_config(objective, labelled, unlabelled, "bfloat16", "block", tiny,
                                 backend="tpu")
  return dataclasses.replace(config, num_shards=devices, queue_size=queue_size)


class Parts:
  """The abstract inputs and shardings of one config's parts (nothing is allocated)."""

  def __init__(self, config, mesh):
    jax, jnp, train = _imports()
    from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    self.config, self.mesh = config, mesh
    self.state = jax.eval_shape(lambda k: train.init_train_state(config, k),
                                jax.random.PRNGKey(0))
    self.state_shardings = train.train_state_shardings(self.state, mesh)
    self.rep = parallel.replicated_sharding(mesh)
    self.rows = NamedSharding(mesh, P(parallel.DATA_AXIS))          # [B, ...]
    self.view_rows = NamedSharding(mesh, P(None, parallel.DATA_AXIS))  # [V, B, ...]
    self.key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    v, n = config.views, config.network
    self.B, self.L, self.S = config.batch_size, v.num_large, v.num_small
    self.D = n.projection_size
    from semppl_jax import networks  # pylint: disable=g-import-not-at-top
    self.F = networks.embedding_size(n.encoder, n.width_multiplier)

  def sds(self, shape, dtype=None):
    jax, jnp, _ = _imports()
    return jax.ShapeDtypeStruct(tuple(shape), dtype or jnp.float32)

  # Each part: (function, abstract args, in_shardings).

  def views(self):
    from experiments import bench_step  # pylint: disable=g-import-not-at-top
    _, _, train = _imports()
    c = self.config
    batch = bench_step.abstract_batch(c, c.labelled_batch_size, c.unlabelled_batch_size)
    fn = lambda b, k: train.make_views(c, b, k, c.num_shards)
    return fn, (batch, self.key), (self.rows, None)

  def encoder(self):
    jax, jnp, train = _imports()
    import haiku as hk  # pylint: disable=g-import-not-at-top
    net, v, B, L, S = self.config.network, self.config.views, self.B, self.L, self.S
    enc = hk.transform_with_state(lambda x, t: train.encoder_fn(net)(x, t))
    large = self.sds((B * L, v.large_size, v.large_size, 3))
    small = self.sds((B * S, v.small_size, v.small_size, 3))
    params, state = jax.eval_shape(lambda k, x: enc.init(k, x, True), jax.random.PRNGKey(0),
                                   large)

    def fn(p, s, tp, ts, large, small, g_large, g_small):
      def online(p):
        e_l, s1 = enc.apply(p, s, None, large, True)
        e_s, s2 = enc.apply(p, s1, None, small, True)
        return (e_l, e_s), s2
      (e_l, e_s), vjp, s2 = jax.vjp(online, p, has_aux=True)
      grads = vjp((g_large.astype(e_l.dtype), g_small.astype(e_s.dtype)))[0]
      t_emb, t_state = enc.apply(tp, ts, None, large, True)
      return grads, s2, e_l, e_s, t_emb, t_state

    args = (params, state, params, state, large, small, self.sds((B * L, self.F)),
            self.sds((B * S, self.F)))
    return fn, args, (self.rep,) * 4 + (self.rows,) * 4

  def heads(self):
    jax, _, _ = _imports()
    import haiku as hk  # pylint: disable=g-import-not-at-top
    from semppl_jax import networks  # pylint: disable=g-import-not-at-top
    net, B, L, S, D, F = self.config.network, self.B, self.L, self.S, self.D, self.F

    def online_heads(x, t):
      proj = networks.MLP(net.projector_hidden_size, D, name="projector")(x, t)
      return networks.MLP(net.predictor_hidden_size, D, name="predictor")(proj, t)

    on = hk.transform_with_state(online_heads)
    tg = hk.transform_with_state(
        lambda x, t: networks.MLP(net.projector_hidden_size, D, name="projector")(x, t))
    emb_l, emb_s = self.sds((B * L, F)), self.sds((B * S, F))
    params, state = jax.eval_shape(lambda k, x: on.init(k, x, True), jax.random.PRNGKey(0),
                                   emb_l)
    tparams, tstate = jax.eval_shape(lambda k, x: tg.init(k, x, True), jax.random.PRNGKey(0),
                                     emb_l)

    def fn(p, s, tp, ts, emb_l, emb_s, t_emb, g_l, g_s):
      def online(p, emb_l, emb_s):
        pred_l, s1 = on.apply(p, s, None, emb_l, True)
        pred_s, s2 = on.apply(p, s1, None, emb_s, True)
        return (pred_l, pred_s), s2
      (pred_l, pred_s), vjp, s2 = jax.vjp(online, p, emb_l, emb_s, has_aux=True)
      grads = vjp((g_l, g_s))
      t_proj, t_state = tg.apply(tp, ts, None, t_emb, True)
      return grads, s2, pred_l, pred_s, t_proj, t_state

    args = (params, state, tparams, tstate, emb_l, emb_s, self.sds((B * L, F)),
            self.sds((B * L, D)), self.sds((B * S, D)))
    return fn, args, (self.rep,) * 4 + (self.rows,) * 5

  def loss(self):
    """``losses.semppl_loss`` value + gradient wrt the online predictions, as objective_loss
    calls it; every LossConfig field that is also a keyword of semppl_loss is passed."""
    jax, jnp, train = _imports()
    from semppl_jax import losses  # pylint: disable=g-import-not-at-top
    c, lc, B, L, S, D = self.config, self.config.loss, self.B, self.L, self.S, self.D
    N = lc.num_semantic_positives
    semantic = train.OBJECTIVES[c.objective].semantic
    keywords = inspect.signature(losses.semppl_loss).parameters
    kwargs = {f.name: getattr(lc, f.name) for f in dataclasses.fields(lc)
              if f.name in keywords}
    kwargs["num_negatives"] = lc.num_negatives or None
    kwargs["matmul_dtype"] = train.compute_dtype(c.network.compute_dtype)

    def fn(online, target, sem, valid, labels_star, key):
      if not semantic:  # The step's all-invalid zeros: constants, as in train.forward.
        sem = jnp.zeros((L, N, B, D), online.dtype)
        valid = jnp.zeros((L, N, B), bool)
      def value(online):
        return losses.semppl_loss(online, target, sem, valid, semantic_labels=labels_star,
                                  key=key if lc.num_negatives else None, **kwargs)[0]
      return jax.value_and_grad(value)(online)

    args = (self.sds((L + S, B, D)), self.sds((L, B, D)), self.sds((L, N, B, D)),
            self.sds((L, N, B), jnp.bool_), self.sds((B,), jnp.int32), self.key)
    return fn, args, (self.view_rows, self.view_rows, self.rep, self.rep, self.rep, None)

  def knn(self):
    _, _, train = _imports()
    c = self.config
    # As the step runs it: the unlabelled rows only (train.knn_pseudo_labels).
    fn = lambda queries, queue: train.knn_pseudo_labels(c, queries, queue)
    return (fn, (self.sds((self.L, self.B, self.D)), self.state.queue),
            (self.view_rows, self.state_shardings.queue))

  def sampler(self):
    _, jnp, _ = _imports()
    from semppl_jax import semantic_positives  # pylint: disable=g-import-not-at-top
    N = self.config.loss.num_semantic_positives
    fn = lambda key, labels, queue: semantic_positives.sample_semantic_positives(
        key, labels, queue, N)
    return (fn, (self.key, self.sds((self.B,), jnp.int32), self.state.queue),
            (None, self.rep, self.state_shardings.queue))

  def enqueue(self):
    _, jnp, _ = _imports()
    from semppl_jax import queue as queue_lib  # pylint: disable=g-import-not-at-top
    c = self.config
    b = c.labelled_batch_size
    fn = lambda queue, emb, labels: queue_lib.enqueue(queue, emb, labels,
                                                      num_shards=c.num_shards)
    return (fn, (self.state.queue, self.sds((self.L, b, self.D)), self.sds((b,), jnp.int32)),
            (self.state_shardings.queue, self.view_rows, self.rows))

  def optimizer(self):
    import optax  # pylint: disable=g-import-not-at-top
    _, _, train = _imports()
    from semppl_jax import optim  # pylint: disable=g-import-not-at-top
    c, st = self.config, self.state

    def fn(params, grads, opt_state, probe, probe_grads, probe_opt, target, step):
      updates, opt_state = train.online_optimizer(c, params).update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      p_updates, probe_opt = train.probe_optimizer(c).update(probe_grads, probe_opt, probe)
      decay = optim.target_ema_decay(step, base_decay=c.optim.target_base_decay,
                                     total_steps=c.training_steps)
      target = optim.target_ema({k: params[k] for k in target}, target, decay)
      return params, opt_state, optax.apply_updates(probe, p_updates), probe_opt, target

    args = (st.online_params, st.online_params, st.opt_state, st.probe_params, st.probe_params,
            st.probe_opt_state, st.target_params, st.step)
    return fn, args, (self.rep,) * 8

  def step(self):
    from experiments import bench_step  # pylint: disable=g-import-not-at-top
    _, _, train = _imports()
    c = self.config
    batch = bench_step.abstract_batch(c, c.labelled_batch_size, c.unlabelled_batch_size)
    fn = lambda s, b, k: train.train_step(c, s, b, k)
    return fn, (self.state, batch, self.key), (self.state_shardings, self.rows, None)


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def while_trip_counts(hlo_text: str):
  """The known trip counts of the ``while`` loops of optimised HLO text (one per loop)."""
  return [int(n) for line in hlo_text.splitlines() if " while(" in line
          for n in _TRIP_COUNT.findall(line)]


@contextlib.contextmanager
def unrolled_loops():
  """``lax.map`` and constant-bound ``lax.fori_loop`` unrolled while tracing.

  XLA's cost analysis counts the body of a ``while`` loop once, whatever its trip count (the
  kNN's ``lax.map`` over the L queues counts one queue of L, its ``fori_loop`` over chunks of
  slots one chunk: 1 of 64 bodies at the paper's Q = 2^20). Programs traced inside this
  context have those loops unrolled, so their FLOPs and bytes are those of every iteration.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  original_fori = jax.lax.fori_loop

  def unrolled_map(f, xs, *, batch_size=None):
    del batch_size
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = [f(jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(n)]
    return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

  def unrolled_fori(lower, upper, body, init, *, unroll=None):
    if isinstance(lower, int) and isinstance(upper, int):
      unroll = True
    return original_fori(lower, upper, body, init, unroll=unroll)

  with mock.patch.object(jax.lax, "map", unrolled_map), \
       mock.patch.object(jax.lax, "fori_loop", unrolled_fori):
    yield


def compile_cost(fn, args, in_shardings, mesh, donate=(), unroll=True):
  """Per-device cost of ``jit(fn)`` on ``args`` under ``mesh``.

  Returns ``(ProgramCost, compile seconds, counted)``: the cost of the program as the step runs
  it (temporaries, collectives), and, when it has ``while`` loops of more than one trip and
  ``unroll``, ``counted`` = (FLOPs, bytes) of the same program compiled with its loops unrolled
  (:func:`unrolled_loops`); else the program's own (FLOPs, bytes).
  """
  jax, _, _ = _imports()
  from semppl_jax import compiled_cost  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  jitted = jax.jit(fn, in_shardings=in_shardings, donate_argnums=donate)
  with jax.set_mesh(mesh):
    compiled = jitted.lower(*args).compile()
  cost = compiled_cost.program_cost(compiled)
  counted = (cost.flops, cost.bytes_accessed)
  if unroll and any(n > 1 for n in while_trip_counts(compiled.as_text())):
    jitted = jax.jit(lambda *a: fn(*a), in_shardings=in_shardings)
    with jax.set_mesh(mesh), unrolled_loops():
      flat = compiled_cost.program_cost(jitted.lower(*args).compile())
    counted = (flat.flops, flat.bytes_accessed)
  return cost, time.perf_counter() - start, counted


def row_of(part, objective, queue_size, cost, seconds, counted):
  """A result row: per-device GFLOP, GiB accessed, temp GiB, collectives, roofline ms.

  ``flops`` / ``bytes`` count every loop iteration (``counted``); ``program_flops`` /
  ``program_bytes`` are XLA's numbers for the program as compiled (loop bodies once).
  """
  all_reduce = sum(c.bytes for c in cost.collectives if c.op == "all-reduce")
  row = dict(part=part, objective=objective, queue_size=queue_size, compile_s=seconds,
             flops=counted[0], bytes=counted[1], program_flops=cost.flops,
             program_bytes=cost.bytes_accessed, temp_bytes=cost.temp_bytes,
             all_reduce_bytes=all_reduce, other_collective_bytes=cost.total_bytes() - all_reduce,
             collectives=len(cost.collectives))
  return with_roofline(row)


def with_roofline(row):
  """Adds ``ms_<chip>`` (compute / HBM roofline) and ``coll_ms_<chip>`` to ``row``."""
  for name, peak, bandwidth, link in CHIPS:
    row[f"ms_{name}"] = roofline_ms(row["flops"], row["bytes"], peak, bandwidth)
    row[f"coll_ms_{name}"] = collective_ms(row["all_reduce_bytes"],
                                           row["other_collective_bytes"], link)
  return row


def measure(devices, queue_sizes, parts=PARTS, steps=STEP_OBJECTIVES, tiny=False,
            step_queue_sizes=None, log=lambda row: None):
  """Compiles the parts and whole steps on the first ``devices`` devices; returns the rows.

  Args:
    devices: the mesh size (fake CPU devices; ``jax.device_count() >= devices``).
    queue_sizes: global Q values; the queue parts and the steps are compiled at each.
    parts: names from :data:`PARTS`.
    steps: objectives whose whole step is compiled at each Q.
    tiny: the tiny encoder on 16 / 8 px views (tests).
    step_queue_sizes: the Q values the whole steps are compiled at (default: every Q).
    log: called with each row as it is measured.

  Returns:
    A list of row dicts (see :func:`row_of`); ``objective`` is '' for parts that do not
    depend on it, ``queue_size`` 0 for parts that do not depend on Q.
  """
  jax, _, _ = _imports()
  from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(jax.devices()[:devices])
  rows = []

  def add(part, objective, queue_size, built, donate=()):
    fn, args, shardings = built
    cost, seconds, counted = compile_cost(fn, args, shardings, mesh, donate,
                                          unroll=part != "step")
    if part == "step":  # Loops of the step are the parts' loops: add what unrolling added.
      extra = [r for r in rows if r["queue_size"] in (0, queue_size) and r["part"] != "step"
               and r["objective"] in ("", objective)
               and not (r["part"] == "sampler" and objective != "semppl")]
      counted = (cost.flops + sum(r["flops"] - r["program_flops"] for r in extra),
                 cost.bytes_accessed + sum(r["bytes"] - r["program_bytes"] for r in extra))
    rows.append(row_of(part, objective, queue_size, cost, seconds, counted))
    log(rows[-1])

  base = {o: Parts(paper_config(o, devices, queue_sizes[0], tiny), mesh)
          for o in STEP_OBJECTIVES}
  for part in parts:
    if part in QUEUE_PARTS:
      continue
    if part == "loss":
      for objective in STEP_OBJECTIVES:
        add("loss", objective, 0, base[objective].loss())
    else:
      add(part, "", 0, getattr(base["semppl"], part)())
  for queue_size in queue_sizes:
    by_objective = {o: Parts(paper_config(o, devices, queue_size, tiny), mesh)
                    for o in STEP_OBJECTIVES}
    for part in parts:
      if part in QUEUE_PARTS:
        add(part, "", queue_size, getattr(by_objective["semppl"], part)())
    if step_queue_sizes is not None and queue_size not in step_queue_sizes:
      continue
    for objective in steps:
      add("step", objective, queue_size, by_objective[objective].step(), donate=(0,))
  return rows


def _find(rows, part, objective="", queue_size=0):
  for r in rows:
    if r["part"] == part and r["objective"] == objective and r["queue_size"] == queue_size:
      return r
  return None


def derived(rows, queue_sizes):
  """Semantic loss extra, sums of parts, 'rest' and the SemPPL-specific shares."""
  chips = [c[0] for c in CHIPS]
  extra = {}
  lo_s, lo_r = _find(rows, "loss", "semppl"), _find(rows, "loss", "relic")
  if lo_s and lo_r:
    extra = {k: lo_s[k] - lo_r[k] for k in ("flops", "bytes", "temp_bytes")}
    extra.update({f"ms_{c}": lo_s[f"ms_{c}"] - lo_r[f"ms_{c}"] for c in chips})
  shares = []
  for q in queue_sizes:
    knn, sampler = _find(rows, "knn", "", q), _find(rows, "sampler", "", q)
    step_s, step_r = _find(rows, "step", "semppl", q), _find(rows, "step", "relic", q)
    fixed = [r for r in rows if r["part"] not in QUEUE_PARTS + ("step",) and not (
        r["part"] == "loss" and r["objective"] == "relic")]
    parts = fixed + [r for r in rows if r["part"] in QUEUE_PARTS and r["queue_size"] == q]
    share = dict(queue_size=q, parts_flops=sum(r["flops"] for r in parts),
                 parts_bytes=sum(r["bytes"] for r in parts),
                 step_flops=step_s["flops"] if step_s else None,
                 step_bytes=step_s["bytes"] if step_s else None,
                 relic_step_flops=step_r["flops"] if step_r else None)
    for c, peak, _, _ in CHIPS:
      share[f"parts_ms_{c}"] = sum(r[f"ms_{c}"] for r in parts)
      if knn and sampler and extra:
        specific = knn[f"ms_{c}"] + sampler[f"ms_{c}"] + extra[f"ms_{c}"]
        total = step_s[f"ms_{c}"] if step_s else share[f"parts_ms_{c}"]
        share[f"knn_ms_{c}"], share[f"sampler_ms_{c}"] = knn[f"ms_{c}"], sampler[f"ms_{c}"]
        share[f"extra_ms_{c}"] = extra[f"ms_{c}"]
        share[f"specific_ms_{c}"] = specific
        share[f"step_ms_{c}"] = total
        share[f"share_{c}"] = specific / total
        # No step runs faster than its FLOPs at peak: against that the share is an upper bound
        # that does not rest on XLA:CPU's bytes for the encoder (unfused, bf16 kept in f32).
        compute = 1e3 * (step_s["flops"] if step_s else share["parts_flops"]) / peak
        share[f"compute_ms_{c}"] = compute
        share[f"share_bound_{c}"] = specific / compute
        share[f"relic_step_ms_{c}"] = step_r[f"ms_{c}"] if step_r else None
    shares.append(share)
  return extra, shares


def _q(q):
  return f"2^{q.bit_length() - 1}" if q and q & (q - 1) == 0 else str(q)


def report(rows, queue_sizes, label, header):
  """The markdown tables."""
  chips = [c[0] for c in CHIPS]
  extra, shares = derived(rows, queue_sizes)
  ms_head = " | ".join(f"{c} ms" for c in chips)
  coll_head = " / ".join(chips)
  lines = [header, "",
           f"| code | part | Q | GFLOP | GiB accessed | temp GiB | collectives (count, MiB) | "
           f"{ms_head} | collectives ms ({coll_head}) | compile s |",
           "|---|---|---|---:|---:|---:|---|" + "---:|" * len(chips) + "---|---:|"]
  for r in rows:
    name = r["part"] + (f" ({r['objective']})" if r["objective"] else "")
    coll_mib = (r["all_reduce_bytes"] + r["other_collective_bytes"]) / 2**20
    lines.append(
        f"| {label} | {name} | {_q(r['queue_size']) if r['queue_size'] else '–'} | "
        f"{r['flops'] / 1e9:,.2f} | {r['bytes'] / 2**30:,.3f} | {r['temp_bytes'] / 2**30:,.3f} | "
        f"{r['collectives']}, {coll_mib:,.2f} | "
        + " | ".join(f"{r[f'ms_{c}']:,.3f}" for c in chips)
        + " | " + " / ".join(f"{r[f'coll_ms_{c}']:,.3f}" for c in chips)
        + f" | {r['compile_s']:.0f} |")
  if extra:
    lines.append(
        f"| {label} | semantic loss extra (SemPPL loss − ReLIC loss) | – | "
        f"{extra['flops'] / 1e9:,.2f} | {extra['bytes'] / 2**30:,.3f} | "
        f"{extra['temp_bytes'] / 2**30:,.3f} | – | "
        + " | ".join(f"{extra[f'ms_{c}']:,.3f}" for c in chips) + " | – | – |")
  lines += ["", "| code | Q | chip | kNN ms | sampler ms | semantic loss extra ms | "
            "SemPPL-specific ms | SemPPL step ms (roofline) | share | step FLOPs at peak ms | "
            "share of that (upper bound) |", "|---|---|---|" + "---:|" * 8]
  for s in shares:
    for c in chips:
      if f"share_{c}" not in s:
        continue
      lines.append(
          f"| {label} | {_q(s['queue_size'])} | {c} | {s[f'knn_ms_{c}']:,.2f} | "
          f"{s[f'sampler_ms_{c}']:,.2f} | {s[f'extra_ms_{c}']:,.2f} | "
          f"{s[f'specific_ms_{c}']:,.2f} | {s[f'step_ms_{c}']:,.1f} | {s[f'share_{c}']:.1%} | "
          f"{s[f'compute_ms_{c}']:,.1f} | **{s[f'share_bound_{c}']:.1%}** |")
  fmt = lambda x: "–" if x is None else f"{x / 1e9:,.1f}"
  lines += ["", "| code | Q | sum of parts GFLOP | SemPPL step GFLOP | parts / step (FLOPs, "
            "bytes) | ReLIC-only step GFLOP |", "|---|---|---:|---:|---|---:|"]
  for s in shares:
    ratio = "–" if not s["step_flops"] else (
        f"{s['parts_flops'] / s['step_flops']:.3f}, {s['parts_bytes'] / s['step_bytes']:.3f}")
    lines.append(f"| {label} | {_q(s['queue_size'])} | {fmt(s['parts_flops'])} | "
                 f"{fmt(s['step_flops'])} | {ratio} | {fmt(s['relic_step_flops'])} |")
  return "\n".join(lines), extra, shares


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=16, help="fake CPU devices (chips)")
  parser.add_argument("--queue-sizes", type=int, nargs="+", default=[2**16, 2**20],
                      help="global queue sizes Q")
  parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
  parser.add_argument("--steps", nargs="*", default=list(STEP_OBJECTIVES),
                      choices=STEP_OBJECTIVES, help="objectives whose whole step is compiled")
  parser.add_argument("--no-steps", dest="steps", action="store_const", const=[])
  parser.add_argument("--tiny", action="store_true", help="tiny encoder, 16 / 8 px (tests)")
  parser.add_argument("--label", default="before", help="the 'code' column of the table")
  parser.add_argument("--out", default="", help="also write the report (markdown) here")
  parser.add_argument("--json", default="", help="also write the rows (JSON) here")
  args = parser.parse_args()
  # Fake CPU devices must be requested before jax starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                             f"device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  jax, _, _ = _imports()
  config = paper_config("semppl", args.devices, args.queue_sizes[0], args.tiny)
  per = lambda x: x // args.devices
  header = (f"bench_parts: {jax.default_backend()} x {args.devices} (fake), jax "
            f"{jax.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"{config.network.encoder} {config.network.compute_dtype} "
            f"remat={config.network.remat}, {per(config.labelled_batch_size)} labelled + "
            f"{per(config.unlabelled_batch_size)} unlabelled images per chip, "
            f"{config.views.num_large} x {config.views.large_size} px + "
            f"{config.views.num_small} x {config.views.small_size} px views; per-chip numbers")
  print(header, file=sys.stderr, flush=True)
  rows = measure(args.devices, args.queue_sizes, args.parts, args.steps, args.tiny,
                 log=lambda r: print(json.dumps(r), file=sys.stderr, flush=True))
  text, extra, shares = report(rows, args.queue_sizes, args.label, header)
  from experiments import bench_step  # pylint: disable=g-import-not-at-top
  bench_step.write_report(text, args.out, args.json,
                          dict(rows=rows, semantic_loss_extra=extra, shares=shares))


if __name__ == "__main__":
  main()
