"""The SemPPL update as pure functions: typed hyper-parameters, a train state, one step.

Everything here is an argument: no config dicts, flags or globals. The jaxline experiment
(``semppl_jax/jaxline/experiment.py``) turns its ConfigDict into a :class:`TrainConfig` once, builds the
state with :func:`init_train_state`, places it with :func:`train_state_shardings` and calls
:func:`train_step` under ``jax.jit`` inside ``jax.set_mesh(mesh)``.

Data parallelism. Per-device work scales as 1/devices, and that is proven by the compiled
program, not by equal values (replicated work gives the same numbers):
``tests/test_data_parallel.py`` compiles every objective's step on 1 and on 8 devices at the same
global batch and requires the per-device FLOPs (``semppl_jax.compiled_cost``) to fall to at most
0.2x (0.125x measured), no all-gather of images or activations, and an all-reduce of the
gradients. Two things keep the batch sharded: views are flattened batch-major (``'(b v)'``, so a
device's rows stay one contiguous block) and pinned to the data axis at each network input
(``parallel.shard_batch``); the blur is a batched matmul (see ``photometric.blur_unchecked``).

Sharding. Inside ``jax.set_mesh(mesh)`` (1-D mesh, axis ``'data'``) the batch is sharded along
``'data'``, parameters are replicated and the queues are sharded along their entries; kNN,
semantic-positive sampling and enqueue then run their sharded forms (``semppl_jax.knn``,
``semppl_jax.queue``). Without a mesh the same math runs on one device. Labelled and
unlabelled images are interleaved per device (each device's labelled rows, then its unlabelled
rows), so no device sends batch rows to another.

Objectives are data (:data:`OBJECTIVES`): which loss terms run and whether the probe's
cross-entropy trains the encoder.

* ``semppl``: augmentation contrastive + invariance terms, and the semantic terms with positives
  drawn from the labelled queues by (pseudo-)label;
* ``relic``: the same without semantic positives (ReLICv2-style);
* ``supervised``: encoder + linear head trained by cross-entropy on the labelled images only.
"""
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import einops
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semppl_jax import augmentations
from semppl_jax import evaluation
from semppl_jax import knn
from semppl_jax import losses
from semppl_jax import networks
from semppl_jax import nonfinite_guard
from semppl_jax import optim
from semppl_jax import parallel
from semppl_jax import queue as queue_lib
from semppl_jax import semantic_positives
# The typed hyper-parameters (train_config.py), re-exported: train.TrainConfig is public API.
from semppl_jax.train_config import (  # noqa: F401  pylint: disable=unused-import
    Objective as Objective,
    OBJECTIVES as OBJECTIVES,
    ViewConfig as ViewConfig,
    NetworkConfig as NetworkConfig,
    LossConfig as LossConfig,
    PSEUDO_LABEL_SOURCES as PSEUDO_LABEL_SOURCES,
    KNN_QUERIES as KNN_QUERIES,
    QUEUE_DTYPES as QUEUE_DTYPES,
    OptimConfig as OptimConfig,
    TrainConfig as TrainConfig,
)

from semppl_jax.train_networks import (  # noqa: F401  pylint: disable=unused-import
    Networks as Networks,
    build_networks as build_networks,
    compute_dtype as compute_dtype,
    encoder_fn as encoder_fn,
    learning_rate_schedule as learning_rate_schedule,
    online_optimizer as online_optimizer,
    probe_optimizer as probe_optimizer,
)

PyTree = Any


class TrainState(NamedTuple):
  """Everything a pre-training step reads and writes (a pytree).

  Attributes:
    step: int32 [], the number of steps taken (drives both schedules).
    online_params / online_state: Haiku params / BatchNorm state of encoder, projector,
      predictor.
    target_params / target_state: the EMA target (encoder + projector).
    opt_state: LARS state of the online parameters.
    probe_params / probe_opt_state: the linear probe ``classifier`` and its Adam state.
    queue: the ``L`` labelled-embedding queues ``[L, Q, D]``.
    nonfinite_step: int32 [], the non-finite guard (see ``nonfinite_guard.guard_nonfinite``): the number
      (1-based, as in the progress line ``step N/K``) of the first step whose update was
      refused because something was not finite; -1 while every step was finite. Once set, the
      state stays as it was before that step.
    nonfinite_check: int32 [], which check failed first at that step: an index into
      ``nonfinite_guard.nonfinite_check_names`` of the step's metric names; -1 while none did.

  The two guard fields are not part of :meth:`to_dict` (nor of checkpoints): a state whose
  guard is set is never saved, so checkpoints from before and after the guard existed are
  interchangeable.
  """
  step: jax.Array
  online_params: PyTree
  online_state: PyTree
  target_params: PyTree
  target_state: PyTree
  opt_state: PyTree
  probe_params: PyTree
  probe_opt_state: PyTree
  queue: queue_lib.Queue
  nonfinite_step: jax.Array
  nonfinite_check: jax.Array

  def to_dict(self) -> Dict[str, Any]:
    """A nested dict (what checkpoints store), without the guard fields."""
    tree = dict(self._asdict(), queue=self.queue._asdict())
    for name in _GUARD_FIELDS:
      del tree[name]
    return tree

  @classmethod
  def from_dict(cls, tree: Mapping[str, Any]) -> "TrainState":
    """Inverse of :meth:`to_dict`; the guard fields start cleared (-1) unless ``tree`` has them."""
    fields = dict(tree)
    fields["queue"] = queue_lib.Queue(**fields["queue"])
    for name in _GUARD_FIELDS:
      fields.setdefault(name, jnp.full((), -1, jnp.int32))
    return cls(**fields)


_GUARD_FIELDS = ("nonfinite_step", "nonfinite_check")


def _subset(tree: Mapping[str, Any], like: Mapping[str, Any]) -> Dict[str, Any]:
  """The modules of ``tree`` that also exist in ``like`` (online -> target parameters)."""
  return {k: tree[k] for k in like}


def init_train_state(config: TrainConfig, key: jax.Array) -> TrainState:
  """A fresh state: random online network, the target a copy of it, empty queues.

  Args:
    config: the hyper-parameters.
    key: a PRNG key.

  Returns:
    A :class:`TrainState` of unplaced arrays (place it with :func:`train_state_shardings`).
  """
  nets = build_networks(config.network, config.num_classes)
  size = config.views.large_size
  dummy = jnp.zeros((2, size, size, 3), jnp.float32)
  k_online, k_probe = jax.random.split(key)
  # Jitted: an eager ResNet-50 initialisation runs op by op.
  online_params, online_state = jax.jit(lambda k, x: nets.online.init(k, x, True))(
      k_online, dummy)
  target_shape = jax.eval_shape(lambda k, x: nets.target.init(k, x, True), k_online, dummy)
  # Copies, not views: the train step donates the state, and donated buffers must be distinct.
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  target_params = copy(_subset(online_params, target_shape[0]))
  target_state = copy(_subset(online_state, target_shape[1]))
  width = networks.embedding_size(config.network.encoder, config.network.width_multiplier)
  probe_params = nets.probe.init(k_probe, jnp.zeros((1, width), jnp.float32))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      online_params=online_params, online_state=online_state,
      target_params=target_params, target_state=target_state,
      opt_state=online_optimizer(config, online_params).init(online_params),
      probe_params=probe_params,
      probe_opt_state=probe_optimizer(config).init(probe_params),
      queue=queue_lib.init(config.views.num_large, config.queue_size,
                           config.network.projection_size, dtype=compute_dtype(config.queue_dtype)),
      nonfinite_step=jnp.full((), -1, jnp.int32), nonfinite_check=jnp.full((), -1, jnp.int32))


def train_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
  """Where each leaf lives: replicated, except the queues, sharded along their entries."""
  replicated = parallel.replicated_sharding(mesh)
  shardings = jax.tree_util.tree_map(lambda _: replicated, state)
  return shardings._replace(queue=queue_lib.Queue(
      embeddings=NamedSharding(mesh, P(None, parallel.DATA_AXIS, None)),
      labels=NamedSharding(mesh, P(None, parallel.DATA_AXIS)),
      position=replicated))


# ----------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------

def _interleave(labelled: jax.Array, unlabelled: jax.Array, num_shards: int) -> jax.Array:
  """``[B_l, ...]`` and ``[B_u, ...]`` -> ``[B_l + B_u, ...]``, each shard's labelled rows first.

  With both inputs sharded along ``'data'`` into ``num_shards`` blocks, block ``d`` of the
  result holds block ``d`` of each input: no row moves between devices.
  """
  a = einops.rearrange(labelled, "(n b) ... -> n b ...", n=num_shards)
  b = einops.rearrange(unlabelled, "(n b) ... -> n b ...", n=num_shards)
  return einops.rearrange(jnp.concatenate([a, b], axis=1), "n b ... -> (n b) ...")


def labelled_rows(config: TrainConfig, num_shards: int) -> jax.Array:
  """int32 [B_l]: the rows of the interleaved batch that hold labelled images."""
  rows = jnp.arange(config.batch_size).reshape(num_shards, -1)
  return rows[:, : config.labelled_batch_size // num_shards].reshape(-1)


def _unlabelled_part(x: jax.Array, config: TrainConfig, num_shards: int) -> jax.Array:
  """``[L, B, ...]`` -> ``[L, B_u, ...]``: the unlabelled rows (each shard's last ``B_u / n``
  rows of the interleaved batch), by a static slice per shard, so the batch stays sharded."""
  x = einops.rearrange(x, "l (n b) ... -> l n b ...", n=num_shards)
  x = x[:, :, config.labelled_batch_size // num_shards:]
  return einops.rearrange(x, "l n b ... -> l (n b) ...")


def _fill_labelled_rows(unlabelled: jax.Array, config: TrainConfig, num_shards: int,
                        fill: int) -> jax.Array:
  """``[B_u]`` -> ``[B]`` in the interleaved order: the unlabelled values in place, ``fill`` at
  the labelled rows (the inverse of :func:`_unlabelled_part`)."""
  u = einops.rearrange(unlabelled, "(n b) -> n b", n=num_shards)
  lab = jnp.full((num_shards, config.labelled_batch_size // num_shards), fill, unlabelled.dtype)
  return einops.rearrange(jnp.concatenate([lab, u], axis=1), "n b -> (n b)")


def knn_pseudo_labels(config: TrainConfig, queries: jax.Array, queue: queue_lib.Queue
                      ) -> jax.Array:
  """The kNN labeller of the unlabelled rows (labelled rows use their own label instead).

  Args:
    config: the hyper-parameters (``loss.knn_k``, ``loss.min_vote_agreement``,
      ``loss.knn_approximate``).
    queries: float32 ``[L, B, D]`` l2-normalised queries in the interleaved row order.
    queue: the queues before this step's enqueue.

  Returns:
    int32 ``[B]``: the pseudo-labels of the unlabelled rows (-1 = none), -1 at the labelled
    rows, which are not queried.
  """
  n, lc = config.num_shards, config.loss
  if not config.unlabelled_batch_size:
    return jnp.full((config.batch_size,), -1, jnp.int32)
  pseudo = knn.pseudo_labels(_unlabelled_part(jax.lax.stop_gradient(queries), config, n), queue,
                             k=lc.knn_k, num_classes=config.num_classes,
                             min_agreement=lc.min_vote_agreement,
                             approximate=lc.knn_approximate)
  return _fill_labelled_rows(pseudo, config, n, -1)


def knn_in_step(config: TrainConfig) -> bool:
  """Whether :func:`train_step` runs the kNN labeller (else :func:`knn_monitor` does).

  The semantic objective needs its pseudo-labels every step. Objectives for which they are only
  a monitor (relic) run them in the step when ``loss.knn_monitor_every == 1``; otherwise the
  step reports no kNN monitors and the caller runs :func:`knn_monitor` every
  ``knn_monitor_every`` steps, so the step's cost does not grow with the queue.
  """
  objective = OBJECTIVES[config.objective]
  return objective.contrastive and (objective.semantic or config.loss.knn_monitor_every == 1)


# What knn_monitor reports (the step's kNN monitors when knn_in_step is False).
KNN_MONITORS = ("pseudo_label_accuracy", "pseudo_label_coverage", "queue_fill")


def _knn_monitors(fwd: "Forward", queue: queue_lib.Queue) -> Dict[str, jax.Array]:
  """'pseudo_label_accuracy' / 'pseudo_label_coverage' (unlabelled rows) and 'queue_fill'."""
  unlabelled, pseudo = ~fwd.is_labelled, fwd.pseudo_labels
  return {"pseudo_label_accuracy": _masked_mean(pseudo == fwd.true_labels,
                                                unlabelled & (pseudo >= 0)),
          "pseudo_label_coverage": _masked_mean(pseudo >= 0, unlabelled),
          "queue_fill": queue_lib.fill_fraction(queue)}


def knn_monitor(config: TrainConfig, state: "TrainState", batch: Mapping[str, jax.Array],
                key: jax.Array) -> Dict[str, jax.Array]:
  """The kNN monitors of a step that does not run them (``knn_in_step(config)`` False).

  Called with the state, batch and key of :func:`train_step` (before the step), it repeats the
  step's forward pass (training mode; nothing is updated) and returns exactly what the step
  would have reported: 'pseudo_label_accuracy', 'pseudo_label_coverage' and 'queue_fill',
  float32 []. Jit it with ``config`` static, like the step.
  """
  fwd = forward(config, state.online_params, state.target_params, state, batch, key)
  return {k: jnp.asarray(v, jnp.float32) for k, v in _knn_monitors(fwd, state.queue).items()}


def make_views(config: TrainConfig, batch: Mapping[str, jax.Array], key: jax.Array,
               num_shards: int) -> Tuple[jax.Array, jax.Array]:
  """All views of the interleaved batch, float32 in [0, 1].

  ``batch`` carries either whole images (``labelled_images`` / ``unlabelled_images``
  ``[B, H, W, C]``: crops, flips and photometric changes on device) or views cropped on the
  host from the full image (``labelled_large`` ``[B_l, L, h, h, 3]``, ``labelled_small``
  ``[B_l, S, s, s, 3]`` and the ``unlabelled_*`` counterparts: flips and photometric changes on
  device).

  Returns:
    ``(large [L, B, h, h, 3], small [S, B, s, s, 3])``.
  """
  v = config.views
  # The network rounds its input to bfloat16 when it computes in bfloat16, so the pixel
  # matmuls (crop resize, blur) need no more than one bf16 pass there (and no HIGHEST dot
  # stays in the step).
  pixel_precision = (jax.lax.Precision.DEFAULT if config.network.compute_dtype == "bfloat16"
                    else jax.lax.Precision.HIGHEST)
  if "labelled_images" in batch:
    images = evaluation.preprocess(
        _interleave(batch["labelled_images"], batch["unlabelled_images"], num_shards))
    return augmentations.multi_crop(
        images, key, num_large=v.num_large, num_small=v.num_small, large_size=v.large_size,
        small_size=v.small_size, large_scale=v.large_scale, small_scale=v.small_scale,
        presets=v.presets, precision=pixel_precision)
  views = []
  for group, size_name in enumerate(("large", "small")):
    x = _interleave(batch[f"labelled_{size_name}"], batch[f"unlabelled_{size_name}"], num_shards)
    x = einops.rearrange(x, "b v h w c -> v b h w c")
    views.append(augmentations.photometric_views(x, jax.random.fold_in(key, group),
                                                 presets=v.presets,
                                                 precision=pixel_precision))
  return views[0], views[1]


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(values.astype(jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class Forward(NamedTuple):
  """What one forward pass of the step computes before the loss (:func:`forward`).

  Rows are in the interleaved order (each shard's labelled rows, then its unlabelled rows).
  Fields a given objective does not compute are None (the supervised baseline runs the online
  network on the large views only).

  Attributes:
    large / small: float32 ``[L, B, h, h, 3]`` / ``[S, B, s, s, 3]`` views in [0, 1].
    true_labels: int32 ``[B]`` (hidden truth of unlabelled rows; monitors only).
    is_labelled: bool ``[B]``.
    embeddings: ``[L, B, F]`` online encoder embeddings of the large views.
    online_state: the online BatchNorm state after the pass.
    online: float32 ``[L + S, B, D]`` l2-normalised online predictions (large views first).
    target: float32 ``[L, B, D]`` l2-normalised target projections (stop-gradient).
    target_state: the target BatchNorm state after the pass.
    pseudo_labels: int32 ``[B]`` kNN votes from the queues before this step's enqueue (queried
      with ``online[:L]`` or ``target``, ``LossConfig.knn_query``; -1 = no label); only the
      unlabelled rows are queried: -1 at the labelled rows, and everywhere when the pass ran
      without the kNN (``knn=False``).
    labels_star: int32 ``[B]``, y*: true labels of labelled rows, else the pseudo-label (or
      the research oracle's label).
    semantic: float32 ``[L, N, B, D]`` drawn semantic positives (zeros without ``semantic``).
    semantic_valid: bool ``[L, N, B]``.
  """
  large: jax.Array
  small: jax.Array
  true_labels: jax.Array
  is_labelled: jax.Array
  embeddings: jax.Array
  online_state: PyTree
  online: Optional[jax.Array] = None
  target: Optional[jax.Array] = None
  target_state: Optional[PyTree] = None
  pseudo_labels: Optional[jax.Array] = None
  labels_star: Optional[jax.Array] = None
  semantic: Optional[jax.Array] = None
  semantic_valid: Optional[jax.Array] = None


class _Forward(NamedTuple):
  """What the loss function hands back besides the loss."""
  metrics: Dict[str, jax.Array]
  online_state: PyTree
  target_state: Optional[PyTree]
  target_projections: Optional[jax.Array]   # [L, B, D], l2-normalised
  labels: jax.Array                         # [B] true labels (hidden for unlabelled rows)


def forward(config: TrainConfig, online_params: PyTree, target_params: PyTree,
            state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array, *,
            is_training: bool = True, knn: bool = True) -> Forward:
  """The step's forward pass: views, networks, pseudo-labels and semantic positives.

  :func:`objective_loss` adds the probe and the loss to it; the image summaries call it in
  inference mode (``is_training=False``: BatchNorm moving averages, state unchanged), so the
  picture shows what a step computes.

  Args:
    config: the hyper-parameters.
    online_params / target_params: the networks' parameters.
    state: the rest of the train state (BatchNorm states, queues).
    batch: the global batch (see :func:`make_views`), plus ``labels`` int32 [B_l] and
      ``unlabelled_labels`` int32 [B_u].
    key: this step's PRNG key (split into views, semantic draws and negatives; the oracle
      uses ``fold_in(key, 3)``).
    is_training: BatchNorm mode.
    knn: run the kNN labeller (False: every pseudo-label is -1, for objectives whose labels
      only feed monitors, see :func:`knn_in_step`).

  Returns:
    A :class:`Forward`.
  """
  objective = OBJECTIVES[config.objective]
  nets = build_networks(config.network, config.num_classes)
  n = config.num_shards
  L, S, B = config.views.num_large, config.views.num_small, config.batch_size
  k_views, k_sem, _ = jax.random.split(key, 3)
  large, small = make_views(config, batch, k_views, n)
  true_labels = _interleave(batch["labels"], batch["unlabelled_labels"], n)
  is_labelled = jnp.zeros((B,), bool).at[labelled_rows(config, n)].set(True)
  # Views flattened to one batch per size: one network call each, BatchNorm over all of them.
  # Batch-major ('(b v)'): with the batch sharded, each device's rows stay one contiguous block
  # (its images' views), so the encoder runs on the local shard. A view-major '(v b)' flatten
  # interleaves the shards and makes GSPMD gather every view onto every device.
  flat = lambda x: parallel.shard_batch(
      augmentations.normalize(einops.rearrange(x, "v b ... -> (b v) ...")))
  unflat = lambda x, v: einops.rearrange(x, "(b v) d -> v b d", v=v)

  (emb_l, _, pred_l), online_state = nets.online.apply(
      online_params, state.online_state, None, flat(large), is_training)
  if not is_training:
    online_state = state.online_state
  out = Forward(large=large, small=small, true_labels=true_labels, is_labelled=is_labelled,
                embeddings=unflat(emb_l, L), online_state=online_state)
  if not objective.contrastive:
    return out

  predictions = unflat(pred_l, L)
  if S:
    (_, _, pred_s), small_state = nets.online.apply(
        online_params, online_state, None, flat(small), is_training)
    if is_training and not config.loss.bn_stats_from_large_views_only:
      online_state = small_state
    predictions = jnp.concatenate([predictions, unflat(pred_s, S)], axis=0)
  online = losses.l2_normalize(predictions)

  target_proj, target_state = nets.target.apply(
      target_params, state.target_state, None, flat(large), is_training)
  if not is_training:
    target_state = state.target_state
  target_proj = jax.lax.stop_gradient(losses.l2_normalize(unflat(target_proj, L)))

  # Pseudo-labels from the queues as they were before this step's enqueue.
  # Only the unlabelled rows are queried: labelled rows take their own label below.
  if knn:
    queries = online[:L] if config.loss.knn_query == "prediction" else target_proj
    pseudo = knn_pseudo_labels(config, queries, state.queue)
  else:
    pseudo = jnp.full((B,), -1, jnp.int32)
  labels_star = jnp.where(is_labelled, true_labels, pseudo)
  if config.loss.pseudo_labels != "knn":  # Research oracles: the kNN vote stays a monitor.
    labels_star = jnp.where(is_labelled, true_labels, oracle_labels(
        jax.random.fold_in(key, 3), true_labels, config.num_classes,
        1.0 if config.loss.pseudo_labels == "oracle" else config.loss.oracle_accuracy))
  N = config.loss.num_semantic_positives
  if objective.semantic:
    semantic, valid = semantic_positives.sample_semantic_positives(k_sem, labels_star,
                                                                   state.queue, N)
  else:  # No semantic positives: all-invalid masks make both semantic terms exactly zero.
    semantic = jnp.zeros((L, N, B, online.shape[-1]), online.dtype)
    valid = jnp.zeros((L, N, B), bool)
  return out._replace(online_state=online_state, online=online, target=target_proj,
                      target_state=target_state, pseudo_labels=pseudo, labels_star=labels_star,
                      semantic=semantic, semantic_valid=valid)


def objective_loss(config: TrainConfig, online_params: PyTree, probe_params: PyTree,
                   target_params: PyTree, state: TrainState, batch: Mapping[str, jax.Array],
                   key: jax.Array) -> Tuple[jax.Array, _Forward]:
  """The step's loss (objective + probe cross-entropy) and everything else it computes.

  Differentiable in ``online_params`` and ``probe_params``; ``target_params`` enter through a
  stop-gradient (the test suite checks that no gradient reaches them).

  Args:
    config: the hyper-parameters.
    online_params / probe_params / target_params: the parameters in play.
    state: the rest of the train state (BatchNorm states, queues).
    batch: the global batch (see :func:`make_views`), plus ``labels`` int32 [B_l] and
      ``unlabelled_labels`` int32 [B_u] (hidden truth, read only by monitors).
    key: this step's PRNG key.

  Returns:
    ``(loss float32 [], _Forward)``.
  """
  objective = OBJECTIVES[config.objective]
  nets = build_networks(config.network, config.num_classes)
  L = config.views.num_large
  k_neg = jax.random.split(key, 3)[2]
  fwd = forward(config, online_params, target_params, state, batch, key,
                knn=knn_in_step(config))
  lab_rows = labelled_rows(config, config.num_shards)
  true_labels = fwd.true_labels

  # The probe reads a stop-gradient embedding, so it monitors the representation without
  # shaping it -- except in the supervised baseline, where its cross-entropy is the objective.
  probe_in = einops.rearrange(fwd.embeddings[:, lab_rows], "v b f -> (v b) f")
  if not objective.probe_trains_encoder:
    probe_in = jax.lax.stop_gradient(probe_in)
  probe_labels = jnp.tile(true_labels[lab_rows], L)
  probe_ce, probe_logits = evaluation.classifier_loss(nets.probe, probe_params, probe_in,
                                                      probe_labels)
  metrics = {"probe_loss": probe_ce,
             "probe_train_top1": jnp.mean(jnp.argmax(probe_logits, -1) == probe_labels)}
  if not objective.contrastive:
    return probe_ce, _Forward(metrics, fwd.online_state, None, None, true_labels)

  online, target_proj = fwd.online, fwd.target
  labels_star, semantic, valid = fwd.labels_star, fwd.semantic, fwd.semantic_valid
  lc = config.loss
  semantic_scale = 1.0
  if lc.semantic_ramp_steps > 0:
    semantic_scale = jnp.minimum(1.0, state.step.astype(jnp.float32) / lc.semantic_ramp_steps)
  loss, loss_metrics = losses.semppl_loss(
      online, target_proj, semantic, valid, temperature=lc.temperature,
      contrastive_weight=lc.contrastive_weight, semantic_weight=lc.semantic_weight,
      invariance_weight=lc.invariance_weight,
      semantic_invariance_weight=lc.semantic_invariance_weight,
      semantic_negatives=lc.semantic_negatives, num_negatives=lc.num_negatives or None,
      key=k_neg if lc.num_negatives else None, semantic_labels=labels_star,
      mask_same_class_negatives=lc.mask_same_class_negatives, semantic_scale=semantic_scale,
      precision=lc.precision, matmul_dtype=compute_dtype(config.network.compute_dtype))
  metrics.update(loss_metrics)
  metrics["loss"] = loss + probe_ce

  # Monitors. The hidden labels of unlabelled images are read here and in knn_monitor only.
  knn_monitors = _knn_monitors(fwd, state.queue) if knn_in_step(config) else {}
  metrics.update({k: v for k, v in knn_monitors.items() if k != "queue_fill"})
  if objective.semantic:
    # Drawn positives carry label y*_i by construction: pure exactly where y*_i is right.
    correct = jnp.broadcast_to(labels_star == true_labels, valid.shape)
    metrics["semantic_positive_purity"] = _masked_mean(correct, valid)
  if "queue_fill" in knn_monitors:
    metrics["queue_fill"] = knn_monitors["queue_fill"]
  return loss + probe_ce, _Forward(metrics, fwd.online_state, fwd.target_state, target_proj,
                                   true_labels)


def oracle_labels(key: jax.Array, labels: jax.Array, num_classes: int,
                  accuracy: float) -> jax.Array:
  """A labeller of known accuracy: each true label kept with probability ``accuracy``, else
  replaced by one of the other ``num_classes - 1`` classes drawn uniformly.

  Args:
    key: a PRNG key.
    labels: int32 [B], the true labels (-1 = unknown stays -1).
    num_classes: C >= 2.
    accuracy: q in [0, 1] (python or traced).

  Returns:
    int32 [B].
  """
  k_keep, k_wrong = jax.random.split(key)
  keep = jax.random.uniform(k_keep, labels.shape) < accuracy
  shift = jax.random.randint(k_wrong, labels.shape, 1, max(num_classes, 2))
  noisy = jnp.where(keep, labels, (labels + shift) % num_classes).astype(jnp.int32)
  return jnp.where(labels >= 0, noisy, labels)


def train_step(config: TrainConfig, state: TrainState, batch: Mapping[str, jax.Array],
               key: jax.Array) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One SemPPL update (docs/design.md §2): loss, LARS + probe updates, target EMA, enqueue.

  Jit it with ``config`` static (``jax.jit(train_step, static_argnums=0)`` or a
  ``functools.partial``); inside ``jax.set_mesh(mesh)`` it runs sharded (module docstring).

  Args:
    config: the hyper-parameters.
    state: the current :class:`TrainState` (its ``step`` drives the schedules).
    batch: the global batch (see :func:`objective_loss`).
    key: this step's PRNG key (callers use ``fold_in(root, step)``).

  Returns:
    ``(new_state, metrics)``: metrics are float32 [] device scalars ('loss', the loss terms,
    probe and pseudo-label monitors, 'learning_rate', 'ema_decay'); nothing is fetched. If a
    metric or the updated state is not finite, ``new_state`` is ``state`` with its guard set
    (``nonfinite_guard.guard_nonfinite``); callers check ``nonfinite_step`` when they fetch anyway.
  """
  objective = OBJECTIVES[config.objective]
  grad_fn = jax.value_and_grad(objective_loss, argnums=(1, 2), has_aux=True)
  (loss, fwd), (grads, probe_grads) = grad_fn(
      config, state.online_params, state.probe_params, state.target_params, state, batch, key)
  updates, opt_state = online_optimizer(config, state.online_params).update(
      grads, state.opt_state, state.online_params)
  online_params = optax.apply_updates(state.online_params, updates)
  probe_updates, probe_opt_state = probe_optimizer(config).update(
      probe_grads, state.probe_opt_state, state.probe_params)
  metrics = dict(fwd.metrics, loss=loss,
                 learning_rate=learning_rate_schedule(config)(state.step),
                 grad_norm=optax.tree.norm(grads))
  new_state = state._replace(
      step=state.step + 1, online_params=online_params, online_state=fwd.online_state,
      opt_state=opt_state, probe_params=optax.apply_updates(state.probe_params, probe_updates),
      probe_opt_state=probe_opt_state)
  update_queue = None
  if objective.contrastive:
    decay = optim.target_ema_decay(state.step, base_decay=config.optim.target_base_decay,
                                   total_steps=config.training_steps)
    rows = labelled_rows(config, config.num_shards)
    # The enqueue runs after the guard's decision (write=accept): it then updates the donated
    # queue in place, where choosing between an updated and the old queue would copy it.
    update_queue = lambda accept: queue_lib.enqueue(
        state.queue, fwd.target_projections[:, rows], fwd.labels[rows],
        num_shards=config.num_shards, write=accept)
    new_state = new_state._replace(
        target_params=optim.target_ema(_subset(online_params, state.target_params),
                                       state.target_params, decay),
        target_state=fwd.target_state)
    metrics["ema_decay"] = decay
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  return nonfinite_guard.guard_nonfinite(state, new_state, metrics,
                                        enqueued=fwd.target_projections,
                                        update_queue=update_queue), metrics
