"""The experiments' config schema: every field checked before anything loads or compiles, and
the mapping of a checked config to the typed arguments of the pure modules.

Part of the jaxline layer: ``semppl_jax/jaxline/experiment.py`` (pre-training) and
``semppl_jax/jaxline/eval_experiment.py`` (evaluation) call these, and nothing below them reads a config.
Each error is ``ValueError("config.<field>: ...")`` (``semppl_jax.jaxline.config_rules``).
"""
import os

from ml_collections import config_dict

from semppl_jax import augmentations
from semppl_jax import losses
from semppl_jax.jaxline import config_rules as rules
from semppl_jax import networks
from semppl_jax import train

DATASETS = ("fashion_mnist", "imagenet", "image_folder")


def validate_pretrain_config(config: config_dict.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
  """Checks every field of a pre-training config before anything loads or compiles.

  Args:
    config: ``experiment_kwargs.config`` of a launch config.
    num_devices: global number of devices on the data axis.
    num_processes: number of processes (hosts).

  Raises:
    ValueError: ``config.<field>: ...`` naming the field and what is allowed.
  """
  objective = rules.one_of(config, "objective", tuple(train.OBJECTIVES))
  steps = rules.integer(config, "training_steps", low=1)
  rules.integer(config, "log_every_steps", low=1)
  rules.boolean(config, "evaluate_at_end")
  image_size = _check_data(config)
  for field in ("data.labelled_batch_size", "data.unlabelled_batch_size"):
    if field.endswith("unlabelled_batch_size") and rules.get(config, field) == 0:
      continue  # No unlabelled images is allowed (the supervised baseline's data).
    rules.batch_divisible(config, field, num_devices=num_devices, num_processes=num_processes)

  large = rules.integer(config, "views.num_large", low=1)
  small = rules.integer(config, "views.num_small", low=0)
  if objective != "supervised" and large + small < 2:
    rules.fail("views.num_small", "the invariance term needs at least two views in total "
               f"(num_large + num_small >= 2), got {large} + {small}.")
  large_size = rules.integer(config, "views.large_size", low=1, high=image_size)
  sizes = [large_size]
  if small:
    sizes.append(rules.integer(config, "views.small_size", low=1, high=large_size))
  rules.interval(config, "views.large_scale", 0.0, 1.0, low_open=True)
  rules.interval(config, "views.small_scale", 0.0, 1.0, low_open=True)
  v = config.views
  if len(v.blur_probability) != len(v.solarize_probability) or not v.blur_probability:
    rules.fail("views.blur_probability", "views.blur_probability and "
               "views.solarize_probability must have the same number (>= 1) of entries, one "
               f"per alternating preset; got {list(v.blur_probability)} and "
               f"{list(v.solarize_probability)}.")
  for field in ("color_jitter_probability", "grayscale_probability"):
    rules.number(config, f"views.{field}", 0.0, 1.0)
  for name in ("blur_probability", "solarize_probability"):
    for i in range(len(v[name])):
      rules.number({"views": {name: {str(i): v[name][i]}}}, f"views.{name}.{i}", 0.0, 1.0)
  rules.interval(config, "views.blur_sigma_range", 0.0, 100.0, low_open=True)
  if "antialias" in v:  # Optional: host-cropped views only (ImageNet, image folders).
    rules.boolean(config, "views.antialias")

  _check_encoder(config, min(sizes), max(sizes), largest_is=f"views of {max(sizes)} px",
                 smallest_is=f"{min(sizes)} px", inputs="views")
  rules.one_of(config, "network.remat", networks.REMAT_POLICIES)
  for field in ("projector_hidden_size", "projection_size", "predictor_hidden_size"):
    rules.integer(config, f"network.{field}", low=1)

  labelled = config.data.labelled_batch_size
  queue = rules.multiple_of(config, "queue.size", num_devices, "the global number of devices")
  if queue < labelled:
    rules.fail("queue.size", f"{queue} is smaller than the labelled items written per step "
               f"(data.labelled_batch_size={labelled}).")
  rules.integer(config, "semppl.knn_k", low=1, high=queue)
  rules.integer(config, "semppl.num_semantic_positives", low=1)
  rules.number(config, "semppl.temperature", 0.0, low_open=True)
  for field in ("contrastive_weight", "semantic_weight", "invariance_weight"):
    rules.number(config, f"semppl.{field}", 0.0)
  batch = labelled + config.data.unlabelled_batch_size
  if rules.integer(config, "semppl.num_negatives", low=0):
    rules.integer(config, "semppl.num_negatives", low=1, high=batch - 1)
  # Ablation switches (optional fields: configs without them run docs/design.md §2 as written).
  choices = {"semantic_negatives": losses.SEMANTIC_NEGATIVES,
             "pseudo_labels": train.PSEUDO_LABEL_SOURCES, "knn_query": train.KNN_QUERIES}
  for field in _LOSS_SWITCHES:
    if field not in config.semppl:
      continue
    if field in choices:
      rules.one_of(config, f"semppl.{field}", choices[field])
    elif field in ("oracle_accuracy", "min_vote_agreement"):
      rules.number(config, f"semppl.{field}", 0.0, 1.0)
    elif field == "knn_monitor_every":
      rules.integer(config, f"semppl.{field}", low=1)
    elif field == "semantic_invariance_weight":
      if config.semppl[field] is not None:  # None: the invariance weight.
        rules.number(config, f"semppl.{field}", 0.0)
    elif isinstance(_LOSS_SWITCH_DEFAULTS[field], bool):
      rules.boolean(config, f"semppl.{field}")
    else:
      rules.integer(config, f"semppl.{field}", low=0)
  # Cost switches (issue #20; optional, defaults: float32 queue, exact top-k, 'auto' precision).
  if "precision" in config.semppl:
    rules.one_of(config, "semppl.precision", PRECISION_CHOICES)
  if "dtype" in config.queue:
    rules.one_of(config, "queue.dtype", train.QUEUE_DTYPES)
  if config.semppl.get("pseudo_labels", "knn") != "knn" and config.data.dataset == "image_folder":
    rules.fail("semppl.pseudo_labels", f"{config.semppl.pseudo_labels!r} reads the hidden labels "
               "of the unlabelled images, and image_folder data has none; use 'knn'.")

  rules.number(config, "optimizer.base_learning_rate", 0.0)
  rules.number(config, "optimizer.weight_decay", 0.0)
  rules.number(config, "optimizer.momentum", 0.0, 1.0, high_open=True)
  rules.number(config, "optimizer.trust_coefficient", 0.0, low_open=True)
  rules.integer(config, "optimizer.warmup_steps", low=0, high=steps)
  rules.number(config, "target.base_decay", 0.0, 1.0)
  rules.number(config, "probe.learning_rate", 0.0, low_open=True)

  rules.batch_divisible(config, "evaluation.batch_size", num_devices=num_devices,
                        num_processes=num_processes)
  rules.int_tuple(config, "evaluation.knn_ks", low=1)
  rules.number(config, "evaluation.knn_temperature", 0.0, low_open=True)
  rules.integer(config, "evaluation.max_examples", low=0)
  # Periodic evaluation, image summaries and end-of-run plots (semppl_jax/jaxline/summaries.py).
  rules.integer(config, "evaluation.every_steps", low=0)
  rules.integer(config, "evaluation.subset", low=0)
  rules.integer(config, "summaries.images_every_steps", low=0)
  rules.integer(config, "summaries.num_images", low=1)
  rules.boolean(config, "summaries.plots")
  check_memory_fits(config, num_devices=num_devices)


# Encoder parameters at width 1 (millions; ResNet v1 without the classifier; SK: ~1.3x, the
# selective-kernel branches), for the memory estimate of check_memory_fits.
_ENCODER_MPARAMS = {"tiny_resnet": 0.1, "resnet18": 11.2, "resnet34": 21.3, "resnet50": 23.5,
                    "resnet101": 42.5, "resnet152": 58.1, "resnet200": 62.6,
                    "sk_resnet50": 27.5, "sk_resnet101": 48.9, "sk_resnet152": 66.2}
_F32 = 4
# Parameter-sized float32 buffers per device: online + target weights, LARS momentum,
# gradients, and the updated copy written while the old one is alive.
_PARAM_COPIES = 5


def _device_memory_bytes() -> tuple[int, str] | None:
  """(bytes per device, what) of this process's first device; on CPU the host's RAM (a
  lenient bound: the process's CPU devices share it); None if unknown."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} memory"
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host RAM"
  except (ValueError, OSError, AttributeError):
    return None


def memory_estimate(config: config_dict.ConfigDict, num_devices: int) -> dict[str, int]:
  """A lower bound of the bytes per device a pre-training step holds, by part.

  Parts: ``queue`` (L queues of ``queue.size`` entries of ``projection_size`` values in
  ``queue.dtype`` + int32 label, sharded over devices, and the kNN scores of the global
  unlabelled batch against the device's shard, B_u float32 per entry), ``parameters`` (encoder, projector, predictor and
  probe, float32, replicated, x5: online, target, momentum, gradients, update), ``logits``
  (the contrastive and semantic similarity matrices of this device's rows against the global
  batch, forward and backward: (L+S) x L x (1 + N_sp) x B/n x B float32, x2), ``views``
  (the device's share of the augmented views, float32). Activations inside the encoder are
  not counted: the real need is larger.
  """
  c = config
  n = max(1, num_devices)
  large, small = c.views.num_large, c.views.num_small
  proj, hidden = c.network.projection_size, c.network.projector_hidden_size
  pred_hidden = c.network.predictor_hidden_size
  width = c.network.width_multiplier
  emb = networks.embedding_size(c.network.encoder, width)
  batch = c.data.labelled_batch_size + c.data.unlabelled_batch_size
  encoder = int(_ENCODER_MPARAMS.get(c.network.encoder, 0.0) * 1e6 * width * width)
  heads = (emb * hidden + 3 * hidden + hidden * proj) + (proj * pred_hidden + 3 * pred_hidden
                                                         + pred_hidden * proj)
  probe = emb * c.data.num_classes + c.data.num_classes
  semantic = c.semppl.num_semantic_positives if c.objective == "semppl" else 0
  pixels = large * c.views.large_size ** 2 + small * c.views.small_size ** 2
  return {
      "queue": -(-large * c.queue.size // n) * (
          proj * (2 if c.queue.get("dtype", "float32") == "bfloat16" else _F32) + 4
          + _F32 * c.data.unlabelled_batch_size),
      "parameters": _PARAM_COPIES * _F32 * (encoder + heads + probe),
      "logits": 2 * _F32 * (large + small) * large * (1 + semantic) * -(-batch // n) * batch,
      "views": _F32 * 3 * pixels * -(-batch // n),
  }


# The config fields that size each part (named in the error).
_MEMORY_FIELDS = {
    "queue": "queue.size",
    "parameters": "network.projection_size",
    "logits": "semppl.num_semantic_positives",
    "views": "data.unlabelled_batch_size",
}


def check_memory_fits(config: config_dict.ConfigDict, *, num_devices: int,
                      device_memory_bytes: int | None = None) -> None:
  """Refuses a pre-training config whose :func:`memory_estimate` exceeds a device's memory.

  Args:
    config: ``experiment_kwargs.config`` (sizes already checked).
    num_devices: devices on the data axis.
    device_memory_bytes: memory of one device; None asks the first local device (GPU / TPU
      ``bytes_limit``; on CPU the whole host RAM, so that only what cannot fit at all is
      refused). Unknown: no check.

  Raises:
    ValueError: ``config.<field of the largest part>: ...`` with the estimate by part.
  """
  if device_memory_bytes is None:
    found = _device_memory_bytes()
    if found is None:
      return
    device_memory_bytes, what = found
  else:
    what = "device memory"
  parts = memory_estimate(config, num_devices)
  total = sum(parts.values())
  if total <= device_memory_bytes:
    return
  gib = lambda b: f"{b / 2**30:,.3g} GiB"
  largest = max(parts, key=parts.get)
  listing = ", ".join(f"{k} {gib(v)} ({_MEMORY_FIELDS[k]})" for k, v in parts.items())
  rules.fail(_MEMORY_FIELDS[largest],
             f"this config needs at least {gib(total)} per device ({listing}; encoder "
             f"activations not counted), more than the {gib(device_memory_bytes)} of {what} "
             f"on each of {num_devices} device(s). Reduce the largest part or use more "
             "devices.")


_LOSS_SWITCHES = ("mask_same_class_negatives", "semantic_ramp_steps",
                  "bn_stats_from_large_views_only", "semantic_negatives",
                  "semantic_invariance_weight", "pseudo_labels", "oracle_accuracy",
                  "knn_query", "min_vote_agreement", "knn_approximate", "knn_monitor_every")
_LOSS_SWITCH_DEFAULTS = {f: getattr(train.LossConfig(), f) for f in _LOSS_SWITCHES}


# semppl.precision: the loss matmuls' precision; 'auto' = 'highest' on CPU (exact float32,
# where it costs nothing extra) and 'default' on accelerators (one bf16 pass on TPU, TF32 on GPU).
PRECISION_CHOICES = ("auto",) + losses.PRECISIONS


def resolve_precision(choice: str, backend: str) -> str:
  """``semppl.precision`` -> ``LossConfig.precision`` on ``backend`` ('cpu', 'gpu', 'tpu')."""
  if choice != "auto":
    return choice
  return "highest" if backend == "cpu" else "default"


def _check_data(config: config_dict.ConfigDict) -> int:
  """The ``data.*`` fields both experiments share; returns ``data.image_size``."""
  dataset = rules.one_of(config, "data.dataset", DATASETS)
  rules.integer(config, "data.num_classes", low=1)
  image_size = rules.integer(config, "data.image_size", low=1)
  rules.integer(config, "data.seed", low=0)
  rules.one_of(config, "data.eval_split", ("test", "validation"))
  rules.boolean(config, "data.skip_corrupt_images")
  if dataset in ("fashion_mnist", "imagenet"):
    rules.one_of(config, "data.label_percent", (1, 10))
  return image_size


def _check_encoder(config: config_dict.ConfigDict, smallest: int, largest: int, *,
                   largest_is: str, smallest_is: str, inputs: str) -> None:
  """The encoder fields both experiments share, and its stem against the input sizes (px)."""
  rules.one_of(config, "network.encoder", networks.ENCODER_NAMES)
  rules.integer(config, "network.width_multiplier", low=1)
  rules.one_of(config, "network.compute_dtype", ("float32", "bfloat16"))
  if rules.boolean(config, "network.small_images") and largest > 64:
    rules.fail("network.small_images", "the small-image stem (3x3 stride 1, no max-pool) is for "
               f"inputs of at most 64 px, got {largest_is}; set it to False.")
  if not config.network.small_images and smallest < 32:
    rules.fail("network.small_images", f"the ImageNet stem downsamples by 32 and needs {inputs} "
               f"of at least 32 px, got {smallest_is}; set it to True.")


def data_description(data: config_dict.ConfigDict) -> str:
  """'fashion_mnist 10% labels' or 'image_folder <labelled_dir>' (setup lines)."""
  if data.dataset == "image_folder":
    return f"image_folder {data.labelled_dir}"
  return f"{data.dataset} {data.label_percent}% labels"


def train_config(config: config_dict.ConfigDict, num_shards: int,
                 backend: str | None = None) -> train.TrainConfig:
  """The typed hyper-parameters of a (validated) pre-training config.

  ``backend`` ('cpu' / 'gpu' / 'tpu'; default ``jax.default_backend()``) resolves the
  backend-dependent switches: ``semppl.precision='auto'`` and ``semppl.knn_approximate`` (an
  approximate top-k only where it is fused with the matmul, on TPU; exact elsewhere).
  """
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend()
  v, n, s, o = config.views, config.network, config.semppl, config.optimizer
  switches = {f: s.get(f, _LOSS_SWITCH_DEFAULTS[f]) for f in _LOSS_SWITCHES}
  switches["knn_approximate"] = bool(switches["knn_approximate"]) and backend == "tpu"
  presets = tuple(
      augmentations.ViewPreset(
          blur_probability=blur, solarize_probability=solarize,
          blur_sigma_range=tuple(v.blur_sigma_range),
          color_jitter_probability=v.color_jitter_probability,
          grayscale_probability=v.grayscale_probability)
      for blur, solarize in zip(v.blur_probability, v.solarize_probability))
  return train.TrainConfig(
      objective=config.objective, num_classes=config.data.num_classes,
      labelled_batch_size=config.data.labelled_batch_size,
      unlabelled_batch_size=config.data.unlabelled_batch_size, queue_size=config.queue.size,
      training_steps=config.training_steps, num_shards=num_shards,
      queue_dtype=config.queue.get("dtype", "float32"),
      views=train.ViewConfig(
          num_large=v.num_large, num_small=v.num_small, large_size=v.large_size,
          small_size=v.small_size, large_scale=tuple(v.large_scale),
          small_scale=tuple(v.small_scale), presets=presets),
      network=train.NetworkConfig(
          encoder=n.encoder, width_multiplier=n.width_multiplier, small_images=n.small_images,
          compute_dtype=n.compute_dtype, remat=n.remat,
          projector_hidden_size=n.projector_hidden_size,
          projection_size=n.projection_size, predictor_hidden_size=n.predictor_hidden_size),
      loss=train.LossConfig(
          knn_k=s.knn_k, num_semantic_positives=s.num_semantic_positives,
          temperature=s.temperature, contrastive_weight=s.contrastive_weight,
          semantic_weight=s.semantic_weight, invariance_weight=s.invariance_weight,
          num_negatives=s.num_negatives,
          precision=resolve_precision(s.get("precision", "auto"), backend), **switches),
      optim=train.OptimConfig(
          base_learning_rate=o.base_learning_rate, weight_decay=o.weight_decay,
          momentum=o.momentum, trust_coefficient=o.trust_coefficient,
          warmup_steps=o.warmup_steps, probe_learning_rate=config.probe.learning_rate,
          target_base_decay=config.target.base_decay))


PROTOCOLS = ("fine_tune", "linear", "knn")
SOURCES = ("pretrain", "release", "none")
_EVAL_EXAMPLE = "experiments/eval_fashion_mnist.py"
_EVAL_FIELDS = (
    "protocol training_steps log_every_steps checkpoint.source checkpoint.path "
    "checkpoint.encoder_prefix data.dataset data.data_dir data.label_percent data.num_classes "
    "data.image_size data.batch_size data.seed data.labelled_dir data.test_dir "
    "data.eval_split data.skip_corrupt_images network.encoder network.width_multiplier network.small_images "
    "network.compute_dtype augmentation.crop_size augmentation.crop_scale augmentation.flip "
    "optimizer.encoder_base_learning_rate optimizer.head_base_learning_rate optimizer.momentum "
    "optimizer.nesterov optimizer.weight_decay optimizer.warmup_steps evaluation.batch_size "
    "evaluation.max_examples evaluation.knn_ks evaluation.knn_temperature").split()


def validate_eval_config(config: config_dict.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
  """Checks an evaluation config before anything loads or compiles.

  Raises:
    ValueError: listing missing fields, or ``config.<field>: ...`` naming a bad one.
  """
  rules.require_fields(config, _EVAL_FIELDS, _EVAL_EXAMPLE)
  protocol = rules.one_of(config, "protocol", PROTOCOLS)
  steps = rules.integer(config, "training_steps", low=int(protocol != "knn"))
  rules.integer(config, "log_every_steps", low=1)
  source = rules.one_of(config, "checkpoint.source", SOURCES)
  if source != "none" and not config.checkpoint.path:
    rules.fail("checkpoint.path", f"is required with checkpoint.source={source!r} (a " + (
        "pre-training run's '<checkpoint_dir>/checkpoints' directory)." if source == "pretrain"
        else "released .pkl file)."))
  image_size = _check_data(config)
  for field in ("data.batch_size", "evaluation.batch_size"):
    rules.batch_divisible(config, field, num_devices=num_devices, num_processes=num_processes)
  crop = rules.integer(config, "augmentation.crop_size", low=1, high=image_size)
  rules.interval(config, "augmentation.crop_scale", 0.0, 1.0, low_open=True)
  rules.boolean(config, "augmentation.flip")
  described = f"augmentation.crop_size={crop}"
  _check_encoder(config, crop, crop, largest_is=described, smallest_is=described,
                 inputs="inputs")
  for field in ("encoder_base_learning_rate", "head_base_learning_rate", "weight_decay"):
    rules.number(config, f"optimizer.{field}", 0.0)
  rules.number(config, "optimizer.momentum", 0.0, 1.0, high_open=True)
  rules.boolean(config, "optimizer.nesterov")
  rules.integer(config, "optimizer.warmup_steps", low=0, high=max(steps, 0))
  rules.integer(config, "evaluation.max_examples", low=0)
  rules.int_tuple(config, "evaluation.knn_ks", low=1)
  rules.number(config, "evaluation.knn_temperature", 0.0, low_open=True)
