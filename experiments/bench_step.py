"""Benchmark of the pre-training step (``semppl_jax.train.train_step``) for every objective.

Shapes (all on one device, per-device numbers):

* ``demo``: ``experiments/fashion_mnist.py`` as it is (tiny ResNet, 64 labelled + 192 unlabelled
  28 px images, 2 x 28 px + 2 x 16 px views cropped on the device, queues of 2560), fed by its
  real data source (Fashion-MNIST);
* ``r50``: ResNet-50 with the ImageNet views (4 x 224 px + 2 x 96 px, cropped on the host) and
  queues of 16384, ``--r50-batch`` labelled + unlabelled images per device (default 2 + 2), on
  random uint8 views (no ImageNet decode; uint8 is what the real pipeline moves, converted on
  the device), float32 compute and, for SemPPL, also bfloat16;
* ``paper``: the same at the paper's per-device batch (4096 over 32 devices: 16 labelled + 112
  unlabelled) in ``--paper-dtype`` (bfloat16) with ``--paper-remat`` (block); only when an
  accelerator is present (``--paper`` forces it, ``--no-paper`` skips it).

For every shape and variant (objective, compute dtype): the compile time (``lower`` +
``compile``), FLOPs per step (the compiled program's ``cost_analysis()``), per-device memory
(``memory_analysis()``: arguments, i.e. the train state and batch, and temporaries, i.e. the
activations and workspace), and the median wall time per step after ``--warmup`` steps. Steps
of all variants are interleaved round by round (the order rotates), together with a dense
``N x N @ N x N`` matmul in the variant's compute dtype (the same-process peak; N = 2048 on CPU,
8192 on accelerators) and, at the demo shape, the input pipeline (``DataSource.train_batch`` +
``parallel.host_local_to_global`` until the arrays are on the device), so that all of them see
the same machine load. Reported: ms/step, ratios to ReLIC, achieved FLOP/s and its share of the
matmul's, memory, and the input pipeline's time as a share of the SemPPL step (the experiment
prefetches the next batch while a step runs, so this is what it must hide).

``--paper-memory`` instead compiles ahead of time (``ShapeDtypeStruct`` inputs, nothing is
allocated) the SemPPL step at the paper's per-device batch for float32 / bfloat16 and each remat
policy, and reports ``memory_analysis()`` per device (several minutes on CPU).

Usage:
  python experiments/bench_step.py                      # demo + r50 (+ paper on GPU / TPU)
  python experiments/bench_step.py --shapes demo        # the demo shape only (minutes on CPU)
  python experiments/bench_step.py --tiny               # seconds: tiny shapes (tests)
  python experiments/bench_step.py --paper-memory       # AOT memory at the paper's batch
  python experiments/bench_step.py --devices 1 2 4 8    # AOT per-device cost vs devices
  python experiments/bench_step.py --train-steps 20     # also a short ImageNet-shape run

``--train-steps N`` then runs the real experiment (``semppl_jax.jaxline.experiment.Experiment`` through
its jaxline loop) for N steps on the ImageNet config at the ``r50`` per-device batch on every
local device, on tfds mock data unless ``--imagenet-dir`` holds ImageNet, and reports steps/s.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OBJECTIVES = ("semppl", "relic", "supervised")
PAPER_BATCH = 4096
PAPER_DEVICES = (32, 64)


@dataclasses.dataclass
class Variant:
  """One compiled train step: a shape, an objective, a compute dtype and its inputs."""
  shape: str
  name: str
  config: object            # train.TrainConfig
  batch_fn: object          # step -> global batch (device arrays)
  pipeline_fn: object = None  # step -> global batch, read and transferred now (timed)
  compiled: object = None
  state: object = None
  times: list = dataclasses.field(default_factory=list)
  pipeline_times: list = dataclasses.field(default_factory=list)
  row: dict = dataclasses.field(default_factory=dict)


def write_report(text: str, out: str, json_path: str, payload) -> None:
  """Prints ``text``; writes it to ``out`` and ``payload`` as JSON to ``json_path`` if given."""
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(payload, f, indent=1)


def _imports():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from semppl_jax import train  # pylint: disable=g-import-not-at-top
  return jax, jnp, train


def on_accelerator() -> bool:
  jax, _, _ = _imports()
  return jax.default_backend() != "cpu"


def demo_config(tiny: bool):
  """(experiment config, TrainConfig) of experiments/fashion_mnist.py (shrunk with tiny)."""
  from experiments import fashion_mnist  # pylint: disable=g-import-not-at-top
  from semppl_jax.jaxline import experiment_config  # pylint: disable=g-import-not-at-top
  c = fashion_mnist.get_config().experiment_kwargs.config
  if tiny:
    c.data.update(dict(labelled_batch_size=8, unlabelled_batch_size=8, label_percent=1))
    c.views.update(dict(num_large=2, num_small=1, large_size=16, small_size=8))
    c.network.update(dict(projector_hidden_size=32, projection_size=16,
                          predictor_hidden_size=32))
    c.queue.size = 64
  return c, experiment_config.train_config(c, num_shards=1)


def r50_config(objective: str, labelled: int, unlabelled: int, dtype: str, remat: str,
               tiny: bool, backend=None):
  """TrainConfig of the ImageNet config (experiments/imagenet_r50.py) at a per-device batch;
  ``backend`` resolves the backend-dependent switches (default: this process's backend)."""
  _, _, train = _imports()
  from experiments import imagenet_r50  # pylint: disable=g-import-not-at-top
  from semppl_jax.jaxline import experiment_config  # pylint: disable=g-import-not-at-top
  c = imagenet_r50.get_config(10).experiment_kwargs.config
  c.objective = objective
  c.data.update(dict(labelled_batch_size=labelled, unlabelled_batch_size=unlabelled))
  c.network.update(dict(compute_dtype=dtype, remat=remat))
  config = experiment_config.train_config(c, num_shards=1, backend=backend)
  if tiny:  # A tiny encoder on 16 / 8 px views: the same layout, seconds to compile.
    config = dataclasses.replace(
        config, queue_size=64,
        views=dataclasses.replace(config.views, large_size=16, small_size=8),
        network=dataclasses.replace(config.network, encoder="tiny_resnet", small_images=True,
                                    projector_hidden_size=32, projection_size=16,
                                    predictor_hidden_size=32))
  return config


def host_cropped_batch(config, seed: int):
  """A random host-local batch in the ImageNet layout (views cropped on the host), numpy."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  v = config.views
  batch = {}
  for part, size in (("labelled", config.labelled_batch_size),
                     ("unlabelled", config.unlabelled_batch_size)):
    batch[f"{part}_large"] = rng.randint(
        0, 256, (size, v.num_large, v.large_size, v.large_size, 3)).astype(np.uint8)
    batch[f"{part}_small"] = rng.randint(
        0, 256, (size, v.num_small, v.small_size, v.small_size, 3)).astype(np.uint8)
  batch["labels"] = rng.randint(0, config.num_classes, config.labelled_batch_size)
  batch["unlabelled_labels"] = rng.randint(0, config.num_classes,
                                           config.unlabelled_batch_size)
  return {k: (x.astype(np.int32) if x.dtype.kind == "i" else x) for k, x in batch.items()}


def abstract_batch(config, labelled: int, unlabelled: int):
  """``jax.ShapeDtypeStruct`` inputs of the step in the host-cropped ImageNet layout.

  ``labelled`` / ``unlabelled`` images (global); the views are uint8, as the real pipeline
  (``semppl_jax/data/pipelines.py``) moves them, and ``train.make_views`` converts on device.
  """
  jax, _, _ = _imports()
  host = host_cropped_batch(dataclasses.replace(
      config, labelled_batch_size=1, unlabelled_batch_size=1, num_shards=1), 0)
  return {k: jax.ShapeDtypeStruct(
      ((labelled if k.startswith("label") else unlabelled),) + x.shape[1:], x.dtype)
          for k, x in host.items()}


def _mesh_and_put(jax):
  from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(jax.devices()[:1])
  return mesh, lambda tree: parallel.host_local_to_global(tree, mesh)


def build_variants(args):
  """The variants to time, their configs and batches (nothing is compiled yet)."""
  jax, _, _ = _imports()
  from semppl_jax.jaxline import data_source  # pylint: disable=g-import-not-at-top
  _, put = _mesh_and_put(jax)
  variants = []

  # Demo shape, real data.
  if "demo" not in args.shapes:
    return variants + _r50_variants(args, put)
  c, base = demo_config(args.tiny)
  v = c.views
  source = data_source.DataSource(c.data, c.evaluation, data_source.Views(
      num_large=v.num_large, large_size=v.large_size, large_scale=tuple(v.large_scale),
      num_small=v.num_small, small_size=v.small_size, small_scale=tuple(v.small_scale)))
  num_batches = args.warmup + args.steps
  demo_batches = [put(source.train_batch(s)) for s in range(num_batches)]
  pipeline = lambda step: jax.block_until_ready(put(source.train_batch(1000 + step)))
  for i, objective in enumerate(OBJECTIVES):
    variants.append(Variant(
        "demo", objective, dataclasses.replace(base, objective=objective),
        lambda s: demo_batches[s % num_batches], pipeline if i == 0 else None))
  return variants + _r50_variants(args, put)


def _r50_variants(args, put):
  """The r50 and paper variants (random host-cropped views)."""
  jax, _, _ = _imports()
  variants = []
  # Tiny: the host-cropped layout once (each compile costs seconds even for a tiny network).
  r50_runs = [(o, "float32", "none") for o in (OBJECTIVES[:1] if args.tiny else OBJECTIVES)]
  if not args.tiny:
    r50_runs.append(("semppl", "bfloat16", "none"))
  shapes = [("r50", args.r50_batch[0], args.r50_batch[1], r50_runs)] if (
      "r50" in args.shapes) else []
  if args.paper:
    labelled = PAPER_BATCH // PAPER_DEVICES[0] // 8
    unlabelled = PAPER_BATCH // PAPER_DEVICES[0] - labelled
    shapes.append(("paper", labelled, unlabelled,
                   [(o, args.paper_dtype, args.paper_remat) for o in OBJECTIVES]))
  for shape, labelled, unlabelled, runs in shapes:
    host = None
    for objective, dtype, remat in runs:
      config = r50_config(objective, labelled, unlabelled, dtype, remat, args.tiny)
      if host is None:
        # uint8 views, as the real pipeline moves them (4x fewer bytes than float32).
        host = [host_cropped_batch(config, seed) for seed in range(2)]
        device = [put(b) for b in host]
        transfer = lambda step, host=host: jax.block_until_ready(put(host[step % 2]))
      name = objective + ("" if dtype == "float32" else f" {dtype}") + (
          "" if remat == "none" else f" remat={remat}")
      variants.append(Variant(shape, name, config, lambda s, device=device: device[s % 2],
                              transfer if name == "semppl" or (
                                  shape == "paper" and objective == "semppl") else None))
  return variants


def compile_variant(variant):
  """Initial state, compiled step, compile time, FLOPs and memory of one variant."""
  jax, _, train = _imports()
  config = variant.config
  state = train.init_train_state(config, jax.random.key(0))
  step = jax.jit(lambda s, b, k: train.train_step(config, s, b, k), donate_argnums=(0,))
  batch = variant.batch_fn(0)
  key = jax.random.key(1)
  start = time.perf_counter()
  compiled = step.lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  variant.compiled, variant.state = compiled, state
  variant.row = dict(
      shape=variant.shape, variant=variant.name, objective=config.objective,
      compute_dtype=config.network.compute_dtype, remat=config.network.remat,
      encoder=config.network.encoder, labelled=config.labelled_batch_size,
      unlabelled=config.unlabelled_batch_size, compile_s=compile_s,
      flops=float(cost.get("flops", float("nan"))) if cost else float("nan"),
      args_mib=memory.argument_size_in_bytes / 2 ** 20,
      temp_mib=memory.temp_size_in_bytes / 2 ** 20)
  print(json.dumps(variant.row), file=sys.stderr, flush=True)


def run_step(variant, step: int) -> float:
  """Runs one step of ``variant`` (its state is donated and replaced); returns seconds."""
  jax, _, _ = _imports()
  batch = variant.batch_fn(step)
  key = jax.random.fold_in(jax.random.key(2), step)
  start = time.perf_counter()
  variant.state, metrics = variant.compiled(variant.state, batch, key)
  jax.block_until_ready((variant.state, metrics))
  return time.perf_counter() - start


def matmul_fns(dtypes, size: int):
  """dtype -> a function timing one ``size x size`` matmul (seconds) and its FLOPs."""
  jax, jnp, _ = _imports()
  fns = {}
  for dtype in dtypes:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))

    def timed(mm=mm, a=a, b=b):
      start = time.perf_counter()
      jax.block_until_ready(mm(a, b))
      return time.perf_counter() - start
    fns[dtype] = timed
  return fns, 2.0 * size ** 3


def benchmark(args):
  """Compiles and times every variant; returns result rows."""
  variants = build_variants(args)
  for variant in variants:
    compile_variant(variant)
  dtypes = sorted({v.config.network.compute_dtype for v in variants})
  size = args.matmul_size or (8192 if on_accelerator() else (256 if args.tiny else 2048))
  matmuls, matmul_flops = matmul_fns(dtypes, size)
  matmul_times = {d: [] for d in dtypes}
  for rnd in range(args.warmup + args.steps):
    # Rotate the order so no variant always runs first (or right after the matmul).
    order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
    for variant in order:
      seconds = run_step(variant, rnd)
      if rnd >= args.warmup:
        variant.times.append(seconds)
        if variant.pipeline_fn is not None:
          start = time.perf_counter()
          variant.pipeline_fn(rnd)
          variant.pipeline_times.append(time.perf_counter() - start)
    for dtype in dtypes:
      seconds = matmuls[dtype]()
      if rnd >= args.warmup:
        matmul_times[dtype].append(seconds)
    print(f"[bench_step] round {rnd + 1}/{args.warmup + args.steps} done", file=sys.stderr,
          flush=True)
  peak = {d: matmul_flops / statistics.median(t) for d, t in matmul_times.items()}
  rows = []
  for variant in variants:
    row = dict(variant.row)
    row["ms"] = 1e3 * statistics.median(variant.times)
    row["flops_per_s"] = row["flops"] / (row["ms"] / 1e3)
    row["matmul_flops_per_s"] = peak[row["compute_dtype"]]
    row["peak_share"] = row["flops_per_s"] / row["matmul_flops_per_s"]
    row["pipeline_ms"] = (1e3 * statistics.median(variant.pipeline_times)
                          if variant.pipeline_times else None)
    relic = [v for v in variants if v.shape == variant.shape and v.name.startswith("relic")]
    row["relic_ms"] = 1e3 * statistics.median(relic[0].times) if relic else None
    rows.append(row)
  return rows, size


def table(rows, matmul_size) -> str:
  """The markdown step table."""
  lines = [
      "| shape | variant | images / device (lab. + unlab.) | compile s | ms / step | "
      "/ ReLIC | GFLOP / step | GFLOP/s | share of matmul peak | args MiB | temp MiB | "
      "input pipeline / step |",
      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ratio = f"{r['ms'] / r['relic_ms']:.3f}" if r["relic_ms"] else "–"
    pipe = "–"
    if r["pipeline_ms"] is not None:
      what = "" if r["shape"] == "demo" else " (transfer only)"
      pipe = f"{r['pipeline_ms'] / r['ms']:.1%}{what}"
    lines.append(
        f"| {r['shape']} ({r['encoder']}) | {r['variant']} | {r['labelled']} + "
        f"{r['unlabelled']} | {r['compile_s']:.1f} | {r['ms']:.1f} | {ratio} | "
        f"{r['flops'] / 1e9:.2f} | {r['flops_per_s'] / 1e9:.1f} | {r['peak_share']:.1%} | "
        f"{r['args_mib']:.1f} | {r['temp_mib']:.1f} | {pipe} |")
  peaks = sorted({(r["compute_dtype"], r["matmul_flops_per_s"]) for r in rows})
  lines.append("")
  lines.append("Matmul peak (same process, interleaved, " f"{matmul_size}^2): " + ", ".join(
      f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks))
  return "\n".join(lines)


def paper_memory(args):
  """AOT-compiled per-device memory of the SemPPL step at the paper's per-device batch."""
  jax, _, train = _imports()
  rows = []
  for devices in args.paper_devices:
    per_device = PAPER_BATCH // devices
    labelled = per_device // 8
    for dtype in args.memory_dtypes:
      for remat in args.memory_remat:
        config = r50_config("semppl", labelled, per_device - labelled, dtype, remat,
                            args.tiny)
        state = jax.eval_shape(lambda k, c=config: train.init_train_state(c, k),
                               jax.random.key(0))
        batch = abstract_batch(config, labelled, per_device - labelled)
        step = jax.jit(lambda s, b, k, c=config: train.train_step(c, s, b, k),
                       donate_argnums=(0,))
        start = time.perf_counter()
        compiled = step.lower(state, batch, jax.ShapeDtypeStruct(
            (), jax.random.key(0).dtype)).compile()
        memory = compiled.memory_analysis()
        row = dict(devices=devices, images=per_device, labelled=labelled, dtype=dtype,
                   remat=remat, compile_s=time.perf_counter() - start,
                   args_gib=memory.argument_size_in_bytes / 2 ** 30,
                   temp_gib=memory.temp_size_in_bytes / 2 ** 30,
                   output_gib=memory.output_size_in_bytes / 2 ** 30,
                   alias_gib=memory.alias_size_in_bytes / 2 ** 30)
        row["total_gib"] = (row["args_gib"] + row["temp_gib"] + row["output_gib"]
                            - row["alias_gib"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  lines = [
      "| devices (4096 images) | images / device | compute | remat | args GiB | temp GiB | "
      "args + temp + non-aliased outputs GiB | fits 16 GiB | fits 32 GiB | compile s |",
      "|---:|---:|---|---|---:|---:|---:|---|---|---:|"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['images']} | {r['dtype']} | {r['remat']} | "
        f"{r['args_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} | "
        f"{'yes' if r['total_gib'] < 16 else 'no'} | {'yes' if r['total_gib'] < 32 else 'no'} | "
        f"{r['compile_s']:.0f} |")
  return rows, "\n".join(lines)


def _shapes(collective) -> str:
  """'op f32[..]' of a collective, its first two arrays (a combined all-reduce has many)."""
  more = f" +{len(collective.shapes) - 2}" if len(collective.shapes) > 2 else ""
  return f"{collective.op} {', '.join(collective.shapes[:2])}{more}"


def scaling(args):
  """AOT per-device cost of the step on 1 / 2 / 4 / 8 ... fake devices at one global batch.

  The batch is ``--scaling-batch`` labelled + unlabelled images in all (the ImageNet layout,
  views cropped on the host); each device count compiles the same global program with the batch
  and queues sharded over a mesh of that many devices. Nothing runs: the numbers are the
  compiled per-device program's (``semppl_jax.compiled_cost``).
  """
  jax, _, train = _imports()
  from semppl_jax import compiled_cost  # pylint: disable=g-import-not-at-top
  from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
  labelled, unlabelled = args.scaling_batch
  rows = []
  for shape in args.scaling_shapes:
    for objective in args.scaling_objectives:
      for devices in args.devices:
        config = dataclasses.replace(
            r50_config(objective, labelled, unlabelled, "float32", "none", shape == "tiny"),
            num_shards=devices)
        if shape == "tiny":
          config = dataclasses.replace(config, queue_size=1024, views=dataclasses.replace(
              config.views, large_size=32, small_size=16))
        mesh = parallel.make_mesh(jax.devices()[:devices])
        state = jax.eval_shape(lambda k, c=config: train.init_train_state(c, k),
                               jax.random.PRNGKey(0))
        batch = abstract_batch(config, labelled, unlabelled)
        shardings = train.train_state_shardings(state, mesh)
        step = jax.jit(lambda s, b, k, c=config: train.train_step(c, s, b, k),
                       in_shardings=(shardings, parallel.data_sharding(mesh), None),
                       out_shardings=(shardings, None), donate_argnums=(0,))
        start = time.perf_counter()
        with jax.set_mesh(mesh):
          compiled = step.lower(state, batch, jax.random.PRNGKey(0)).compile()
        cost = compiled_cost.program_cost(compiled)
        row = dict(shape=shape, objective=objective, devices=devices,
                   compile_s=time.perf_counter() - start, **compiled_cost.summary(cost),
                   largest=_shapes(compiled_cost.largest_collective(cost)))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  lines = [f"Global batch {labelled} + {unlabelled} images; per-device numbers of the compiled "
           "program.", "",
           "| shape | objective | devices | GFLOP / device | x 1 device | GiB accessed | "
           "temp MiB | collectives (AG / AR / other) | collective MiB | largest (MiB) |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---|"]
  first = {}
  for r in rows:
    base = first.setdefault((r["shape"], r["objective"]), r["gflop"])
    other = r["collectives"] - r["all-gather"] - r["all-reduce"]
    lines.append(
        f"| {r['shape']} | {r['objective']} | {r['devices']} | {r['gflop']:.2f} | "
        f"{r['gflop'] / base:.3f} | {r['gib_accessed']:.3f} | {r['temp_mib']:.1f} | "
        f"{r['collectives']} ({r['all-gather']} / {r['all-reduce']} / {other}) | "
        f"{r['collective_mib']:.2f} | {r['largest_collective_mib']:.2f} {r['largest']} |")
  return rows, "\n".join(lines)


def train_run(args):
  """A short run of the real experiment on the ImageNet config; returns (steps/s, stdout)."""
  jax, _, _ = _imports()
  from semppl_jax.jaxline import compat as jaxline_compat  # pylint: disable=g-import-not-at-top
  jaxline_compat.install()
  from experiments import imagenet_r50  # pylint: disable=g-import-not-at-top
  from semppl_jax.jaxline import experiment  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  config = imagenet_r50.get_config(10)
  c = config.experiment_kwargs.config
  config.training_steps = args.train_steps
  config.checkpoint_dir = args.run_dir
  c.training_steps = args.train_steps
  c.data.update(dict(labelled_batch_size=args.r50_batch[0] * n,
                     unlabelled_batch_size=args.r50_batch[1] * n,
                     data_dir=args.imagenet_dir or ""))
  # Warm-up inside the short run, and at least one step of cosine decay after it.
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, args.train_steps // 2)
  c.evaluate_at_end = False
  c.log_every_steps = max(1, args.train_steps - 1)
  if args.tiny:
    c.data.image_size = 32
    c.views.update(dict(large_size=16, small_size=8))
    c.network.update(dict(encoder="tiny_resnet", small_images=True, compute_dtype="float32",
                          remat="none", projector_hidden_size=32, projection_size=16,
                          predictor_hidden_size=32))
    c.queue.size = 64
  elif not on_accelerator():
    c.network.compute_dtype = "float32"
  def run():
    exp = experiment.Experiment("train", jax.random.PRNGKey(0), c)
    exp.step(global_step=0, rng=None)  # Compiles.
    jax.block_until_ready(exp.train_state)
    start = time.perf_counter()
    for step in range(1, args.train_steps):
      exp.step(global_step=step, rng=None)
    jax.block_until_ready(exp.train_state)
    return (args.train_steps - 1) / (time.perf_counter() - start)

  if args.imagenet_dir:
    rate = run()
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=max(64, 4 * c.data.unlabelled_batch_size)):
      rate = run()
  return dict(devices=n, steps=args.train_steps, steps_per_s=rate,
              images_per_s=rate * (c.data.labelled_batch_size + c.data.unlabelled_batch_size),
              encoder=c.network.encoder, compute_dtype=c.network.compute_dtype,
              remat=c.network.remat, data="imagenet" if args.imagenet_dir else "tfds mock")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny shapes (tiny ResNet, 16 / 8 px views): a smoke test")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
  parser.add_argument("--shapes", nargs="+", default=["demo", "r50"], choices=("demo", "r50"),
                      help="shapes to time (the paper shape follows --paper)")
  parser.add_argument("--r50-batch", type=int, nargs=2, default=(2, 2),
                      metavar=("LABELLED", "UNLABELLED"), help="r50 images per device")
  paper = parser.add_mutually_exclusive_group()
  paper.add_argument("--paper", dest="paper", action="store_true", default=None,
                     help="time the paper's per-device batch (default: on GPU / TPU only)")
  paper.add_argument("--no-paper", dest="paper", action="store_false")
  parser.add_argument("--paper-dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--paper-remat", default="block", choices=("none", "block", "group"))
  parser.add_argument("--matmul-size", type=int, default=0, help="peak matmul N (0: auto)")
  parser.add_argument("--paper-memory", action="store_true",
                      help="only: AOT per-device memory at the paper's per-device batch")
  parser.add_argument("--paper-devices", type=int, nargs="+", default=[32])
  parser.add_argument("--memory-dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--memory-remat", nargs="+", default=["none", "block"])
  parser.add_argument("--train-steps", type=int, default=0,
                      help="also run the ImageNet experiment for this many steps")
  parser.add_argument("--imagenet-dir", default="", help="tfds data_dir with ImageNet")
  parser.add_argument("--run-dir", default="/tmp/semppl_bench_step_run")
  parser.add_argument("--out", default="", help="also write the report (markdown) here")
  parser.add_argument("--json", default="", help="also write the rows (JSON) here")
  parser.add_argument("--devices", type=int, nargs="+", default=[],
                      help="only: AOT per-device cost on these fake-device counts (scaling)")
  parser.add_argument("--scaling-shapes", nargs="+", default=["tiny", "r50"],
                      choices=("tiny", "r50"))
  parser.add_argument("--scaling-objectives", nargs="+", default=["semppl"],
                      choices=OBJECTIVES)
  parser.add_argument("--scaling-batch", type=int, nargs=2, default=(16, 112),
                      metavar=("LABELLED", "UNLABELLED"), help="global images (scaling)")
  args = parser.parse_args()
  if args.devices:  # Fake CPU devices must be requested before jax starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={max(args.devices)}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  jax, _, _ = _imports()
  header = (f"bench_step: {jax.default_backend()} x {jax.device_count()} "
            f"({jax.devices()[0].device_kind}), jax {jax.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  report, results = [header, ""], {}
  if args.devices:
    rows, text = scaling(args)
    results["scaling"] = rows
    report.append(text)
  elif args.paper_memory:
    rows, text = paper_memory(args)
    results["paper_memory"] = rows
    report.append(text)
  else:
    if args.paper is None:
      args.paper = on_accelerator()
    rows, size = benchmark(args)
    results["steps"] = rows
    report.append(table(rows, size))
    if args.train_steps:
      run = train_run(args)
      results["train_run"] = run
      report += ["", f"Training run ({run['data']}, {run['encoder']} {run['compute_dtype']} "
                 f"remat={run['remat']}, {run['devices']} device(s)): {run['steps']} steps, "
                 f"{run['steps_per_s']:.3f} steps/s, {run['images_per_s']:.1f} images/s "
                 "after the compile step"]
  write_report("\n".join(report), args.out, args.json, results)


if __name__ == "__main__":
  main()
