"""jaxline Experiment: evaluation of a pre-trained encoder (fine-tune, linear, kNN).

Three protocols, kept apart and named in every reported number (``config.protocol``):

* ``'fine_tune'``: every encoder weight plus a linear head trained on the labelled subset only
  (the paper's 1 % / 10 % protocol); BatchNorm in training mode (global batch statistics);
  SGD with Nesterov momentum, cosine learning rate, small weight decay; the encoder and the head
  have their own learning rates.
* ``'linear'``: frozen encoder, BatchNorm in inference mode (its running statistics), a linear
  head on the stop-gradient embedding, trained on the labelled subset (the release's protocol).
  Encoder parameters and BatchNorm state never change.
* ``'knn'``: frozen embeddings, cosine kNN with temperature-weighted votes
  (``knn.weighted_knn_scores``) over a bank of the labelled training images; no training step
  (``training_steps`` is ignored and may be 0: the evaluation runs at the end of jaxline's
  train).

Training views (fine-tune and linear): random resized crop + horizontal flip on device
(``semppl_jax.augmentations``). Evaluation views: the whole (host-cropped) image, resized to
``augmentation.crop_size`` when it differs from ``data.image_size``.

The encoder comes from ``config.checkpoint``:
* ``source='pretrain'``: a pre-training run's Orbax checkpoints (``<checkpoint_dir>/checkpoints``
  as written by ``experiments/launch.py``); the encoder modules of ``online_params`` /
  ``online_state`` are taken (everything but ``projector``, ``predictor``, ``classifier*``);
* ``source='release'``: a released ``.pkl`` (``checkpointing.load_released_checkpoint``);
* ``source='none'``: random initialisation (a baseline, and for tests).
A loaded encoder must match ``config.network`` name for name and shape for shape; otherwise a
``checkpointing.CheckpointError`` lists every difference.

Like the pre-training experiment: one ``jax.jit`` per step over a 1-D mesh ``'data'`` (batch
sharded, parameters replicated, no pmap), step keys ``fold_in(root, step)`` (a resumed run
repeats the uninterrupted one), state checkpointed through jaxline's checkpointer.

Metrics (test split): ``'{protocol}_top1'``; for kNN also ``'knn_top1_k{k}'`` for every
``k`` in ``evaluation.knn_ks`` (``'knn_top1'`` is the first of them).

Config (``experiment_kwargs.config``; complete example: ``experiments/eval_fashion_mnist.py``):
``protocol``, ``training_steps``, ``log_every_steps``;
``checkpoint.{source, path, encoder_prefix}``;
``data.{dataset, data_dir, label_percent, num_classes, image_size, batch_size (labelled images
per step), seed, labelled_dir, test_dir, knn_bank_split}`` (as in pre-training);
``network.{encoder, width_multiplier, small_images, compute_dtype}``;
``augmentation.{crop_size, crop_scale, flip}``;
``optimizer.{encoder_base_learning_rate, head_base_learning_rate (per 256 images, cosine to 0),
momentum, nesterov, weight_decay, warmup_steps}``;
``evaluation.{batch_size, max_examples (0 = whole test split; else its first examples only),
knn_ks, knn_temperature}``.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
from ml_collections import config_dict
import numpy as np
import optax

from semppl_jax import augmentations
from semppl_jax import checkpointing
from semppl_jax import experiment as pretrain
from semppl_jax import knn
from semppl_jax import networks
from semppl_jax import optim
from semppl_jax import parallel

PyTree = Any
ModuleTree = Dict[str, Dict[str, Any]]

PROTOCOLS = ("fine_tune", "linear", "knn")
SOURCES = ("pretrain", "release", "none")
# Top-level scopes of a pre-training tree that are heads, not encoder.
HEAD_SCOPES = ("projector", "predictor")
HEAD_SCOPE_PREFIXES = ("classifier",)

# Every field the experiment reads, by section (the validator lists the missing ones).
REQUIRED_FIELDS = {
    "": ("protocol", "training_steps", "log_every_steps"),
    "checkpoint": ("source", "path", "encoder_prefix"),
    "data": ("dataset", "data_dir", "label_percent", "num_classes", "image_size", "batch_size",
             "seed", "labelled_dir", "test_dir", "knn_bank_split"),
    "network": ("encoder", "width_multiplier", "small_images", "compute_dtype"),
    "augmentation": ("crop_size", "crop_scale", "flip"),
    "optimizer": ("encoder_base_learning_rate", "head_base_learning_rate", "momentum",
                  "nesterov", "weight_decay", "warmup_steps"),
    "evaluation": ("batch_size", "max_examples", "knn_ks", "knn_temperature"),
}


# ----------------------------------------------------------------------------------------------
# Config validation.
# ----------------------------------------------------------------------------------------------

def validate_config(config: config_dict.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
  """Checks an evaluation config (``experiment_kwargs.config``) before anything loads/compiles.

  Args:
    config: the experiment config (fields: see ``REQUIRED_FIELDS`` and
      ``experiments/eval_fashion_mnist.py``).
    num_devices: global number of devices on the ``'data'`` axis.
    num_processes: number of hosts (batch sizes must split evenly across them too).

  Raises:
    ValueError: naming the offending ``config.<field>`` and the allowed values.
  """
  def fail(field, message):
    raise ValueError(f"config.{field}: {message}")

  missing = []
  for section, fields in REQUIRED_FIELDS.items():
    node = config
    if section:
      if section not in config:
        missing.append(section)
        continue
      node = config[section]
    missing += [f"{section}.{f}" if section else f for f in fields if f not in node]
  if missing:
    raise ValueError(f"config is missing the field(s) {', '.join(missing)}; see "
                     "experiments/eval_fashion_mnist.py for a complete evaluation config.")

  if config.protocol not in PROTOCOLS:
    fail("protocol", f"got {config.protocol!r}, allowed: {', '.join(PROTOCOLS)}.")
  trains = config.protocol != "knn"
  if not isinstance(config.training_steps, int) or config.training_steps < int(trains):
    fail("training_steps", f"must be an int >= {int(trains)} for protocol "
         f"{config.protocol!r}, got {config.training_steps!r}.")
  if config.log_every_steps < 1:
    fail("log_every_steps", f"must be >= 1, got {config.log_every_steps}.")

  ck = config.checkpoint
  if ck.source not in SOURCES:
    fail("checkpoint.source", f"got {ck.source!r}, allowed: {', '.join(SOURCES)}.")
  if ck.source != "none" and not ck.path:
    fail("checkpoint.path", f"is required with checkpoint.source={ck.source!r} (a "
         + ("pre-training run's '<checkpoint_dir>/checkpoints' directory)."
            if ck.source == "pretrain" else "released .pkl file)."))

  d = config.data
  if d.dataset not in pretrain.DATASETS:
    fail("data.dataset", f"got {d.dataset!r}, allowed: {', '.join(pretrain.DATASETS)}.")
  if d.num_classes < 1:
    fail("data.num_classes", f"must be >= 1, got {d.num_classes}.")
  if d.dataset in ("fashion_mnist", "imagenet") and d.label_percent not in (1, 10):
    fail("data.label_percent", f"got {d.label_percent}, allowed: 1, 10.")
  if d.image_size < 1:
    fail("data.image_size", f"must be >= 1, got {d.image_size}.")
  if d.seed < 0:
    fail("data.seed", f"must be >= 0, got {d.seed}.")
  for field, value in (("data.batch_size", d.batch_size),
                       ("evaluation.batch_size", config.evaluation.batch_size)):
    if value < 1 or value % num_devices or value % num_processes:
      fail(field, f"must be a positive multiple of the number of devices ({num_devices}) and "
           f"of processes ({num_processes}), got {value}.")

  a = config.augmentation
  if not 0 < a.crop_size <= d.image_size:
    fail("augmentation.crop_size", f"must be in (0, data.image_size={d.image_size}], "
         f"got {a.crop_size}.")
  scale = tuple(a.crop_scale)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    fail("augmentation.crop_scale", f"must be (low, high) with 0 < low <= high <= 1, "
         f"got {scale}.")
  if not isinstance(a.flip, bool):
    fail("augmentation.flip", f"must be True or False, got {a.flip!r}.")

  n = config.network
  if n.encoder not in networks.ENCODER_NAMES:
    fail("network.encoder", f"got {n.encoder!r}, allowed: {', '.join(networks.ENCODER_NAMES)}.")
  if not isinstance(n.width_multiplier, int) or n.width_multiplier < 1:
    fail("network.width_multiplier", f"must be an int >= 1, got {n.width_multiplier!r}.")
  if n.compute_dtype not in ("float32", "bfloat16"):
    fail("network.compute_dtype", f"got {n.compute_dtype!r}, allowed: float32, bfloat16.")
  if n.small_images and a.crop_size > 64:
    fail("network.small_images", "the small-image stem (3x3 stride 1, no max-pool) is for inputs "
         f"of at most 64 px, got augmentation.crop_size={a.crop_size}; set "
         "network.small_images=False.")
  if not n.small_images and a.crop_size < 32:
    fail("network.small_images", "the ImageNet stem downsamples by 32 and needs inputs of at "
         f"least 32 px, got augmentation.crop_size={a.crop_size}; set network.small_images=True.")

  o = config.optimizer
  for field in ("encoder_base_learning_rate", "head_base_learning_rate", "weight_decay"):
    if o[field] < 0:
      fail(f"optimizer.{field}", f"must be >= 0, got {o[field]}.")
  if not 0 <= o.momentum < 1:
    fail("optimizer.momentum", f"must be in [0, 1), got {o.momentum}.")
  if not isinstance(o.nesterov, bool):
    fail("optimizer.nesterov", f"must be True or False, got {o.nesterov!r}.")
  if not 0 <= o.warmup_steps <= max(config.training_steps, 0):
    fail("optimizer.warmup_steps", f"must be in [0, training_steps={config.training_steps}], "
         f"got {o.warmup_steps}.")

  e = config.evaluation
  if e.max_examples < 0:
    fail("evaluation.max_examples", f"must be 0 (the whole test split) or >= 1, "
         f"got {e.max_examples}.")
  ks = tuple(e.knn_ks)
  if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
    fail("evaluation.knn_ks", f"must be a non-empty tuple of ints >= 1, got {ks}.")
  if not e.knn_temperature > 0:
    fail("evaluation.knn_temperature", f"must be > 0, got {e.knn_temperature}.")


# ----------------------------------------------------------------------------------------------
# Encoder sources.
# ----------------------------------------------------------------------------------------------

def encoder_modules(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """The encoder's modules of a pre-training ``online_params`` / ``online_state`` tree.

  Args:
    tree: Haiku tree ``{module_name: {name: array}}`` of the pre-training online network.

  Returns:
    The entries whose top-level scope is not a head: not ``projector/...``,
    ``predictor/...`` nor ``classifier...`` (the same leaves, not copies).
  """
  def is_head(module):
    scope = module.split("/", 1)[0]
    return scope in HEAD_SCOPES or scope.startswith(HEAD_SCOPE_PREFIXES)
  return {m: v for m, v in tree.items() if not is_head(m)}


def load_pretrain_encoder(path: str) -> Tuple[ModuleTree, ModuleTree, Optional[int]]:
  """The encoder of a pre-training run's newest Orbax checkpoint, as host numpy arrays.

  Reads only ``train_state.online_params`` / ``online_state`` of the experiment snapshot
  (partial restore: optimiser states, target network and queues stay on disk) and keeps the
  encoder modules (:func:`encoder_modules`).

  Args:
    path: ``<checkpoint_dir>/checkpoints`` of a run launched with ``experiments/launch.py``
      (its ``latest`` series), a series directory, or one checkpoint directory.

  Returns:
    ``(params, state, global_step)``: ``{module: {name: np.ndarray}}`` trees (float32
    weights; BatchNorm ``counter`` int32 ``[]``, ``hidden`` / ``average`` ``(1, 1, 1, C)``) and
    the pre-training step of the checkpoint (None if not recorded).

  Raises:
    checkpointing.CheckpointError: no checkpoint there, or not a pre-training snapshot.
  """
  def select(snapshot):
    train_state = snapshot["train_state"]
    return {"train_state": {k: encoder_modules(train_state[k])
                            for k in ("online_params", "online_state")}}

  try:
    global_step, snapshot = checkpointing.read_experiment_snapshot(path, select=select)
  except checkpointing.CheckpointError as e:
    raise checkpointing.CheckpointError(
        f"config.checkpoint.path: {e} Expected a pre-training run's checkpoints with "
        "train_state.online_params / online_state.") from e
  restored = snapshot["train_state"]
  as_dicts = lambda t: {m: {k: np.asarray(v) for k, v in leaves.items()} for m, leaves in t.items()}
  return as_dicts(restored["online_params"]), as_dicts(restored["online_state"]), global_step


def _check_encoder(params, state, expected_params, expected_state, what: str,
                   network_config) -> None:
  """Raises CheckpointError listing every name/shape difference to our encoder."""
  diffs = checkpointing.verify_checkpoint_tree(params, state, expected_params, expected_state)
  if diffs:
    count = lambda word: sum(f": {word} " in d for d in diffs)
    shown = diffs[:40] + ([f"... and {len(diffs) - 40} more"] if len(diffs) > 40 else [])
    n = network_config
    raise checkpointing.CheckpointError(
        f"{what} does not match config.network (encoder={n.encoder!r}, "
        f"width_multiplier={n.width_multiplier}, small_images={n.small_images}): "
        f"{len(diffs)} difference(s) ({count('missing')} missing, {count('unexpected')} "
        f"unexpected, {len(diffs) - count('missing') - count('unexpected')} of another shape):"
        "\n  " + "\n  ".join(shown))


# ----------------------------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------------------------

class EvalExperiment(pretrain.MeshExperiment):
  """Fine-tune / linear / kNN evaluation of an encoder (see the module docstring).

  Train state (``self._train_state``, checkpointed as ``train_state``), all replicated:
    ``encoder_params``, ``encoder_state``: the encoder's Haiku params / BatchNorm state;
    ``head_params``: ``{'linear': {'w': [F, C], 'b': [C]}}`` (fine_tune, linear);
    ``opt_state``: ``{'head': ..., 'encoder': ...}`` (``'encoder'`` for fine_tune only).
  """

  def __init__(self, mode: str, init_rng: jax.Array, config: config_dict.ConfigDict):
    super().__init__(mode=mode, init_rng=init_rng)
    self.config = config
    self._mesh = parallel.make_mesh()
    self._num_devices = self._mesh.shape["data"]
    validate_config(config, num_devices=self._num_devices, num_processes=jax.process_count())
    self._protocol = config.protocol
    self._PROGRESS_PREFIX = config.protocol  # pylint: disable=invalid-name
    init_key, self._root_key = jax.random.split(jnp.asarray(init_rng))
    self._build_networks()
    # evaluation.max_examples is applied here (test split only, any dataset), not by DataSource
    # (which would also cut the kNN bank).
    eval_config = config_dict.ConfigDict(config.evaluation.to_dict())
    eval_config.max_examples = 0
    self._data = pretrain.DataSource(self._data_source_config(), eval_config)
    self._source_info = ""
    self._train_state = self._init_state(init_key)
    self._train_step = None
    self._eval_fn = None
    self._knn_fn = None

  # --- setup -----------------------------------------------------------------------------------

  def _build_networks(self):
    n = self.config.network
    dtype = jnp.bfloat16 if n.compute_dtype == "bfloat16" else jnp.float32

    def encoder_fn(images, is_training):
      # Top-level module: the same names as the pre-training encoder and the release.
      return networks.make_encoder(n.encoder, width_multiplier=n.width_multiplier,
                                   small_images=n.small_images, compute_dtype=dtype)(
                                       images, is_training)

    def head_fn(embedding):
      return networks.LinearClassifier(self.config.data.num_classes, name="linear")(embedding)

    self._encoder = hk.transform_with_state(encoder_fn)
    self._head = hk.transform(head_fn)

  def _data_source_config(self) -> config_dict.ConfigDict:
    """The pre-training DataSource's data config for labelled-only batches."""
    d = self.config.data
    cfg = config_dict.ConfigDict(d.to_dict())
    cfg.labelled_batch_size = d.batch_size
    # DataSource always builds a semi-supervised stream; one unlabelled image per host is the
    # smallest it accepts. Those images never leave the host.
    cfg.unlabelled_batch_size = jax.process_count()
    cfg.unlabelled_dir = d.labelled_dir
    return cfg

  def _load_encoder(self, key, expected_params, expected_state):
    c = self.config.checkpoint
    if c.source == "none":
      self._source_info = ("random initialisation (BatchNorm statistics of the first labelled "
                           "batch)")
      return self._random_encoder(key)
    if c.source == "release":
      params, state = checkpointing.load_released_checkpoint(
          c.path, encoder_prefix=c.encoder_prefix or None)
      what = f"config.checkpoint.path={c.path!r} (release checkpoint)"
      self._source_info = f"release checkpoint {c.path}"
    else:
      params, state, step = load_pretrain_encoder(c.path)
      what = f"config.checkpoint.path={c.path!r} (pre-training checkpoint)"
      self._source_info = f"pre-training checkpoint {c.path} (step {step})"
    _check_encoder(params, state, expected_params, expected_state, what, self.config.network)
    cast = lambda tree, like: {m: {k: jnp.asarray(v, like[m][k].dtype) for k, v in leaves.items()}
                               for m, leaves in tree.items()}
    return cast(params, expected_params), cast(state, expected_state)

  def _eval_view(self, images: jax.Array) -> jax.Array:
    """uint8/float images ``[B, H, W, C]`` -> the normalised whole image at the crop size."""
    size = self.config.augmentation.crop_size
    x = pretrain.preprocess(images)
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
    return augmentations.normalize(x)

  def _random_encoder(self, key: jax.Array) -> Tuple[PyTree, PyTree]:
    """Random weights, and BatchNorm statistics from one training-mode pass over the first
    labelled batch: Haiku's freshly initialised running averages are zero, which would make an
    inference-mode (linear, kNN) baseline divide by sqrt(eps)."""
    images = parallel.host_local_to_global(self._data.train_batch(0)["labelled_images"],
                                           self._mesh)

    def init(key, images):
      x = self._eval_view(images)
      params, state = self._encoder.init(key, x, True)
      _, state = self._encoder.apply(params, state, None, x, True)
      return params, state

    replicated = parallel.replicated_sharding(self._mesh)
    with jax.set_mesh(self._mesh):
      return jax.jit(init, in_shardings=(replicated, parallel.data_sharding(self._mesh)),
                     out_shardings=replicated)(key, images)

  def _init_state(self, key: jax.Array) -> PyTree:
    c = self.config
    k_encoder, k_head = jax.random.split(key)
    dummy = jax.ShapeDtypeStruct((2, c.augmentation.crop_size, c.augmentation.crop_size, 3),
                                 jnp.float32)
    expected_params, expected_state = jax.eval_shape(
        lambda k, x: self._encoder.init(k, x, True), k_encoder, dummy)
    params, state = self._load_encoder(k_encoder, expected_params, expected_state)
    train_state = {"encoder_params": params, "encoder_state": state}
    if self._protocol != "knn":
      width = networks.embedding_size(c.network.encoder, c.network.width_multiplier)
      head_params = self._head.init(k_head, jnp.zeros((1, width), jnp.float32))
      o = c.optimizer
      batch = c.data.batch_size
      self._schedules = {"head": optim.learning_rate_schedule(
          base_learning_rate=o.head_base_learning_rate, batch_size=batch,
          total_steps=c.training_steps, warmup_steps=o.warmup_steps)}
      trainable = {"head": head_params}
      if self._protocol == "fine_tune":
        self._schedules["encoder"] = optim.learning_rate_schedule(
            base_learning_rate=o.encoder_base_learning_rate, batch_size=batch,
            total_steps=c.training_steps, warmup_steps=o.warmup_steps)
        trainable["encoder"] = params
      # Weight decay on weights only (not biases / BatchNorm), as in pre-training.
      self._optimizers = {
          name: optax.chain(
              optax.add_decayed_weights(o.weight_decay, mask=optim.lars_mask),
              optax.sgd(self._schedules[name], momentum=o.momentum or None,
                        nesterov=o.nesterov and o.momentum > 0))
          for name in trainable}
      train_state["head_params"] = head_params
      train_state["opt_state"] = {name: tx.init(trainable[name])
                                  for name, tx in self._optimizers.items()}
    return jax.device_put(train_state, self._shardings(train_state))

  # --- training --------------------------------------------------------------------------------

  def _augment(self, images: jax.Array, key: jax.Array) -> jax.Array:
    a = self.config.augmentation
    k_crop, k_flip = jax.random.split(key)
    x = augmentations.random_resized_crop(pretrain.preprocess(images), k_crop,
                                          output_size=a.crop_size, scale=tuple(a.crop_scale))
    if a.flip:
      x = augmentations.random_flip(x, k_flip)
    return augmentations.normalize(x)

  def _make_train_step(self):
    protocol = self._protocol
    fine_tune = protocol == "fine_tune"

    def train_step(state, images, labels, step):
      x = self._augment(images, jax.random.fold_in(self._root_key, step))

      def loss_fn(trainable):
        if fine_tune:
          embedding, encoder_state = self._encoder.apply(
              trainable["encoder"], state["encoder_state"], None, x, True)
        else:
          # Frozen encoder: inference-mode BatchNorm (running statistics, state untouched) and
          # no gradient into it.
          embedding, _ = self._encoder.apply(state["encoder_params"], state["encoder_state"],
                                             None, x, False)
          embedding = jax.lax.stop_gradient(embedding)
          encoder_state = state["encoder_state"]
        logits = self._head.apply(trainable["head"], None, embedding)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (encoder_state, logits)

      trainable = {"head": state["head_params"]}
      if fine_tune:
        trainable["encoder"] = state["encoder_params"]
      (loss, (encoder_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          trainable)
      new_state = dict(state, opt_state=dict(state["opt_state"]))
      for name, tx in self._optimizers.items():
        updates, new_state["opt_state"][name] = tx.update(
            grads[name], state["opt_state"][name], trainable[name])
        trainable[name] = optax.apply_updates(trainable[name], updates)
      new_state["head_params"] = trainable["head"]
      if fine_tune:
        new_state["encoder_params"] = trainable["encoder"]
        new_state["encoder_state"] = encoder_state
      aux = {f"{protocol}_loss": loss,
             f"{protocol}_train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}
      for name, schedule in self._schedules.items():
        aux[f"{protocol}_{name}_learning_rate"] = schedule(step)
      return new_state, aux

    shardings = self._shardings(self._train_state)
    data = parallel.data_sharding(self._mesh)
    return jax.jit(train_step, in_shardings=(shardings, data, data, None),
                   out_shardings=(shardings, None), donate_argnums=(0,))

  def step(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """One training step on a labelled batch; ``global_step`` int or jaxline's array.

    Returns:
      ``{'{protocol}_loss', '{protocol}_train_top1', '{protocol}_{head|encoder}_learning_rate'}``
      as Python floats.
    """
    del rng, writer  # Keys are fold_in(root, step).
    if self._protocol == "knn":
      raise ValueError("config.protocol: 'knn' has no training step; set training_steps=0.")
    step = int(np.asarray(global_step).reshape(-1)[0])
    if self._train_step is None:
      self._train_step = self._make_train_step()
    batch = self._data.train_batch(step)
    # Only the labelled images: every protocol trains on the labelled subset only.
    batch = parallel.host_local_to_global(
        {"images": batch["labelled_images"], "labels": batch["labels"]}, self._mesh)
    with jax.set_mesh(self._mesh):
      self._train_state, aux = self._train_step(self._train_state, batch["images"],
                                                batch["labels"], jnp.int32(step))
    return {k: float(v) for k, v in jax.device_get(aux).items()}

  def should_run_step(self, global_step: int, config: config_dict.ConfigDict) -> bool:
    """jaxline's rule (``global_step < training_steps``); never for kNN, which has no steps."""
    return self._protocol != "knn" and super().should_run_step(global_step, config)

  def _progress(self, scalars: Mapping[str, float]) -> str:
    p = self._protocol
    return " | ".join(f"{k[len(p) + 1:]} {v:.4g}" for k, v in scalars.items())

  def _report(self, results: Mapping[str, float]) -> None:
    _print_results(results, self.config, self._source_info)

  # --- evaluation ------------------------------------------------------------------------------

  def _make_eval_fn(self):
    with_head = self._protocol != "knn"

    def embed(encoder_params, encoder_state, head_params, images):
      # The whole image at the training resolution, BatchNorm in inference mode.
      embedding, _ = self._encoder.apply(encoder_params, encoder_state, None,
                                         self._eval_view(images), False)
      logits = self._head.apply(head_params, None, embedding) if with_head else embedding[:, :0]
      return embedding, logits

    replicated = parallel.replicated_sharding(self._mesh)
    data = parallel.data_sharding(self._mesh)
    return jax.jit(embed, in_shardings=(replicated, replicated, replicated, data),
                   out_shardings=(data, data))

  def _make_knn_fn(self):
    e = self.config.evaluation
    num_classes = self.config.data.num_classes

    def predict(queries, bank, bank_labels, bank_mask):
      # Padding rows of the bank get label -1: never a neighbour.
      bank_labels = jnp.where(bank_mask, bank_labels, -1)
      return tuple(jnp.argmax(knn.weighted_knn_scores(
          queries, bank, bank_labels, k=min(k, bank.shape[0]), num_classes=num_classes,
          temperature=e.knn_temperature), axis=-1) for k in e.knn_ks)

    data = parallel.data_sharding(self._mesh)
    return jax.jit(predict, in_shardings=(data,) * 4, out_shardings=data)

  def embed_split(self, split: str, max_examples: int = 0
                  ) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Embeds a split with the current encoder (and head), BatchNorm in inference mode.

    Args:
      split: ``'test'`` (the evaluation split) or ``'bank'`` (the labelled training images).
      max_examples: 0 = all; else only the first ``max_examples`` examples (in evaluation
        order) are unmasked, and no batch after them is computed.

    Returns:
      ``(embeddings float32 [N, F], logits float32 [N, C] ([N, 0] for kNN), labels int32 [N]
      (-1 on padding), mask bool [N])``: global arrays sharded along ``N`` (``N`` = number of
      evaluation batches times ``evaluation.batch_size``).
    """
    if self._eval_fn is None:
      self._eval_fn = self._make_eval_fn()
    s = self._train_state
    head_params = s.get("head_params", {})
    batch_size = self.config.evaluation.batch_size
    host_b = batch_size // jax.process_count()
    embs, logits, labels, masks = [], [], [], []
    for i, batch in enumerate(self._data.eval_batches(split)):
      if max_examples and i * batch_size >= max_examples:
        break
      mask = np.asarray(batch["mask"], bool)
      if max_examples:
        position = i * batch_size + jax.process_index() * host_b + np.arange(host_b)
        mask = mask & (position < max_examples)
      g = parallel.host_local_to_global(
          {"images": batch["images"], "labels": np.asarray(batch["labels"], np.int32),
           "mask": mask}, self._mesh)
      with jax.set_mesh(self._mesh):
        emb, logit = self._eval_fn(s["encoder_params"], s["encoder_state"], head_params,
                                   g["images"])
      embs.append(emb)
      logits.append(logit)
      labels.append(g["labels"])
      masks.append(g["mask"])
    cat = lambda xs: jnp.concatenate(xs, axis=0)
    return cat(embs), cat(logits), cat(labels), cat(masks)

  def evaluate(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """Top-1 accuracy of the protocol on the test split (see the module docstring).

    Returns:
      ``{'{protocol}_top1': float in [0, 1], ('knn_top1_k{k}': ...,) 'num_test_examples',
      'global_step'}``.
    """
    del rng, writer
    c = self.config
    p = self._protocol
    emb, logits, labels, mask = self.embed_split("test", c.evaluation.max_examples)
    count = jnp.sum(mask)
    correct = lambda pred: float(jnp.sum((pred == labels) & mask) / jnp.maximum(count, 1))
    results = {}
    if p == "knn":
      bank_emb, _, bank_labels, bank_mask = self.embed_split("bank")
      if self._knn_fn is None:
        self._knn_fn = self._make_knn_fn()
      with jax.set_mesh(self._mesh):
        predictions = self._knn_fn(emb, bank_emb, bank_labels, bank_mask)
      for k, pred in zip(c.evaluation.knn_ks, predictions):
        results[f"knn_top1_k{k}"] = correct(pred)
      results["knn_top1"] = results[f"knn_top1_k{c.evaluation.knn_ks[0]}"]
    else:
      results[f"{p}_top1"] = correct(jnp.argmax(logits, -1))
    results["num_test_examples"] = float(count)
    results["global_step"] = float(np.asarray(global_step).reshape(-1)[0])
    return results


def _print_results(results: Mapping[str, float], config: config_dict.ConfigDict,
                   source: str) -> None:
  p = config.protocol
  n = config.network
  print(f"[eval {p}] protocol={p} dataset={config.data.dataset} "
        f"labels={config.data.label_percent}% encoder={n.encoder} x{n.width_multiplier} "
        f"step={int(results['global_step'])}", flush=True)
  print(f"[eval {p}] encoder from {source}", flush=True)
  examples = int(results["num_test_examples"])
  names = {"fine_tune_top1": "fine-tune top-1", "linear_top1": "linear top-1"}
  for key, value in results.items():
    if key in ("global_step", "num_test_examples", "knn_top1"):
      continue
    label = names.get(key, key)
    if key.startswith("knn_top1_k"):
      label = (f"kNN top-1 (k={key[len('knn_top1_k'):]}, "
               f"τ={config.evaluation.knn_temperature}, labelled train bank)")
    print(f"[eval {p}]   {label} (test, {examples} images): {100 * value:.2f}%", flush=True)
