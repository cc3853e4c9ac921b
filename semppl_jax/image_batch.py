"""Checks and per-image randomness shared by :mod:`semppl_jax.augmentations` and
:mod:`semppl_jax.photometric`.

:func:`prepare_images` validates a batch of NHWC float images (1 or 3 channels) and returns it
as float32 with 3 channels; the ``check_*`` functions validate Python-valued arguments
(probabilities, strengths, ranges, sizes) and raise ``ValueError`` naming the argument;
:func:`per_image` maps a one-image function over a batch, giving image ``b`` its own vector of
uniforms drawn from ``jax.random.split(key, B)[b]``.
"""
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

_EXPECTED_IMAGES = "a floating array of shape [B, H, W, 1 or 3] (NHWC)"


def prepare_images(images, name: str = "images") -> jax.Array:
  """Validates NHWC float images with 1 or 3 channels; returns float32 [B, H, W, 3]."""
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(
        f"{name} must be {_EXPECTED_IMAGES}; got rank {images.ndim} with shape {images.shape}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"{name} must be {_EXPECTED_IMAGES} with a float dtype; got dtype {images.dtype}.")
  channels = images.shape[-1]
  if channels not in (1, 3):
    raise ValueError(
        f"{name} must be {_EXPECTED_IMAGES}; got {channels} channels (shape {images.shape}).")
  if images.shape[1] < 1 or images.shape[2] < 1:
    raise ValueError(f"{name} must have H, W >= 1; got shape {images.shape}.")
  images = images.astype(jnp.float32)
  if channels == 1:
    images = jnp.broadcast_to(images, images.shape[:3] + (3,))
  return images


def check_probability(value, name: str) -> float:
  """``value`` as a Python float in [0, 1]; ``ValueError`` naming ``name`` otherwise."""
  try:
    value = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a Python float in [0, 1]; got {value!r}.") from e
  if not 0.0 <= value <= 1.0:  # Also rejects NaN.
    raise ValueError(f"{name} must be in [0, 1]; got {value}.")
  return value


def check_nonnegative(value, name: str, upper: float = math.inf) -> float:
  """``value`` as a Python float in [0, upper]; ``ValueError`` naming ``name`` otherwise."""
  try:
    value = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a Python float >= 0; got {value!r}.") from e
  if not 0.0 <= value <= upper:  # Also rejects NaN.
    bound = f"[0, {upper}]" if upper != math.inf else ">= 0"
    raise ValueError(f"{name} must be {bound}; got {value}.")
  return value


def check_range(value, name: str) -> Tuple[float, float]:
  """A (low, high) pair of Python floats with 0 < low <= high < inf."""
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a pair (low, high) of floats; got {value!r}.") from e
  if not 0.0 < low <= high < math.inf:
    raise ValueError(f"{name} must satisfy 0 < low <= high; got {value!r}.")
  return low, high


def check_size(value, name: str) -> int:
  """``value`` as an int >= 1 (not a bool); ``ValueError`` naming ``name`` otherwise."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")
  return int(value)


def image_uniforms(key: jax.Array, batch: int, num_uniforms: int) -> jax.Array:
  """float32 [batch, num_uniforms] in [0, 1): row b is drawn from ``jax.random.split(key)[b]``."""
  keys = jax.random.split(key, batch)
  return jax.vmap(lambda k: jax.random.uniform(k, (num_uniforms,)))(keys)


def per_image(fn, images: jax.Array, key: jax.Array, num_uniforms: int) -> jax.Array:
  """Maps ``fn(image [H, W, 3], u float32 [num_uniforms])`` over the batch.

  Image ``b`` gets ``u = image_uniforms(key, B, num_uniforms)[b]``.
  """
  return jax.vmap(fn)(images, image_uniforms(key, images.shape[0], num_uniforms))


def between(u, low, high):
  """Maps u in [0, 1) to [low, high)."""
  return low + (high - low) * u
