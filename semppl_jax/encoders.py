"""Encoders in and out: load one from a run directory or a release file, and embed images.

One API for every reader of trained encoders (the evaluation experiment, the pre-training
experiment's evaluation, ``experiments/label.py``, the notebooks):

* :func:`read_encoder` reads the encoder's Haiku ``(params, state)`` from a pre-training run
  (its Orbax checkpoints: only the online encoder is restored) or a release ``.pkl`` (the
  allow-list unpickler); :func:`load_encoder` also finds the architecture the weights belong
  to and returns an :class:`Encoder`;
* :func:`make_embedder` jits any forward function over evaluation views (the whole image,
  ImageNet-normalised, optionally resized) with the weights replicated and the images sharded
  along the mesh's ``'data'`` axis; :func:`encoder_forward` is the plain encoder's forward
  (l2-normalised pooled embeddings), :func:`embedder` binds an :class:`Encoder` to it, and
  :func:`embed_to_host` runs an embedder over evaluation batches.

Haiku trees are ``{module: {name: array}}``.
"""
import functools
import os
from typing import Any, Callable, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from semppl_jax import checkpointing
from semppl_jax import evaluation
from semppl_jax import losses
from semppl_jax import networks
from semppl_jax import parallel

ModuleTree = Dict[str, Dict[str, Any]]

# Top-level scopes of a pre-training tree that are heads, not encoder.
HEAD_SCOPES = ("projector", "predictor")
HEAD_SCOPE_PREFIXES = ("classifier",)
KINDS = ("auto", "pretrain", "release")


class Encoder(NamedTuple):
  """An encoder's weights and the network they belong to.

  Attributes:
    params / state: Haiku trees of the encoder only (numpy leaves).
    architecture: a ``networks.ENCODER_NAMES`` entry.
    width_multiplier: int >= 1.
    small_images: the small-image stem (3x3, no max-pool).
    source: what was read, for messages (``'release checkpoint x.pkl'``, ...).
    step: the training step saved with the weights, or None.
  """
  params: ModuleTree
  state: ModuleTree
  architecture: str
  width_multiplier: int
  small_images: bool
  source: str
  step: Optional[int]


# ----------------------------------------------------------------------------------------------
# Reading.
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
        f"{e} Expected a pre-training run's checkpoints with "
        "train_state.online_params / online_state.") from e
  restored = snapshot["train_state"]
  as_dicts = lambda t: {m: {k: np.asarray(v) for k, v in leaves.items()} for m, leaves in t.items()}
  return as_dicts(restored["online_params"]), as_dicts(restored["online_state"]), global_step


def read_encoder(path: str, *, kind: str = "auto", encoder_prefix: Optional[str] = None
                 ) -> Tuple[ModuleTree, ModuleTree, str, Optional[int]]:
  """The encoder weights at ``path``, whatever wrote them.

  Args:
    path: a pre-training run directory (``<checkpoint_dir>``, or its ``checkpoints`` folder, a
      series or one checkpoint) or a release ``.pkl``.
    kind: ``'pretrain'``, ``'release'`` or ``'auto'`` (a file is a release, a folder a run).
    encoder_prefix: release files only: the encoder's top-level scope (default: inferred).

  Returns:
    ``(params, state, source, step)``: numpy Haiku trees of the encoder, a description of what
    was read, and the saved step (None if none).

  Raises:
    checkpointing.CheckpointError (a ValueError): nothing there, or not an encoder checkpoint.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  path = os.fspath(path)
  if "://" not in path and not os.path.exists(path):
    raise checkpointing.CheckpointError(
        f"{path!r} does not exist (a pre-training run directory or a release .pkl file)")
  if kind == "release" or (kind == "auto" and os.path.isfile(path)):
    ckpt = checkpointing.load_released_checkpoint_full(path, encoder_prefix=encoder_prefix)
    return ckpt.params, ckpt.state, f"release checkpoint {path}", ckpt.step
  run = os.path.join(path, "checkpoints")
  params, state, step = load_pretrain_encoder(run if os.path.isdir(run) else path)
  return params, state, f"pre-training checkpoint {path} (step {step})", step


@functools.lru_cache(maxsize=None)
def _scope_of(architecture: str) -> str:
  """The top-level Haiku scope of ``networks.make_encoder(architecture)`` (``'res_net50'``)."""
  params, _ = checkpointing.expected_tree(architecture, small_images=True, image_size=8)
  return next(iter(params)).split("/", 1)[0]


def infer_architecture(params: ModuleTree, state: ModuleTree, *,
                       architecture: Optional[str] = None,
                       width_multiplier: Optional[int] = None,
                       small_images: Optional[bool] = None) -> Tuple[str, int, bool]:
  """``(architecture, width_multiplier, small_images)`` whose parameter tree ``params`` /
  ``state`` match name for name and shape for shape.

  Unset arguments are searched: the encoders with the same top-level scope, widths 1, 2, 4,
  ImageNet stem first. Raises ``checkpointing.CheckpointError`` naming the closest candidate
  and its differences when none matches.
  """
  scope = next(iter(params)).split("/", 1)[0]
  names = [architecture] if architecture else [
      n for n in networks.ENCODER_NAMES if _scope_of(n) == scope]
  if not names:
    raise checkpointing.CheckpointError(
        f"cannot tell the architecture of encoder scope {scope!r}; name it (one of "
        f"{', '.join(networks.ENCODER_NAMES)})")
  widths = [width_multiplier] if width_multiplier else [1, 2, 4]
  stems = [small_images] if small_images is not None else [False, True]
  best = None
  for name in names:
    for width in widths:
      for small in stems:
        expected = checkpointing.expected_tree(name, width, small_images=small)
        diffs = checkpointing.verify_checkpoint_tree(params, state, *expected)
        if not diffs:
          return name, width, small
        if best is None or len(diffs) < len(best[1]):
          best = ((name, width, small), diffs)
  (name, width, small), diffs = best
  raise checkpointing.CheckpointError(
      f"does not match {name} x{width} (small_images={small}) nor any other candidate; "
      f"{len(diffs)} difference(s), e.g.\n  " + "\n  ".join(diffs[:10]))


def load_encoder(path: str, *, architecture: Optional[str] = None,
                 width_multiplier: Optional[int] = None, small_images: Optional[bool] = None,
                 kind: str = "auto", encoder_prefix: Optional[str] = None) -> Encoder:
  """The encoder at ``path`` (:func:`read_encoder`), checked against our network.

  Unset ``architecture`` / ``width_multiplier`` / ``small_images`` are inferred
  (:func:`infer_architecture`).

  Raises:
    checkpointing.CheckpointError (a ValueError): nothing readable there, or no network fits.
  """
  params, state, source, step = read_encoder(path, kind=kind, encoder_prefix=encoder_prefix)
  try:
    name, width, small = infer_architecture(params, state, architecture=architecture,
                                            width_multiplier=width_multiplier,
                                            small_images=small_images)
  except checkpointing.CheckpointError as e:
    raise checkpointing.CheckpointError(f"the encoder of {source} {e}") from e
  return Encoder(params, state, name, width, small, source, step)


def check_encoder(params, state, expected_params, expected_state, what: str,
                  network_config) -> None:
  """Raises CheckpointError listing every name/shape difference to our encoder.

  ``network_config`` has ``encoder``, ``width_multiplier`` and ``small_images`` (for the
  message); ``what`` names the checkpoint.
  """
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
# Embedding.
# ----------------------------------------------------------------------------------------------

def make_embedder(forward: Callable[[Any, jax.Array], Any], mesh: Mesh, *,
                  image_size: Optional[int] = None) -> Callable[[Any, jax.Array], Any]:
  """Jitted ``(weights, images [b, H, W, C]) -> forward(weights, views)``.

  ``views`` are the evaluation views of ``images`` (uint8 or float in [0, 1], 1 or 3
  channels): float32 ``[b, S, S, 3]``, ImageNet-normalised, resized to ``S = image_size``
  when given (``evaluation.eval_view``), else at their own size. ``weights`` (any pytree) are
  replicated over ``mesh``; the images and every output are sharded along ``'data'``. The
  weights are an argument, so new weights (e.g. during training) reuse the compilation.
  """
  def embed(weights, images):
    if image_size is None:
      views = evaluation.eval_view(images, images.shape[1])
    else:
      views = evaluation.eval_view(images, image_size)
    return forward(weights, views)

  return jax.jit(embed, in_shardings=(parallel.replicated_sharding(mesh),
                                      parallel.data_sharding(mesh)),
                 out_shardings=parallel.data_sharding(mesh))


def encoder_forward(architecture: str, width_multiplier: int = 1, small_images: bool = False
                    ) -> Callable[[Tuple[ModuleTree, ModuleTree], jax.Array], jax.Array]:
  """``((params, state), views [b, S, S, 3]) -> float32 [b, F]``: the encoder in inference
  mode, pooled embeddings l2-normalised."""
  model = hk.transform_with_state(lambda x: networks.make_encoder(
      architecture, width_multiplier=width_multiplier, small_images=small_images)(
          x, is_training=False))

  def forward(weights, views):
    embeddings, _ = model.apply(weights[0], weights[1], None, views)
    return losses.l2_normalize(embeddings.astype(jnp.float32))

  return forward


def embedder(encoder: Encoder, mesh: Mesh, image_size: Optional[int] = None
             ) -> Callable[[jax.Array], jax.Array]:
  """``images -> l2-normalised embeddings`` of ``encoder`` (:func:`make_embedder`), its weights
  placed on ``mesh`` once."""
  fn = make_embedder(encoder_forward(encoder.architecture, encoder.width_multiplier,
                                     encoder.small_images), mesh, image_size=image_size)
  weights = jax.device_put((encoder.params, encoder.state), parallel.replicated_sharding(mesh))
  return lambda images: fn(weights, images)


def embed_to_host(fn: Callable[[jax.Array], jax.Array],
                  batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh) -> np.ndarray:
  """float32 ``[N, F]``: ``fn`` over evaluation ``batches`` (``evaluation.embed_batches``), in
  order, padding removed, on this host."""
  (out,), _, mask = evaluation.embed_batches(fn, batches, mesh)
  out, mask = parallel.global_to_host_local((out, mask))
  return np.asarray(out[np.asarray(mask, bool)], np.float32)
