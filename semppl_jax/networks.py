"""Encoders and heads used by SemPPL, as Haiku modules.

* ResNet v1 (and v2) ``ResNet18 … ResNet200`` with a width multiplier. Instantiated at the top
  level of an ``hk.transform_with_state`` they reproduce the parameter tree of the released SemPPL
  checkpoints (Haiku 0.0.9 ResNet v1 names: ``res_net50/~/initial_conv``,
  ``res_net50/~/block_group_0/~/block_0/~/conv_0`` …).
* Selective-kernel ResNets ``SKResNet50/101/152`` (SimCLRv2 design: SK 3x3 convolutions,
  ResNet-D stem and average-pool shortcuts).
* ``TinyResNet`` for tests and quick CPU runs.
* ``MLP`` (projector / predictor head) and ``LinearClassifier``.
* ``make_encoder`` / ``embedding_size``: encoder construction by name.

Every encoder is called as ``module(images, is_training)`` with ``images`` float ``[B, H, W, C]``
(NHWC) and returns float32 ``[B, F]`` pooled embeddings, or float32 ``[B, num_classes]`` logits
when ``num_classes`` is given. ``compute_dtype=jnp.bfloat16`` keeps parameters (and BatchNorm
statistics) in float32 while convolutions and linear layers run in bfloat16.

BatchNorm never reduces over a named axis (``cross_replica_axis=None``): under ``jax.jit`` over a
mesh with the batch sharded, the batch statistics are global by construction.
"""

import contextlib
import functools
import numbers
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

# BYOL / Haiku ResNet defaults. Read-only so that no caller can mutate it for everyone.
DEFAULT_BN_CONFIG: Mapping[str, Any] = types.MappingProxyType({
    "decay_rate": 0.9,
    "eps": 1e-5,
    "create_scale": True,
    "create_offset": True,
})

# SimCLRv2's selective-kernel ratio and the floor on the attention bottleneck width.
DEFAULT_SK_RATIO = 0.0625
_SK_MIN_DIM = 32

_BASIC_CHANNELS = (64, 128, 256, 512)
_BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)

# depth -> (blocks per group, bottleneck, channels per group at width 1, projection per group).
_RESNET_CONFIGS = {
    18: ((2, 2, 2, 2), False, _BASIC_CHANNELS, (False, True, True, True)),
    34: ((3, 4, 6, 3), False, _BASIC_CHANNELS, (False, True, True, True)),
    50: ((3, 4, 6, 3), True, _BOTTLENECK_CHANNELS, (True, True, True, True)),
    101: ((3, 4, 23, 3), True, _BOTTLENECK_CHANNELS, (True, True, True, True)),
    152: ((3, 8, 36, 3), True, _BOTTLENECK_CHANNELS, (True, True, True, True)),
    200: ((3, 24, 36, 3), True, _BOTTLENECK_CHANNELS, (True, True, True, True)),
}
_TINY_CONFIG = ((1, 1), False, (16, 32), (False, True))
_TINY_STEM_CHANNELS = 16

# Rematerialisation of the residual torso: keep every activation ('none'), or keep only each
# block's (or each block group's) input and recompute its inside during the backward pass.
REMAT_POLICIES: tuple[str, ...] = ("none", "block", "group")


def _merged_bn_config(bn_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """Defaults overridden by ``bn_config``; validated so errors name the argument."""
  merged = dict(DEFAULT_BN_CONFIG)
  if bn_config is not None:
    if not isinstance(bn_config, Mapping):
      raise ValueError(f"bn_config must be a mapping or None, got {type(bn_config).__name__}")
    merged.update(bn_config)
  decay = merged["decay_rate"]
  if not 0.0 <= float(decay) <= 1.0:
    raise ValueError(f"bn_config['decay_rate'] must be in [0, 1], got {decay}")
  if not float(merged["eps"]) > 0.0:
    raise ValueError(f"bn_config['eps'] must be > 0, got {merged['eps']}")
  return merged


def _check_width(width_multiplier: Any) -> int:
  if (isinstance(width_multiplier, bool)
      or not isinstance(width_multiplier, numbers.Integral) or width_multiplier < 1):
    raise ValueError(f"width_multiplier must be a positive int, got {width_multiplier!r}")
  return int(width_multiplier)


def _check_num_classes(num_classes: Any) -> int | None:
  if num_classes is None:
    return None
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
  return num_classes


def _check_compute_dtype(compute_dtype: Any) -> jnp.dtype:
  dtype = jnp.dtype(compute_dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"compute_dtype must be a floating dtype (float32 or bfloat16), got {dtype}")
  return dtype


def _check_remat(remat: Any) -> str:
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {remat!r}")
  return remat


def _check_images(images: jax.Array) -> None:
  shape = getattr(images, "shape", None)
  dtype = getattr(images, "dtype", None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f"images must be a rank-4 NHWC array [B, H, W, C], got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"images must be a floating NHWC array [B, H, W, C], got dtype {dtype}")
  if min(shape[1:]) < 1:
    raise ValueError(f"images must have non-empty H, W, C in [B, H, W, C], got {shape}")


@contextlib.contextmanager
def _mixed_precision(compute_dtype: jnp.dtype) -> Iterator[None]:
  """Stores float parameters in float32 but hands them out in the dtype a layer asks for.

  Haiku layers request parameters in their input's dtype, so a conv fed bfloat16 activations
  gets a bfloat16 view of its float32 weights, while BatchNorm (fed float32) gets float32.
  """
  if compute_dtype == jnp.float32:
    yield
    return

  def creator(next_creator, shape, dtype, init, context):
    del context
    if jnp.issubdtype(dtype, jnp.floating):
      dtype = jnp.float32
    return next_creator(shape, dtype, init)

  def getter(next_getter, value, context):
    if (jnp.issubdtype(value.dtype, jnp.floating)
        and value.dtype != jnp.dtype(context.original_dtype)):
      value = value.astype(context.original_dtype)
    return next_getter(value)

  with hk.custom_creator(creator), hk.custom_getter(getter):
    yield


def _batch_norm(bn: hk.BatchNorm, x: jax.Array, is_training: bool) -> jax.Array:
  """BatchNorm with float32 statistics; returns the input's dtype."""
  return bn(x.astype(jnp.float32), is_training=is_training).astype(x.dtype)


def _conv(channels: int, kernel: int, stride: int, name: str) -> hk.Conv2D:
  return hk.Conv2D(output_channels=channels, kernel_shape=kernel, stride=stride,
                   with_bias=False, padding="SAME", name=name)


class _BlockV1(hk.Module):
  """Post-activation residual block (Haiku ResNet v1 names), basic or bottleneck.

  ``channels`` is the block's output width; the bottleneck's inner width is ``channels // 4``.
  """

  def __init__(self, channels: int, stride: int, use_projection: bool, bottleneck: bool,
               bn_config: Mapping[str, Any], name: str):
    super().__init__(name=name)
    self._use_projection = use_projection
    if use_projection:
      self._proj_conv = _conv(channels, 1, stride, "shortcut_conv")
      self._proj_bn = hk.BatchNorm(name="shortcut_batchnorm", **bn_config)
    inner = channels // 4 if bottleneck else channels
    layers = [
        (_conv(inner, 1 if bottleneck else 3, 1 if bottleneck else stride, "conv_0"),
         hk.BatchNorm(name="batchnorm_0", **bn_config)),
        (_conv(inner, 3, stride if bottleneck else 1, "conv_1"),
         hk.BatchNorm(name="batchnorm_1", **bn_config)),
    ]
    if bottleneck:
      # Zero-initialised last scale: each block starts as the identity (as Haiku's ResNet).
      layers.append((_conv(channels, 1, 1, "conv_2"),
                     hk.BatchNorm(name="batchnorm_2", **{**bn_config, "scale_init": jnp.zeros})))
    self._layers = layers

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    shortcut = x
    if self._use_projection:
      shortcut = _batch_norm(self._proj_bn, self._proj_conv(x), is_training)
    out = x
    for i, (conv, bn) in enumerate(self._layers):
      out = _batch_norm(bn, conv(out), is_training)
      if i < len(self._layers) - 1:
        out = jax.nn.relu(out)
    return jax.nn.relu(out + shortcut)


class _BlockV2(hk.Module):
  """Pre-activation residual block (Haiku ResNet v2 names), basic or bottleneck."""

  def __init__(self, channels: int, stride: int, use_projection: bool, bottleneck: bool,
               bn_config: Mapping[str, Any], name: str):
    super().__init__(name=name)
    self._use_projection = use_projection
    if use_projection:
      self._proj_conv = _conv(channels, 1, stride, "shortcut_conv")
    inner = channels // 4 if bottleneck else channels
    layers = [
        (_conv(inner, 1 if bottleneck else 3, 1 if bottleneck else stride, "conv_0"),
         hk.BatchNorm(name="batchnorm_0", **bn_config)),
        (_conv(inner, 3, stride if bottleneck else 1, "conv_1"),
         hk.BatchNorm(name="batchnorm_1", **bn_config)),
    ]
    if bottleneck:
      layers.append((_conv(channels, 1, 1, "conv_2"),
                     hk.BatchNorm(name="batchnorm_2", **bn_config)))
    self._layers = layers

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    shortcut = x
    out = x
    for i, (conv, bn) in enumerate(self._layers):
      out = jax.nn.relu(_batch_norm(bn, out, is_training))
      if i == 0 and self._use_projection:
        # The projection sees the pre-activated input, as in Haiku's v2 block.
        shortcut = self._proj_conv(out)
      out = conv(out)
    return out + shortcut


class _SKBottleneckBlock(hk.Module):
  """SimCLRv2 bottleneck block with a selective-kernel 3x3 conv and a ResNet-D shortcut.

  The 3x3 conv yields ``2 * inner`` channels, split into two paths; their pooled sum goes
  through 1x1 conv (``max(inner * sk_ratio, 32)`` channels) -> BN -> ReLU -> 1x1 conv
  (``2 * inner``), a softmax over the two paths weights their sum.
  """

  def __init__(self, channels: int, stride: int, use_projection: bool, sk_ratio: float,
               bn_config: Mapping[str, Any], name: str):
    super().__init__(name=name)
    self._use_projection = use_projection
    self._stride = stride
    inner = channels // 4
    self._inner = inner
    if use_projection:
      # ResNet-D: downsample by average pooling so the 1x1 conv sees every input position.
      self._proj_conv = _conv(channels, 1, 1, "shortcut_conv")
      self._proj_bn = hk.BatchNorm(name="shortcut_batchnorm", **bn_config)
    self._conv_0 = _conv(inner, 1, 1, "conv_0")
    self._bn_0 = hk.BatchNorm(name="batchnorm_0", **bn_config)
    self._conv_1 = _conv(2 * inner, 3, stride, "conv_1")
    self._bn_1 = hk.BatchNorm(name="batchnorm_1", **bn_config)
    mid = max(int(inner * sk_ratio), _SK_MIN_DIM)
    self._attn_conv_0 = _conv(mid, 1, 1, "sk_attention_conv_0")
    self._attn_bn = hk.BatchNorm(name="sk_attention_batchnorm", **bn_config)
    self._attn_conv_1 = _conv(2 * inner, 1, 1, "sk_attention_conv_1")
    self._conv_2 = _conv(channels, 1, 1, "conv_2")
    self._bn_2 = hk.BatchNorm(name="batchnorm_2", **{**bn_config, "scale_init": jnp.zeros})

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    shortcut = x
    if self._use_projection:
      if self._stride > 1:
        shortcut = hk.avg_pool(shortcut, window_shape=(1, 2, 2, 1),
                               strides=(1, self._stride, self._stride, 1), padding="SAME")
      shortcut = _batch_norm(self._proj_bn, self._proj_conv(shortcut), is_training)

    out = jax.nn.relu(_batch_norm(self._bn_0, self._conv_0(x), is_training))
    paths = jax.nn.relu(_batch_norm(self._bn_1, self._conv_1(out), is_training))
    paths = jnp.stack(jnp.split(paths, 2, axis=-1))  # [2, B, H, W, inner]
    pooled = jnp.mean(jnp.sum(paths, axis=0), axis=(1, 2), keepdims=True)  # [B, 1, 1, inner]
    attn = jax.nn.relu(_batch_norm(self._attn_bn, self._attn_conv_0(pooled), is_training))
    mixing = jnp.stack(jnp.split(self._attn_conv_1(attn), 2, axis=-1))  # [2, B, 1, 1, inner]
    mixing = jax.nn.softmax(mixing.astype(jnp.float32), axis=0).astype(paths.dtype)
    out = jnp.sum(paths * mixing, axis=0)

    out = _batch_norm(self._bn_2, self._conv_2(out), is_training)
    return jax.nn.relu(out + shortcut)


class _BlockGroup(hk.Module):
  """A stack of blocks; the first carries the stride and (optionally) the projection."""

  def __init__(self, num_blocks: int, stride: int, use_projection: bool,
               make_block: Callable[..., hk.Module], name: str, remat_blocks: bool = False):
    super().__init__(name=name)
    self._remat_blocks = remat_blocks
    # Blocks are built here (in __init__) so their names read `block_group_i/~/block_b`.
    self._blocks = [
        make_block(stride=stride if b == 0 else 1, use_projection=use_projection and b == 0,
                   name=f"block_{b}")
        for b in range(num_blocks)
    ]

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    for block in self._blocks:
      if self._remat_blocks:
        x = hk.remat(lambda y, block=block: block(y, is_training))(x)
      else:
        x = block(x, is_training)
    return x


class _ResNet(hk.Module):
  """Shared ResNet / SK-ResNet torso (see the public subclasses)."""

  def __init__(self, *, blocks_per_group: Sequence[int], bottleneck: bool,
               channels_per_group: Sequence[int], use_projection: Sequence[bool],
               stem_channels: int, num_classes: int | None,
               bn_config: Mapping[str, Any] | None, resnet_v2: bool, width_multiplier: int,
               small_images: bool, compute_dtype: Any, sk_ratio: float, name: str | None,
               remat: str = "none"):
    super().__init__(name=name)
    wm = _check_width(width_multiplier)
    self._remat = _check_remat(remat)
    self._num_classes = _check_num_classes(num_classes)
    self._compute_dtype = _check_compute_dtype(compute_dtype)
    self._resnet_v2 = bool(resnet_v2)
    self._small_images = bool(small_images)
    self._sk = sk_ratio > 0
    bn_config = _merged_bn_config(bn_config)
    stem = stem_channels * wm
    channels = [c * wm for c in channels_per_group]
    self.embedding_size = channels[-1]

    if self._sk:
      # ResNet-D stem: three 3x3 convs (C/2, C/2, C), each followed by BN + ReLU.
      self._stem = [
          (_conv(width, 3, 1 if (i or small_images) else 2, f"initial_conv_{i}"),
           hk.BatchNorm(name=f"initial_batchnorm_{i}", **bn_config))
          for i, width in enumerate((stem // 2, stem // 2, stem))
      ]
    else:
      # Small inputs (28-32 px) keep their resolution: 3x3 stride-1 stem, no max-pool.
      self._initial_conv = _conv(stem, 3 if small_images else 7, 1 if small_images else 2,
                                 "initial_conv")
      if not self._resnet_v2:
        self._initial_bn = hk.BatchNorm(name="initial_batchnorm", **bn_config)

    def make_block(channels, **kwargs):
      if self._sk:
        return _SKBottleneckBlock(channels=channels, sk_ratio=sk_ratio, bn_config=bn_config,
                                  **kwargs)
      block_cls = _BlockV2 if self._resnet_v2 else _BlockV1
      return block_cls(channels=channels, bottleneck=bottleneck, bn_config=bn_config, **kwargs)

    self._groups = [
        _BlockGroup(num_blocks=n, stride=1 if i == 0 else 2, use_projection=proj,
                    make_block=functools.partial(make_block, c),
                    name=f"block_group_{i}", remat_blocks=self._remat == "block")
        for i, (n, c, proj) in enumerate(zip(blocks_per_group, channels, use_projection))
    ]
    if self._resnet_v2:
      self._final_bn = hk.BatchNorm(name="final_batchnorm", **bn_config)
    if self._num_classes is not None:
      # Zero-initialised weights, as Haiku's ResNet: training starts from uniform logits.
      self._logits = hk.Linear(self._num_classes, w_init=jnp.zeros, name="logits")

  def __call__(self, images: jax.Array, is_training: bool) -> jax.Array:
    """Embeds images.

    Args:
      images: float ``[B, H, W, C]`` (NHWC), any float dtype.
      is_training: True uses batch statistics in BatchNorm and updates the EMA state; False
        uses the EMA statistics and leaves the state unchanged.

    Returns:
      float32 ``[B, F]`` pooled embeddings (``F = self.embedding_size``), or float32
      ``[B, num_classes]`` logits when the module was built with ``num_classes``.
    """
    _check_images(images)
    with _mixed_precision(self._compute_dtype):
      out = images.astype(self._compute_dtype)
      if self._sk:
        for conv, bn in self._stem:
          out = jax.nn.relu(_batch_norm(bn, conv(out), is_training))
      else:
        out = self._initial_conv(out)
        if not self._resnet_v2:
          out = jax.nn.relu(_batch_norm(self._initial_bn, out, is_training))
      if not self._small_images:
        out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                          padding="SAME")
      for group in self._groups:
        if self._remat == "group":
          out = hk.remat(lambda x, group=group: group(x, is_training))(out)
        else:
          out = group(out, is_training)
      if self._resnet_v2:
        out = jax.nn.relu(_batch_norm(self._final_bn, out, is_training))
      pooled = jnp.mean(out.astype(jnp.float32), axis=(1, 2))
      if self._num_classes is None:
        return pooled
      return self._logits(pooled.astype(self._compute_dtype)).astype(jnp.float32)


class _StandardResNet(_ResNet):
  """ResNet of depth ``_DEPTH`` with the Haiku ResNet v1/v2 layout (see ``__init__``)."""

  _DEPTH = 50

  def __init__(self, num_classes: int | None = None,
               bn_config: Mapping[str, Any] | None = None, resnet_v2: bool = False,
               width_multiplier: int = 1, name: str | None = None, small_images: bool = False,
               compute_dtype: Any = jnp.float32, remat: str = "none"):
    """Builds the encoder.

    Called as ``module(images, is_training)``: ``images`` float ``[B, H, W, C]`` -> float32
    ``[B, F]`` pooled embeddings (F = 512*width_multiplier for ResNet18/34,
    2048*width_multiplier otherwise; also ``self.embedding_size``), or float32
    ``[B, num_classes]`` logits from an extra linear layer ``logits`` if ``num_classes`` is set.

    Args:
      num_classes: None for the embedding, else the number of logits.
      bn_config: overrides of ``DEFAULT_BN_CONFIG`` (``decay_rate``, ``eps``, ...).
      resnet_v2: pre-activation (v2) blocks instead of v1 (v2 adds ``final_batchnorm``, drops
        ``initial_batchnorm`` and the shortcut BatchNorms, as Haiku's ResNet v2).
      width_multiplier: positive int scaling every channel count, the stem included.
      name: module name; default is the snake-cased class name (``res_net50`` ...), which the
        released checkpoints use.
      small_images: 3x3 stride-1 first conv and no max-pool, for 28-32 px inputs.
      compute_dtype: dtype of conv/linear compute (float32 or bfloat16); parameters and
        BatchNorm statistics stay float32, outputs are float32.
      remat: one of ``REMAT_POLICIES``: ``'none'`` keeps every activation for the backward
        pass; ``'block'`` (``'group'``) keeps only each residual block's (block group's) input
        and recomputes the rest in the backward pass (``hk.remat``): less activation memory
        for about one more forward pass of compute. Outputs and gradients are unchanged.
    """
    blocks, bottleneck, chans, proj = _RESNET_CONFIGS[self._DEPTH]
    super().__init__(
        blocks_per_group=blocks, bottleneck=bottleneck, channels_per_group=chans,
        use_projection=proj, stem_channels=64, num_classes=num_classes, bn_config=bn_config,
        resnet_v2=resnet_v2, width_multiplier=width_multiplier, small_images=small_images,
        compute_dtype=compute_dtype, sk_ratio=0.0, name=name, remat=remat)


class ResNet18(_StandardResNet):
  """ResNet-18 (basic blocks, F = 512 * width_multiplier); arguments as ``_StandardResNet``."""
  _DEPTH = 18


class ResNet34(_StandardResNet):
  """ResNet-34 (basic blocks, F = 512 * width_multiplier); arguments as ``_StandardResNet``."""
  _DEPTH = 34


class ResNet50(_StandardResNet):
  """ResNet-50 (bottleneck, F = 2048 * width_multiplier); arguments as ``_StandardResNet``."""
  _DEPTH = 50


class ResNet101(_StandardResNet):
  """ResNet-101 (bottleneck, F = 2048 * width_multiplier); arguments as ``_StandardResNet``."""
  _DEPTH = 101


class ResNet152(_StandardResNet):
  """ResNet-152 (bottleneck, F = 2048 * width_multiplier); arguments as ``_StandardResNet``."""
  _DEPTH = 152


class ResNet200(_StandardResNet):
  """ResNet-200 (bottleneck, F = 2048 * width_multiplier); arguments as ``_StandardResNet``."""
  _DEPTH = 200


class _SKResNet(_ResNet):
  """Selective-kernel ResNet of depth ``_DEPTH`` (SimCLRv2 design, see ``__init__``)."""

  _DEPTH = 50

  def __init__(self, num_classes: int | None = None,
               bn_config: Mapping[str, Any] | None = None, width_multiplier: int = 1,
               name: str | None = None, small_images: bool = False,
               compute_dtype: Any = jnp.float32, sk_ratio: float = DEFAULT_SK_RATIO,
               remat: str = "none"):
    """Builds the encoder.

    Bottleneck blocks whose 3x3 conv is a selective-kernel conv, a ResNet-D stem (three 3x3
    convs ``initial_conv_{0,1,2}`` of C/2, C/2, C channels, C = 64*width_multiplier) and
    ResNet-D shortcuts (2x2 average pool, then 1x1 conv) in downsampling blocks. Called as
    ``module(images, is_training)``: ``images`` float ``[B, H, W, C]`` -> float32
    ``[B, 2048*width_multiplier]`` (or ``[B, num_classes]`` logits).

    Args:
      num_classes: None for the embedding, else the number of logits.
      bn_config: overrides of ``DEFAULT_BN_CONFIG``.
      width_multiplier: positive int scaling every channel count, the stem included.
      name: module name; default ``sk_res_net50`` etc.
      small_images: first stem conv at stride 1 and no max-pool, for 28-32 px inputs.
      compute_dtype: conv/linear compute dtype (float32 or bfloat16); params stay float32.
      sk_ratio: attention bottleneck ratio; the attention width is
        ``max(int(inner_channels * sk_ratio), 32)``.
      remat: one of ``REMAT_POLICIES`` (see ``_StandardResNet``).
    """
    if isinstance(sk_ratio, bool) or not isinstance(sk_ratio, (int, float)) or sk_ratio <= 0:
      raise ValueError(f"sk_ratio must be a float > 0, got {sk_ratio!r}")
    blocks, _, chans, proj = _RESNET_CONFIGS[self._DEPTH]
    super().__init__(
        blocks_per_group=blocks, bottleneck=True, channels_per_group=chans,
        use_projection=proj, stem_channels=64, num_classes=num_classes, bn_config=bn_config,
        resnet_v2=False, width_multiplier=width_multiplier, small_images=small_images,
        compute_dtype=compute_dtype, sk_ratio=float(sk_ratio), name=name, remat=remat)


class SKResNet50(_SKResNet):
  """SK-ResNet-50 (default name ``sk_res_net50``); arguments as ``_SKResNet``."""
  _DEPTH = 50


class SKResNet101(_SKResNet):
  """SK-ResNet-101 (default name ``sk_res_net101``); arguments as ``_SKResNet``."""
  _DEPTH = 101


class SKResNet152(_SKResNet):
  """SK-ResNet-152 (default name ``sk_res_net152``); arguments as ``_SKResNet``."""
  _DEPTH = 152


class TinyResNet(_ResNet):
  """Tiny ResNet for tests and CPU runs: 16-channel stem, two groups of one basic block.

  Group widths 16 and 32 (times ``width_multiplier``), so F = 32 * width_multiplier.
  Arguments and calling convention as ``_StandardResNet`` (default name ``tiny_res_net``).
  """

  def __init__(self, num_classes: int | None = None,
               bn_config: Mapping[str, Any] | None = None, resnet_v2: bool = False,
               width_multiplier: int = 1, name: str | None = None, small_images: bool = False,
               compute_dtype: Any = jnp.float32, remat: str = "none"):
    blocks, bottleneck, chans, proj = _TINY_CONFIG
    super().__init__(
        blocks_per_group=blocks, bottleneck=bottleneck, channels_per_group=chans,
        use_projection=proj, stem_channels=_TINY_STEM_CHANNELS, num_classes=num_classes,
        bn_config=bn_config, resnet_v2=resnet_v2, width_multiplier=width_multiplier,
        small_images=small_images, compute_dtype=compute_dtype, sk_ratio=0.0, name=name,
        remat=remat)


class MLP(hk.Module):
  """Projector / predictor head: Linear(+bias) -> BatchNorm -> ReLU -> Linear(no bias).

  Called as ``mlp(x, is_training)``: ``x`` float ``[B, D_in]`` -> ``[B, output_size]`` in
  ``x``'s dtype. Submodule names follow the release (BYOL): ``<name>/linear``,
  ``<name>/batch_norm``, ``<name>/linear_1``.

  Args:
    hidden_size: width of the hidden layer.
    output_size: width of the output.
    bn_config: overrides of ``DEFAULT_BN_CONFIG``.
    name: module name (default ``mlp``).
  """

  def __init__(self, hidden_size: int, output_size: int,
               bn_config: Mapping[str, Any] | None = None, name: str | None = None):
    super().__init__(name=name)
    for arg, value in (("hidden_size", hidden_size), ("output_size", output_size)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    self._hidden_size = hidden_size
    self._output_size = output_size
    self._bn_config = _merged_bn_config(bn_config)

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    """``x`` float ``[B, D_in]`` -> ``[B, output_size]``."""
    if getattr(x, "ndim", None) != 2:
      raise ValueError(f"x must have shape [B, D], got shape {getattr(x, 'shape', None)}")
    # Layers are built in __call__ so names match the release (`mlp/linear`, no `~`).
    out = hk.Linear(self._hidden_size, with_bias=True)(x)
    out = hk.BatchNorm(**self._bn_config)(out, is_training=is_training)
    out = jax.nn.relu(out)
    return hk.Linear(self._output_size, with_bias=False)(out)


class LinearClassifier(hk.Linear):
  """Linear classifier: ``clf(x)`` with ``x`` float ``[B, F]`` -> logits ``[B, num_classes]``.

  A plain ``hk.Linear`` (params ``<name>/w [F, C]``, ``<name>/b [C]``), so
  ``LinearClassifier(C, name='linear')`` has the release eval classifier's parameter tree.

  Args:
    num_classes: number of logits C.
    name: module name (default ``linear_classifier``).
  """

  def __init__(self, num_classes: int, name: str | None = None):
    _check_num_classes(num_classes)
    if num_classes is None:
      raise ValueError("num_classes must be a positive int, got None")
    super().__init__(output_size=num_classes, with_bias=True, name=name)

  def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
    """``x`` float ``[B, F]`` -> ``[B, num_classes]`` in ``x``'s dtype."""
    if getattr(x, "ndim", None) != 2:
      raise ValueError(f"x must have shape [B, F], got shape {getattr(x, 'shape', None)}")
    return super().__call__(x, **kwargs)


_ENCODERS: Mapping[str, tuple[type, int]] = types.MappingProxyType({
    "tiny_resnet": (TinyResNet, _TINY_CONFIG[2][-1]),
    "resnet18": (ResNet18, 512),
    "resnet34": (ResNet34, 512),
    "resnet50": (ResNet50, 2048),
    "resnet101": (ResNet101, 2048),
    "resnet152": (ResNet152, 2048),
    "resnet200": (ResNet200, 2048),
    "sk_resnet50": (SKResNet50, 2048),
    "sk_resnet101": (SKResNet101, 2048),
    "sk_resnet152": (SKResNet152, 2048),
})
ENCODER_NAMES: tuple[str, ...] = tuple(_ENCODERS)


def _lookup(name: str) -> tuple[type, int]:
  if name not in _ENCODERS:
    raise ValueError(f"encoder name must be one of {list(ENCODER_NAMES)}, got {name!r}")
  return _ENCODERS[name]


def make_encoder(name: str, *, width_multiplier: int = 1, small_images: bool = False,
                 compute_dtype: Any = jnp.float32,
                 bn_config: Mapping[str, Any] | None = None, remat: str = "none") -> _ResNet:
  """Builds an encoder by name (one of ``ENCODER_NAMES``); call inside a Haiku transform.

  The module keeps its default Haiku name (e.g. ``res_net50``), so parameters match the
  release. It is called as ``encoder(images [B, H, W, C] float, is_training)`` and returns
  float32 ``[B, embedding_size(name, width_multiplier)]``. ``remat`` (one of
  ``REMAT_POLICIES``) trades recomputation for activation memory (``_StandardResNet``).

  Raises:
    ValueError: unknown ``name`` (the message lists the allowed names) or bad arguments.
  """
  cls, _ = _lookup(name)
  return cls(bn_config=bn_config, width_multiplier=width_multiplier,
             small_images=small_images, compute_dtype=compute_dtype, remat=remat)


def embedding_size(name: str, width_multiplier: int = 1) -> int:
  """Width F of the pooled embedding ``[B, F]`` of encoder ``name``, without building it."""
  _, base = _lookup(name)
  return base * _check_width(width_multiplier)
