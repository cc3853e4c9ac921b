"""jaxline Experiment: SemPPL pre-training with an online probe, monitors and evaluation.

This is the one place where a config becomes arguments. Everything numerical lives in the pure
modules (augmentations, networks, losses, queue, knn, optim); this file wires them into one
``jax.jit`` train step on a 1-D ``Mesh`` named ``'data'``:

* the batch (labelled and unlabelled images) is sharded along ``'data'``; parameters, BatchNorm
  state and optimiser states are replicated, so BatchNorm statistics are global by construction;
* the labelled-embedding queues are sharded along their entries; kNN and semantic-positive
  sampling run one sharded top-k, and enqueue writes each device's items into its own shard;
* randomness for step ``k`` is ``fold_in(root, k)``: a resumed run repeats the uninterrupted one.

Objectives (``config.objective``):
* ``'semppl'``: the full SemPPL loss;
* ``'relic'``: the same without semantic positives (ReLICv2-style contrastive + invariance);
* ``'supervised'``: encoder + linear head trained with cross-entropy on the labelled images only.
"""
import time
from typing import Any, Dict, Mapping, NamedTuple, Tuple

import haiku as hk
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
from jaxline import experiment as jaxline_experiment
from ml_collections import config_dict
import numpy as np
import optax

from semppl_jax import augmentations
from semppl_jax import knn
from semppl_jax import losses
from semppl_jax import networks
from semppl_jax import optim
from semppl_jax import parallel
from semppl_jax import queue as queue_lib
from semppl_jax import data as data_lib

PyTree = Any

OBJECTIVES = ("semppl", "relic", "supervised")
DATASETS = ("fashion_mnist", "imagenet", "image_folder")


# ----------------------------------------------------------------------------------------------
# Config validation: every error names the field and what is allowed, before anything compiles.
# ----------------------------------------------------------------------------------------------

def validate_config(config: config_dict.ConfigDict, *, num_devices: int) -> None:
  """Checks an experiment config against itself and the device count.

  Args:
    config: ``experiment_kwargs.config`` of a launch config.
    num_devices: global number of devices on the data axis.

  Raises:
    ValueError: naming the offending field and the allowed values.
  """
  def fail(field, message):
    raise ValueError(f"config.{field}: {message}")

  if config.objective not in OBJECTIVES:
    fail("objective", f"got {config.objective!r}, allowed: {', '.join(OBJECTIVES)}.")
  d = config.data
  if d.dataset not in DATASETS:
    fail("data.dataset", f"got {d.dataset!r}, allowed: {', '.join(DATASETS)}.")
  if d.num_classes < 1:
    fail("data.num_classes", f"must be >= 1, got {d.num_classes}.")
  if d.labelled_batch_size < 1:
    fail("data.labelled_batch_size",
         f"every batch needs labelled items (SemPPL's queue and probe), got {d.labelled_batch_size}; "
         "use a value >= 1 that is a multiple of the device count.")
  if d.unlabelled_batch_size < 0:
    fail("data.unlabelled_batch_size", f"must be >= 0, got {d.unlabelled_batch_size}.")
  for field in ("labelled_batch_size", "unlabelled_batch_size"):
    value = d[field]
    if value % num_devices:
      fail(f"data.{field}", f"{value} is not divisible by the number of devices ({num_devices}); "
           f"use a multiple of {num_devices}.")
  if d.dataset in ("fashion_mnist", "imagenet") and d.label_percent not in (1, 10):
    fail("data.label_percent", f"got {d.label_percent}, allowed: 1, 10.")

  v = config.views
  if v.num_large < 1:
    fail("views.num_large", f"must be >= 1, got {v.num_large}.")
  if v.num_small < 0:
    fail("views.num_small", f"must be >= 0, got {v.num_small}.")
  if config.objective != "supervised" and v.num_large + v.num_small < 2:
    fail("views.num_small", "the invariance term needs at least two views in total "
         f"(num_large + num_small >= 2), got {v.num_large} + {v.num_small}.")
  if not 0 < v.large_size <= d.image_size:
    fail("views.large_size", f"must be in (0, data.image_size={d.image_size}], got {v.large_size}.")
  if v.num_small and not 0 < v.small_size <= v.large_size:
    fail("views.small_size", f"must be in (0, views.large_size={v.large_size}], got {v.small_size}.")

  if len(v.blur_probability) != len(v.solarize_probability) or not v.blur_probability:
    fail("views.blur_probability", "views.blur_probability and views.solarize_probability "
         "must have the same number (>= 1) of entries, one per alternating preset; got "
         f"{list(v.blur_probability)} and {list(v.solarize_probability)}.")
  n = config.network
  sizes = [v.large_size] + ([v.small_size] if v.num_small else [])
  if n.small_images and max(sizes) > 64:
    fail("network.small_images", f"the small-image stem (3x3 stride 1, no max-pool) is for inputs of "
         f"at most 64 px, got views of {max(sizes)} px; set network.small_images=False.")
  if not n.small_images and min(sizes) < 32:
    fail("network.small_images", f"the ImageNet stem downsamples by 32 and needs views of at least "
         f"32 px, got {min(sizes)} px; set network.small_images=True.")
  if n.encoder not in networks.ENCODER_NAMES:
    fail("network.encoder", f"got {n.encoder!r}, allowed: {', '.join(networks.ENCODER_NAMES)}.")
  if n.compute_dtype not in ("float32", "bfloat16"):
    fail("network.compute_dtype", f"got {n.compute_dtype!r}, allowed: float32, bfloat16.")

  q = config.queue
  s = config.semppl
  if q.size % num_devices:
    fail("queue.size", f"{q.size} is not divisible by the number of devices ({num_devices}).")
  if q.size < d.labelled_batch_size:
    fail("queue.size", f"{q.size} is smaller than the labelled items written per step "
         f"(data.labelled_batch_size={d.labelled_batch_size}).")
  if s.knn_k < 1:
    fail("semppl.knn_k", f"must be >= 1, got {s.knn_k}.")
  if s.knn_k > q.size:
    fail("semppl.knn_k", f"{s.knn_k} is larger than the queue (queue.size={q.size}).")
  if s.num_semantic_positives < 1:
    fail("semppl.num_semantic_positives", f"must be >= 1, got {s.num_semantic_positives}.")
  if s.temperature <= 0:
    fail("semppl.temperature", f"must be > 0, got {s.temperature}.")
  for field in ("contrastive_weight", "semantic_weight", "invariance_weight"):
    if s[field] < 0:
      fail(f"semppl.{field}", f"must be >= 0, got {s[field]}.")
  batch = d.labelled_batch_size + d.unlabelled_batch_size
  if s.num_negatives and not 0 < s.num_negatives < batch:
    fail("semppl.num_negatives", f"must be 0 (all other images) or in [1, {batch - 1}], "
         f"got {s.num_negatives}.")
  if config.training_steps < 1:
    fail("training_steps", f"must be >= 1, got {config.training_steps}.")
  if not 0 <= config.optimizer.warmup_steps <= config.training_steps:
    fail("optimizer.warmup_steps", f"must be in [0, training_steps={config.training_steps}], "
         f"got {config.optimizer.warmup_steps}.")
  if not 0.0 <= config.target.base_decay <= 1.0:
    fail("target.base_decay", f"must be in [0, 1], got {config.target.base_decay}.")
  for k in config.evaluation.knn_ks:
    if k < 1:
      fail("evaluation.knn_ks", f"every k must be >= 1, got {list(config.evaluation.knn_ks)}.")


def check_labels(labels: np.ndarray, num_classes: int, field: str) -> None:
  """Raises if any label is outside ``[0, num_classes)`` (``field`` names the source)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{field}: labels must be in [0, data.num_classes={num_classes}), found "
                     f"values in [{labels.min()}, {labels.max()}].")


# ----------------------------------------------------------------------------------------------
# Data: the config's data section becomes calls into semppl_jax.data.
# ----------------------------------------------------------------------------------------------

class DataSource:
  """Host-local training batches by step and evaluation batches by split, for one config.

  ``train_batch(step)`` returns this host's share of global step ``step``'s batch (keys
  ``labelled_images``, ``labels``, ``unlabelled_images``, ``unlabelled_labels``).
  ``eval_batches(split)`` yields padded batches (``images``, ``labels``, ``mask``) of the test
  split (``'test'``) or of the kNN bank (``'bank'``: the labelled training images).
  """

  def __init__(self, data_config: config_dict.ConfigDict,
               eval_config: config_dict.ConfigDict):
    self._config = data_config
    self._eval_batch_size = eval_config.batch_size
    self._process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self._iterator, self._next_step = None, None
    d = data_config
    if d.dataset == "fashion_mnist":
      train_images, train_labels = data_lib.load_fashion_mnist("train", d.data_dir)
      labelled = data_lib.load_label_split("fashion_mnist", d.label_percent)
      self._bank = (train_images[labelled], train_labels[labelled])
      self._test = data_lib.load_fashion_mnist("test", d.data_dir)
      if eval_config.max_examples:  # Quick runs and tests: evaluate on the first examples only.
        cut = lambda pair: tuple(x[:eval_config.max_examples] for x in pair)
        self._test, self._eval_bank = cut(self._test), cut(self._bank)
      else:
        self._eval_bank = self._bank
      check_labels(self._bank[1], d.num_classes, "data.num_classes (labelled images)")
      check_labels(self._test[1], d.num_classes, "data.num_classes (test images)")
      self._batches = data_lib.SemiSupervisedBatches(
          labelled_images=self._bank[0], labelled_labels=self._bank[1],
          unlabelled_images=train_images, unlabelled_labels=train_labels,
          labelled_batch_size=d.labelled_batch_size,
          unlabelled_batch_size=d.unlabelled_batch_size, seed=d.seed, **self._process)
    else:
      self._batches = None

  def _train_dataset(self, start_step: int):
    d = self._config
    kwargs = dict(labelled_batch_size=d.labelled_batch_size,
                  unlabelled_batch_size=d.unlabelled_batch_size, seed=d.seed,
                  start_step=start_step, **self._process)
    if d.dataset == "imagenet":
      return data_lib.imagenet_semi_supervised(
          d.label_percent, image_size=d.image_size, data_dir=d.data_dir or None, **kwargs)
    return data_lib.image_folder_semi_supervised(
        d.labelled_dir, d.unlabelled_dir, image_size=d.image_size, **kwargs)

  def train_batch(self, step: int) -> Dict[str, np.ndarray]:
    if self._batches is not None:
      return self._batches(step)  # A pure function of (seed, step): exact resume.
    if self._iterator is None or step != self._next_step:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._iterator = iter(tfds.as_numpy(self._train_dataset(step)))
    batch = next(self._iterator)
    self._next_step = step + 1
    check_labels(batch["labels"], self._config.num_classes, "data.num_classes (labelled images)")
    return batch

  def eval_batches(self, split: str):
    d = self._config
    kwargs = dict(batch_size=self._eval_batch_size, **self._process)
    if d.dataset == "fashion_mnist":
      images, labels = self._test if split == "test" else self._eval_bank
      return data_lib.eval_batches(images, labels, **kwargs)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if d.dataset == "imagenet":
      ds = data_lib.imagenet_eval(
          image_size=d.image_size, data_dir=d.data_dir or None,
          split="validation" if split == "test" else d.knn_bank_split, **kwargs)
    else:
      ds = data_lib.image_folder_eval(
          d.test_dir if split == "test" else d.labelled_dir, image_size=d.image_size, **kwargs)
    return tfds.as_numpy(ds)


# ----------------------------------------------------------------------------------------------
# Networks.
# ----------------------------------------------------------------------------------------------

class Networks(NamedTuple):
  """The transformed Haiku functions of one experiment."""
  online: hk.TransformedWithState   # images, is_training -> (embedding, projection, prediction)
  target: hk.TransformedWithState   # images, is_training -> projection
  classifier: hk.Transformed        # embedding -> logits


def build_networks(network_config: config_dict.ConfigDict, num_classes: int) -> Networks:
  """Online, target and classifier functions. The encoder sits at the top level, so its
  parameter names match the released checkpoints (``res_net50/~/...``); the target's names are
  a subset of the online ones (it has no predictor)."""
  dtype = jnp.bfloat16 if network_config.compute_dtype == "bfloat16" else jnp.float32

  def encoder_and_projector(images, is_training):
    encoder = networks.make_encoder(
        network_config.encoder, width_multiplier=network_config.width_multiplier,
        small_images=network_config.small_images, compute_dtype=dtype)
    embedding = encoder(images, is_training)
    projection = networks.MLP(network_config.projector_hidden_size,
                              network_config.projection_size, name="projector")(
                                  embedding, is_training)
    return embedding, projection

  def online_fn(images, is_training):
    embedding, projection = encoder_and_projector(images, is_training)
    prediction = networks.MLP(network_config.predictor_hidden_size,
                              network_config.projection_size, name="predictor")(
                                  projection, is_training)
    return embedding, projection, prediction

  def target_fn(images, is_training):
    return encoder_and_projector(images, is_training)[1]

  def classifier_fn(embedding):
    return networks.LinearClassifier(num_classes, name="classifier")(embedding)

  return Networks(hk.transform_with_state(online_fn), hk.transform_with_state(target_fn),
                  hk.transform(classifier_fn))


def view_presets(views_config: config_dict.ConfigDict) -> Tuple[augmentations.ViewPreset, ...]:
  """The two alternating photometric presets (BYOL's by default) from ``config.views``."""
  v = views_config
  return tuple(
      augmentations.ViewPreset(
          blur_probability=blur, solarize_probability=solarize,
          blur_sigma_range=tuple(v.blur_sigma_range),
          color_jitter_probability=v.color_jitter_probability,
          grayscale_probability=v.grayscale_probability)
      for blur, solarize in zip(v.blur_probability, v.solarize_probability))


def _subset(tree: Mapping[str, Any], like: Mapping[str, Any]) -> Dict[str, Any]:
  """The modules of ``tree`` that also exist in ``like`` (online -> target parameters)."""
  return {k: tree[k] for k in like}


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 or float images ``[B, H, W, C]`` -> float32 in [0, 1] with 3 channels."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = images.astype(jnp.float32) / 255.0
  else:
    images = images.astype(jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.broadcast_to(images, images.shape[:-1] + (3,))
  return images


# ----------------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------------

class MeshExperiment(jaxline_experiment.AbstractExperiment):
  """jaxline plumbing shared by the pre-training and evaluation experiments, without pmap.

  Subclasses keep their whole state in ``self._train_state`` (checkpointed as ``train_state``),
  set ``self._mesh`` and ``self.config`` (with ``log_every_steps``), and implement ``step``,
  ``evaluate``, ``_progress(scalars) -> str`` and ``_report(results)``. Step keys are
  ``fold_in(root, step)`` inside ``step``, so jaxline's per-device rng is not used.
  """

  CHECKPOINT_ATTRS = {}
  NON_BROADCAST_CHECKPOINT_ATTRS = {"_train_state": "train_state"}
  _PROGRESS_PREFIX = "train"

  def _shardings(self, state: PyTree) -> PyTree:
    """Where each leaf of the state lives; everything replicated unless overridden."""
    replicated = parallel.replicated_sharding(self._mesh)
    return jax.tree_util.tree_map(lambda _: replicated, state)

  def snapshot_state(self) -> Mapping[str, Any]:
    """``{'train_state': ...}``, for jaxline's checkpointer."""
    return {"train_state": self._train_state}

  def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
    """Puts a restored ``snapshot_state()`` tree back with the state's shardings."""
    state = snapshot_state["train_state"]
    self._train_state = jax.device_put(state, self._shardings(state))

  def initialize_train_step_rng(self, rng: jax.Array) -> jax.Array:
    """Returns ``rng`` unchanged (jaxline's default splits it per device with pmap)."""
    return rng

  def _evaluate_at_end(self) -> bool:
    return True

  def train_loop(self, config, state, periodic_actions, writer=None):
    """jaxline's loop without its pmap: integer steps, console progress with steps/s and ETA,
    evaluation at the end (also when no step is left to run)."""
    start_step = int(state.global_step)
    total = config.training_steps
    log_every = max(1, self.config.log_every_steps)
    t0 = time.time()
    while self.should_run_step(int(state.global_step), config):
      step = int(state.global_step)
      scalars = self.step(global_step=step, rng=None, writer=writer)
      state.global_step = step + 1
      for action in periodic_actions:
        action(time.time(), state.global_step, scalars)
      done = step + 1
      if done == start_step + 1:  # Rates exclude the first step, which compiles.
        t0 = time.time()
      if done % log_every == 0 or done == total or done == start_step + 1:
        if done == start_step + 1:
          speed = "compiled"
        else:
          rate = (done - start_step - 1) / max(time.time() - t0, 1e-9)
          speed = f"{rate:.2f} steps/s | ETA {format_duration((total - done) / rate)}"
        print(f"[{self._PROGRESS_PREFIX}] step {done}/{total} | {speed} | "
              f"{self._progress(scalars)}", flush=True)
    if self._evaluate_at_end():
      results = self.evaluate(global_step=state.global_step, rng=None, writer=writer)
      if writer is not None:
        writer.write_scalars(int(state.global_step), results)
      self._report(results)


class Experiment(MeshExperiment):
  """SemPPL pre-training (see the module docstring)."""

  def __init__(self, mode: str, init_rng: jax.Array, config: config_dict.ConfigDict):
    super().__init__(mode=mode, init_rng=init_rng)
    self.config = config
    self._mesh = parallel.make_mesh()
    num_devices = self._mesh.shape["data"]
    validate_config(config, num_devices=num_devices)
    self._num_devices = num_devices
    self._nets = build_networks(config.network, config.data.num_classes)
    init_key, self._root_key = jax.random.split(jnp.asarray(init_rng))
    self._data = DataSource(config.data, config.evaluation)

    self._lr_schedule = optim.learning_rate_schedule(
        base_learning_rate=config.optimizer.base_learning_rate,
        batch_size=config.data.labelled_batch_size + config.data.unlabelled_batch_size,
        total_steps=config.training_steps, warmup_steps=config.optimizer.warmup_steps)
    self._optimizer = None  # Built in _init_state: LARS's masks need the parameter tree.
    self._classifier_optimizer = optax.adam(config.probe.learning_rate)
    self._train_state = self._init_state(init_key)
    self._train_step = None
    self._eval_fns = None
    self._recent = []

  # --- state -----------------------------------------------------------------------------------

  def _shardings(self, state: PyTree) -> PyTree:
    """Replicated, except the queues: sharded along their entries."""
    shardings = super()._shardings(state)
    replicated = parallel.replicated_sharding(self._mesh)
    shardings["queue"] = {
        "embeddings": NamedSharding(self._mesh, P(None, "data", None)),
        "labels": NamedSharding(self._mesh, P(None, "data")),
        "position": replicated,
    }
    return shardings

  def _init_state(self, key: jax.Array) -> PyTree:
    c = self.config
    dummy = jnp.zeros((2, c.views.large_size, c.views.large_size, 3), jnp.float32)
    k_online, k_classifier = jax.random.split(key)
    # Jitted: eager initialisation of a ResNet-50 runs op by op.
    online_params, online_state = jax.jit(
        lambda k, x: self._nets.online.init(k, x, True))(k_online, dummy)
    # The target starts as a copy of the online encoder + projector.
    target_shape = jax.eval_shape(lambda k, x: self._nets.target.init(k, x, True), k_online, dummy)
    # Copies, not views: the train step donates the state, and donated buffers must be distinct.
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    target_params = copy(_subset(online_params, target_shape[0]))
    target_state = copy(_subset(online_state, target_shape[1]))
    embedding_size = networks.embedding_size(c.network.encoder, c.network.width_multiplier)
    classifier_params = self._nets.classifier.init(k_classifier, jnp.zeros((2, embedding_size)))
    self._optimizer = optim.lars(
        self._lr_schedule, online_params, weight_decay=c.optimizer.weight_decay,
        momentum=c.optimizer.momentum, trust_coefficient=c.optimizer.trust_coefficient)
    queue = queue_lib.init(c.views.num_large, c.queue.size, c.network.projection_size)
    state = {
        "online_params": online_params,
        "online_state": online_state,
        "target_params": target_params,
        "target_state": target_state,
        "opt_state": self._optimizer.init(online_params),
        "classifier_params": classifier_params,
        "classifier_opt_state": self._classifier_optimizer.init(classifier_params),
        "queue": queue._asdict(),
    }
    return jax.device_put(state, self._shardings(state))

  # --- training ---------------------------------------------------------------------------------

  def _loss_and_metrics(self, online_params, classifier_params, state, batch, key):
    """The objective for one step. Returns (loss, (aux, new_online_state, target_out))."""
    c = self.config
    nets = self._nets
    L, S = c.views.num_large, c.views.num_small
    k_views, k_sem, k_neg = jax.random.split(key, 3)
    n = self._num_devices
    bl, bu = c.data.labelled_batch_size, c.data.unlabelled_batch_size

    # Interleave per device ([n, bl/n] labelled then [n, bu/n] unlabelled) so that every device
    # keeps its own rows: no cross-device shuffle of the batch.
    def interleave(a, b):
      a = a.reshape((n, bl // n) + a.shape[1:])
      b = b.reshape((n, bu // n) + b.shape[1:])
      return jnp.concatenate([a, b], axis=1).reshape((bl + bu,) + a.shape[2:])

    images = preprocess(interleave(batch["labelled_images"], batch["unlabelled_images"]))
    true_labels = interleave(batch["labels"], batch["unlabelled_labels"])
    is_labelled = interleave(jnp.ones((bl,), bool), jnp.zeros((bu,), bool))
    B = bl + bu

    large, small = augmentations.multi_crop(
        images, k_views, num_large=L, num_small=S, large_size=c.views.large_size,
        small_size=c.views.small_size, large_scale=tuple(c.views.large_scale),
        small_scale=tuple(c.views.small_scale), presets=view_presets(c.views))
    # Views flattened to one batch each ([L*B, ...], [S*B, ...]): one network call per size.
    flat = lambda x: augmentations.normalize(x.reshape((-1,) + x.shape[2:]))

    (emb_l, _, pred_l), online_state = nets.online.apply(
        online_params, state["online_state"], None, flat(large), True)
    emb_l = emb_l.reshape((L, B) + emb_l.shape[1:])

    # Online probe on the stop-gradient embedding of the labelled images' first large view: it
    # monitors the representation without shaping it (except in the supervised baseline, where
    # this cross-entropy is the whole objective).
    lab_idx = jnp.arange(B).reshape(n, -1)[:, : bl // n].reshape(-1)
    probe_in = emb_l[:, lab_idx].reshape((L * bl,) + emb_l.shape[2:])
    if c.objective != "supervised":
      probe_in = jax.lax.stop_gradient(probe_in)
    probe_logits = nets.classifier.apply(classifier_params, None, probe_in)
    probe_labels = jnp.tile(true_labels[lab_idx], L)
    probe_ce = optax.softmax_cross_entropy_with_integer_labels(probe_logits, probe_labels).mean()
    aux = {"probe_loss": probe_ce,
           "probe_train_top1": jnp.mean(jnp.argmax(probe_logits, -1) == probe_labels)}

    if c.objective == "supervised":
      return probe_ce, (aux, online_state, None)

    if S:
      (_, _, pred_s), online_state = nets.online.apply(
          online_params, online_state, None, flat(small), True)
      predictions = jnp.concatenate([pred_l, pred_s], axis=0)
    else:
      predictions = pred_l
    predictions = predictions.reshape((L + S, B) + predictions.shape[1:])
    online = losses.l2_normalize(predictions)

    target_proj, target_state = nets.target.apply(
        state["target_params"], state["target_state"], None, flat(large), True)
    target_proj = jax.lax.stop_gradient(losses.l2_normalize(target_proj.reshape(L, B, -1)))

    # Pseudo-labels from the queues as they were before this step's enqueue.
    queue = queue_lib.Queue(**state["queue"])
    pseudo = knn.pseudo_labels(jax.lax.stop_gradient(online[:L]), queue, k=c.semppl.knn_k,
                               num_classes=c.data.num_classes)
    labels_star = jnp.where(is_labelled, true_labels, pseudo)

    N = c.semppl.num_semantic_positives
    if c.objective == "semppl":
      semantic, valid = knn.sample_semantic_positives(k_sem, labels_star, queue, N)
    else:  # relic: no semantic positives; all-invalid masks make both semantic terms zero.
      semantic = jnp.zeros((L, N, B, online.shape[-1]), online.dtype)
      valid = jnp.zeros((L, N, B), bool)
    loss, loss_aux = losses.semppl_loss(
        online, target_proj, semantic, valid, temperature=c.semppl.temperature,
        contrastive_weight=c.semppl.contrastive_weight, semantic_weight=c.semppl.semantic_weight,
        invariance_weight=c.semppl.invariance_weight,
        num_negatives=c.semppl.num_negatives or None,
        key=k_neg if c.semppl.num_negatives else None)
    aux.update(loss_aux)

    # Monitors. Hidden labels of unlabelled images are read here and nowhere else.
    unlabelled = ~is_labelled
    has_pseudo = unlabelled & (pseudo >= 0)
    aux["pseudo_label_accuracy"] = _masked_mean(pseudo == true_labels, has_pseudo)
    aux["pseudo_label_coverage"] = _masked_mean(pseudo >= 0, unlabelled)
    # Drawn positives carry label y*_i by construction, so they are pure where y*_i is right.
    correct = jnp.broadcast_to(labels_star == true_labels, valid.shape)
    aux["semantic_positive_purity"] = _masked_mean(correct, valid)
    aux["queue_fill"] = queue_lib.fill_fraction(queue)
    target_out = {"target_state": target_state, "projections": target_proj,
                  "labels": true_labels, "lab_idx": lab_idx}
    return loss + probe_ce, (aux, online_state, target_out)

  def _make_train_step(self):
    c = self.config

    def train_step(state, batch, step):
      key = jax.random.fold_in(self._root_key, step)
      grad_fn = jax.value_and_grad(self._loss_and_metrics, argnums=(0, 1), has_aux=True)
      (_, (aux, online_state, target_out)), (grads, classifier_grads) = grad_fn(
          state["online_params"], state["classifier_params"], state, batch, key)
      updates, opt_state = self._optimizer.update(grads, state["opt_state"],
                                                  state["online_params"])
      online_params = optax.apply_updates(state["online_params"], updates)
      c_updates, c_opt_state = self._classifier_optimizer.update(
          classifier_grads, state["classifier_opt_state"], state["classifier_params"])
      new_state = dict(state, online_params=online_params, online_state=online_state,
                       opt_state=opt_state,
                       classifier_params=optax.apply_updates(state["classifier_params"], c_updates),
                       classifier_opt_state=c_opt_state)
      aux["learning_rate"] = self._lr_schedule(step)
      if target_out is not None:
        decay = optim.target_ema_decay(step, base_decay=c.target.base_decay,
                                       total_steps=c.training_steps)
        new_state["target_params"] = optim.target_ema(
            _subset(online_params, state["target_params"]), state["target_params"], decay)
        new_state["target_state"] = target_out["target_state"]
        idx = target_out["lab_idx"]
        queue = queue_lib.enqueue(
            queue_lib.Queue(**state["queue"]), target_out["projections"][:, idx],
            target_out["labels"][idx], num_shards=self._num_devices)
        new_state["queue"] = queue._asdict()
        aux["ema_decay"] = decay
      return new_state, aux

    shardings = self._shardings(self._train_state)
    data = parallel.data_sharding(self._mesh)
    return jax.jit(train_step, in_shardings=(shardings, data, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))

  def _global_batch(self, step: int) -> Dict[str, jax.Array]:
    return parallel.host_local_to_global(self._data.train_batch(step), self._mesh)

  def step(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """One training step; ``global_step`` may be an int or jaxline's per-device array."""
    del rng  # Keys are fold_in(root, step).
    step = int(np.asarray(global_step).reshape(-1)[0])
    if self._train_step is None:
      self._train_step = self._make_train_step()
    batch = self._global_batch(step)
    with jax.set_mesh(self._mesh):
      self._train_state, aux = self._train_step(self._train_state, batch, jnp.int32(step))
    scalars = {k: float(v) for k, v in jax.device_get(aux).items()}
    # evaluate() reports the training monitors averaged over the last logging window.
    self._recent = (self._recent + [scalars])[-max(1, self.config.log_every_steps):]
    return scalars

  def _evaluate_at_end(self) -> bool:
    return self.config.evaluate_at_end

  def _progress(self, scalars: Mapping[str, float]) -> str:
    return " | ".join(f"{k} {scalars[k]:.4g}" for k in _PROGRESS_KEYS if k in scalars)

  def _report(self, results: Mapping[str, float]) -> None:
    _print_results(results, self.config)

  # --- evaluation -------------------------------------------------------------------------------

  def _make_eval_fns(self):
    nets = self._nets
    data = parallel.data_sharding(self._mesh)
    replicated = parallel.replicated_sharding(self._mesh)

    def embed(params, state, classifier_params, images):
      images = augmentations.normalize(preprocess(images))
      (embedding, _, prediction), _ = nets.online.apply(params, state, None, images, False)
      logits = nets.classifier.apply(classifier_params, None, embedding)
      return losses.l2_normalize(embedding), losses.l2_normalize(prediction), logits

    return jax.jit(embed, in_shardings=(replicated, replicated, replicated, data),
                   out_shardings=(data, data, data))

  def _embed_all(self, split: str):
    """Embeddings, predictions and probe logits of a whole split ('test' or 'bank'), as global
    arrays sharded along the batch, with the padding mask and labels."""
    if self._eval_fns is None:
      self._eval_fns = self._make_eval_fns()
    s = self._train_state
    outs, masks, labs = [], [], []
    for batch in self._data.eval_batches(split):
      g = parallel.host_local_to_global({"images": batch["images"]}, self._mesh)
      with jax.set_mesh(self._mesh):
        out = self._eval_fns(s["online_params"], s["online_state"], s["classifier_params"],
                             g["images"])
      outs.append(out)
      masks.append(parallel.host_local_to_global(batch["mask"], self._mesh))
      labs.append(parallel.host_local_to_global(batch["labels"], self._mesh))
    cat = lambda xs: jnp.concatenate(xs, axis=0)
    return (tuple(cat([o[i] for o in outs]) for i in range(3)), cat(masks), cat(labs))

  def evaluate(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """Online-probe top-1, weighted-kNN top-1 (labelled train images as the bank) and
    queue-kNN top-1 (the pseudo-labeller applied to the test set), all on the test split."""
    del rng, writer
    c = self.config
    (test_emb, test_pred, test_logits), test_mask, test_labels = self._embed_all("test")
    (bank_emb, _, _), bank_mask, bank_labels = self._embed_all("bank")
    bank_labels = jnp.where(bank_mask, bank_labels, -1)
    correct = lambda pred: float(jnp.sum((pred == test_labels) & test_mask) / jnp.sum(test_mask))
    results = {"probe_top1": correct(jnp.argmax(test_logits, -1))}
    with jax.set_mesh(self._mesh):
      for k in c.evaluation.knn_ks:
        scores = knn.weighted_knn_scores(
            test_emb, bank_emb, bank_labels, k=min(k, bank_emb.shape[0]),
            num_classes=c.data.num_classes, temperature=c.evaluation.knn_temperature)
        results[f"knn_top1_k{k}"] = correct(jnp.argmax(scores, -1))
      if c.objective != "supervised":
        queue = queue_lib.Queue(**self._train_state["queue"])
        queries = jnp.broadcast_to(test_pred, (c.views.num_large,) + test_pred.shape)
        pseudo = knn.pseudo_labels(queries, queue, k=c.semppl.knn_k,
                                   num_classes=c.data.num_classes)
        results["queue_knn_top1"] = correct(pseudo)
    monitors = {"semppl": ("pseudo_label_accuracy", "semantic_positive_purity"),
                "relic": ("pseudo_label_accuracy",)}.get(c.objective, ())
    for key in monitors:
      values = [r[key] for r in self._recent if key in r]
      if values:
        results[f"train_{key}"] = float(np.mean(values))
    results["global_step"] = float(np.asarray(global_step).reshape(-1)[0])
    return results


_PROGRESS_KEYS = ("loss", "augm_contrastive", "semantic_contrastive", "augm_invariance",
                  "probe_loss", "pseudo_label_accuracy", "queue_fill", "learning_rate")


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(values.astype(jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def format_duration(seconds: float) -> str:
  """Seconds as '12m05s' or '3h07m' (progress lines)."""
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


def _print_results(results: Mapping[str, float], config: config_dict.ConfigDict) -> None:
  print(f"[eval] objective={config.objective} dataset={config.data.dataset} "
        f"labels={config.data.label_percent}% step={int(results['global_step'])}", flush=True)
  names = {"probe_top1": "online-probe top-1 (test)",
           "queue_knn_top1": "queue-kNN top-1 (test; the pseudo-labeller)",
           "train_pseudo_label_accuracy": "pseudo-label accuracy (unlabelled train, last steps)",
           "train_semantic_positive_purity": "semantic-positive purity (train, last steps)"}
  for key, value in results.items():
    if key == "global_step":
      continue
    label = names.get(key, key)
    if key.startswith("knn_top1_k"):
      label = (f"weighted kNN top-1 (test, k={key[len('knn_top1_k'):]}, "
               "labelled train bank)")
    print(f"[eval]   {label}: {100 * value:.2f}%", flush=True)
