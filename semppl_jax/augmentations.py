"""View generation (crops, flip, the per-view photometric chain): pure JAX functions of
``(images, key)``.

Every public function takes a batch of images ``float [B, H, W, C]`` (NHWC, values in [0, 1],
``C`` in {1, 3}) and a PRNG key, and returns ``float32 [B, H', W', 3]``:

* a single-channel input (``C = 1``) is broadcast to 3 equal channels by *every* public
  function, so the output always has 3 channels;
* each image of the batch draws its own randomness: the key is split into one key per image,
  and each image's key gives one vector of uniforms that feeds all of that image's decisions
  (one random draw per op keeps the compiled program small);
* outputs are clipped to [0, 1] (colour jitter clips after each of its operations, as BYOL);
* all functions are jit-able; keyword arguments (sizes, ranges, probabilities, presets) are
  Python values, i.e. static under ``jax.jit``;
* the same key gives the same output.

This module holds the geometry (``random_resized_crop``, ``random_flip``), ``normalize``, the
view presets and the view chains. The photometric operations (``color_jitter``,
``random_grayscale``, ``gaussian_blur``, ``solarize``, ``default_blur_kernel_size``: BYOL's,
i.e. ``tf.image``'s, computed with ``dm_pix``) live in :mod:`semppl_jax.photometric` and are
re-exported here, so ``augmentations.color_jitter`` etc. keep working.

The chain for one view (docs/design.md §2) is ``random_resized_crop`` followed by
``augment_view`` = flip → colour jitter → grayscale → blur → solarize, with the two BYOL
presets ``BYOL_VIEW_1`` / ``BYOL_VIEW_2``. ``photometric_views`` runs that chain on views that
are already cropped (e.g. by a host input pipeline); ``multi_crop`` crops all large and small
views and hands them to it. Per-image Bernoulli decisions use ``uniform < probability``, so
probability 0 is exactly the identity and probability 1 always applies.
"""
import dataclasses
import functools
import math
from typing import Sequence, Tuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from semppl_jax import image_batch
from semppl_jax import photometric
# The photometric operations, re-exported so that ``augmentations.X`` keeps working.
from semppl_jax.photometric import color_jitter as color_jitter
from semppl_jax.photometric import default_blur_kernel_size as default_blur_kernel_size
from semppl_jax.photometric import gaussian_blur as gaussian_blur
from semppl_jax.photometric import random_grayscale as random_grayscale
from semppl_jax.photometric import solarize as solarize

# Per-channel RGB statistics of ImageNet, for ``normalize``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Candidate boxes tried per image before falling back to the central crop (as torchvision).
_CROP_ATTEMPTS = 10

_EXPECTED_VIEWS = "a uint8 or floating array of shape [V, B, H, W, 1 or 3]"


# ---------------------------------------------------------------------------------------------
# Validation of pre-cropped views (images: image_batch.prepare_images).
# ---------------------------------------------------------------------------------------------


def _prepare_views(views) -> jax.Array:
  """Validates [V, B, H, W, 1 or 3] uint8 or float views; returns float32 [V, B, H, W, 3].

  uint8 values are divided by 255; float values are taken to be in [0, 1] already.
  """
  views = jnp.asarray(views)
  if views.ndim != 5:
    raise ValueError(
        f"views must be {_EXPECTED_VIEWS}; got rank {views.ndim} with shape {views.shape}.")
  if views.dtype == jnp.uint8:
    views = views.astype(jnp.float32) / 255.0
  elif not jnp.issubdtype(views.dtype, jnp.floating):
    raise ValueError(f"views must be {_EXPECTED_VIEWS}; got dtype {views.dtype}.")
  if views.shape[-1] not in (1, 3):
    raise ValueError(
        f"views must be {_EXPECTED_VIEWS}; got {views.shape[-1]} channels "
        f"(shape {views.shape}).")
  if views.shape[2] < 1 or views.shape[3] < 1:
    raise ValueError(f"views must have H, W >= 1; got shape {views.shape}.")
  views = views.astype(jnp.float32)
  return jnp.broadcast_to(views, views.shape[:4] + (3,))


# ---------------------------------------------------------------------------------------------
# Geometry: random resized crop and flip.
# ---------------------------------------------------------------------------------------------


def _fallback_box(height: int, width: int, ratio: Tuple[float, float]) -> Tuple[int, int]:
  """(h, w) of the central crop used when no sampled box fits (torchvision's fallback)."""
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w = width
    h = min(height, max(1, int(round(w / ratio[0]))))
  elif in_ratio > ratio[1]:
    h = height
    w = min(width, max(1, int(round(h * ratio[1]))))
  else:
    h, w = height, width
  return h, w


def random_resized_crop(images, key, *, output_size: int, scale=(0.08, 1.0),
                        ratio=(3.0 / 4.0, 4.0 / 3.0),
                        precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Crops a random box of each image and resizes it (bilinear) to a square.

  Per image, up to 10 candidate boxes are drawn: area fraction ``~ U(scale)`` of ``H * W`` and
  aspect ratio ``w / h`` log-uniform in ``ratio``; ``h`` and ``w`` are rounded to whole pixels.
  The first candidate that fits in the image is used, at a uniformly random integer offset;
  if none fits, the central crop of the whole image clamped to ``ratio`` is used. The box is
  resized to ``output_size x output_size`` with ``jax.image.scale_and_translate`` (bilinear,
  antialiased when shrinking).

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    output_size: side of the square output (static int >= 1).
    scale: (low, high) range of the box area as a fraction of the image area, 0 < low <= high.
    ratio: (low, high) range of the aspect ratio width / height, 0 < low <= high.
    precision: the resize's ``jax.lax.Precision`` (``jax.image.scale_and_translate``).

  Returns:
    float32 [B, output_size, output_size, 3] in [0, 1].
  """
  images = image_batch.prepare_images(images)
  output_size = image_batch.check_size(output_size, "output_size")
  scale = image_batch.check_range(scale, "scale")
  ratio = image_batch.check_range(ratio, "ratio")
  _, height, width, channels = images.shape
  fallback_h, fallback_w = _fallback_box(height, width, ratio)
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

  def crop_one(image, u):
    area_u, ratio_u = u[:_CROP_ATTEMPTS], u[_CROP_ATTEMPTS:2 * _CROP_ATTEMPTS]
    top_u, left_u = u[2 * _CROP_ATTEMPTS], u[2 * _CROP_ATTEMPTS + 1]
    area = image_batch.between(area_u, scale[0], scale[1]) * (height * width)
    aspect = jnp.exp(image_batch.between(ratio_u, log_ratio[0], log_ratio[1]))
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    valid = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
    first = jnp.argmax(valid)  # Index of the first valid candidate (0 if none).
    any_valid = jnp.any(valid)
    h = jnp.where(any_valid, h[first], fallback_h)
    w = jnp.where(any_valid, w[first], fallback_w)
    # Uniform integer offsets; the fallback is centred.
    top = jnp.floor(top_u * (height - h + 1).astype(jnp.float32))
    left = jnp.floor(left_u * (width - w + 1).astype(jnp.float32))
    top = jnp.where(any_valid, jnp.minimum(top, height - h), (height - fallback_h) // 2)
    left = jnp.where(any_valid, jnp.minimum(left, width - w), (width - fallback_w) // 2)
    # Output coordinate = scale * (input coordinate - box origin), pixel centres at +0.5.
    box_scale = jnp.stack([output_size / h.astype(jnp.float32),
                           output_size / w.astype(jnp.float32)])
    translation = -jnp.stack([top.astype(jnp.float32), left.astype(jnp.float32)]) * box_scale
    return jax.image.scale_and_translate(
        image, (output_size, output_size, channels), spatial_dims=(0, 1), scale=box_scale,
        translation=translation, method="linear", antialias=True, precision=precision)

  return jnp.clip(image_batch.per_image(crop_one, images, key, 2 * _CROP_ATTEMPTS + 2), 0.0, 1.0)


def random_flip(images, key, *, probability: float = 0.5) -> jax.Array:
  """Flips each image left-right with the given probability.

  Args:
    images: float [B, H, W, C], C in {1, 3}; C = 1 is broadcast to 3.
    key: a PRNG key.
    probability: chance that an image is flipped, in [0, 1].

  Returns:
    float32 [B, H, W, 3].
  """
  images = image_batch.prepare_images(images)
  return _flip(images, key, image_batch.check_probability(probability, "probability"))


def _flip(images, key, probability):
  # Probabilities and strengths of the private batch functions may be traced (photometric_views
  # vmaps them over views); the public wrappers validate Python values first.
  def flip_one(image, u):
    # u in [0, 1): probability 0 never fires, probability 1 always does.
    return jnp.where(u[0] < probability, pix.flip_left_right(image), image)

  return image_batch.per_image(flip_one, images, key, 1)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """Per-channel standardisation ``(x - mean) / std``.

  Args:
    images: float [B, H, W, C], C in {1, 3}; C = 1 is broadcast to 3.
    mean: 3 per-channel means (RGB).
    std: 3 per-channel standard deviations, all > 0.

  Returns:
    float32 [B, H, W, 3].
  """
  images = image_batch.prepare_images(images)
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.shape != (3,):
    raise ValueError(f"mean must hold 3 per-channel values; got shape {mean.shape}.")
  if std.shape != (3,) or not np.all(std > 0):
    raise ValueError(f"std must hold 3 positive per-channel values; got {std.tolist()}.")
  return (images - mean) / std


# ---------------------------------------------------------------------------------------------
# Presets and views.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViewPreset:
  """Probabilities and strengths of the photometric chain of one view (hashable, static)."""
  blur_probability: float
  solarize_probability: float
  flip_probability: float = 0.5
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  color_jitter_probability: float = 0.8
  grayscale_probability: float = 0.2
  blur_sigma_range: Tuple[float, float] = (0.1, 2.0)
  solarize_threshold: float = 0.5

  def __post_init__(self):
    for name in ("blur_probability", "solarize_probability", "flip_probability",
                 "color_jitter_probability", "grayscale_probability"):
      image_batch.check_probability(getattr(self, name), name)
    for name in ("brightness", "contrast", "saturation"):
      image_batch.check_nonnegative(getattr(self, name), name)
    image_batch.check_nonnegative(self.hue, "hue", upper=0.5)
    image_batch.check_range(self.blur_sigma_range, "blur_sigma_range")


# The two asymmetric BYOL views: always blurred / sometimes solarized.
BYOL_VIEW_1 = ViewPreset(blur_probability=1.0, solarize_probability=0.0)
BYOL_VIEW_2 = ViewPreset(blur_probability=0.1, solarize_probability=0.2)


def augment_view(images, key, *, preset: ViewPreset) -> jax.Array:
  """The photometric chain of one view: flip → colour jitter → grayscale → blur → solarize.

  Each step uses its own key from ``jax.random.split(key, 5)`` (in that order).

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    preset: a ``ViewPreset``, e.g. ``BYOL_VIEW_1`` or ``BYOL_VIEW_2``.

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  images = image_batch.prepare_images(images)
  if not isinstance(preset, ViewPreset):
    raise ValueError(f"preset must be a ViewPreset; got {type(preset).__name__}.")
  return _augment(images, key, _preset_params(preset))


# ViewPreset fields that become (possibly per-view, traced) scalars in _augment.
_PRESET_FIELDS = ("flip_probability", "brightness", "contrast", "saturation", "hue",
                  "color_jitter_probability", "grayscale_probability", "blur_probability",
                  "solarize_probability", "solarize_threshold")


def _preset_params(preset: ViewPreset) -> dict:
  params = {name: getattr(preset, name) for name in _PRESET_FIELDS}
  params["sigma_low"], params["sigma_high"] = preset.blur_sigma_range
  return params


def _augment(images, key, params, precision=jax.lax.Precision.HIGHEST):
  """augment_view on validated images with parameters that may be traced scalars."""
  flip_key, jitter_key, gray_key, blur_key, solarize_key = jax.random.split(key, 5)
  images = _flip(images, flip_key, params["flip_probability"])
  images = photometric.color_jitter_unchecked(
      images, jitter_key, params["brightness"], params["contrast"], params["saturation"],
      params["hue"], params["color_jitter_probability"])
  images = photometric.grayscale_unchecked(images, gray_key, params["grayscale_probability"])
  images = photometric.blur_unchecked(
      images, blur_key, params["blur_probability"], params["sigma_low"], params["sigma_high"],
      photometric.default_blur_kernel_size(*images.shape[1:3]), precision)
  return photometric.solarize_unchecked(images, solarize_key, params["solarize_probability"],
                                        params["solarize_threshold"])


def _check_presets(presets) -> Tuple[ViewPreset, ...]:
  presets = tuple(presets)
  if not presets or not all(isinstance(p, ViewPreset) for p in presets):
    raise ValueError("presets must be a non-empty sequence of ViewPreset.")
  return presets


def _photometric(views: jax.Array, key: jax.Array, presets: Tuple[ViewPreset, ...],
                 precision=jax.lax.Precision.HIGHEST):
  """photometric_views on validated float32 [V, B, H, W, 3] views."""
  num_views = views.shape[0]
  if num_views == 0:
    return views
  view_keys = jnp.stack([jax.random.fold_in(key, v) for v in range(num_views)])
  # The presets become per-view parameter arrays, so all views share one compiled chain.
  per_view = [_preset_params(presets[v % len(presets)]) for v in range(num_views)]
  params = {name: jnp.asarray([p[name] for p in per_view], jnp.float32) for name in per_view[0]}
  return jax.vmap(functools.partial(_augment, precision=precision))(
      views, view_keys, params)


def photometric_views(views, key, *, presets: Sequence[ViewPreset] = (BYOL_VIEW_1, BYOL_VIEW_2),
                      precision=jax.lax.Precision.HIGHEST):
  """The photometric chain of ``augment_view`` on views that are already cropped.

  For inputs whose crops come from elsewhere (e.g. a host pipeline that decodes and crops
  ImageNet): view ``v`` is ``augment_view(views[v], jax.random.fold_in(key, v),
  preset=presets[v % P])``, i.e. flip → colour jitter → grayscale → blur → solarize with the
  presets alternating over the views (default: ``BYOL_VIEW_1`` for even ``v``, ``BYOL_VIEW_2``
  for odd). All views run as one computation vmapped over ``V``.

  Args:
    views: uint8 [V, B, H, W, C] (0..255, divided by 255) or float [V, B, H, W, C] in [0, 1];
      C in {1, 3}, C = 1 is broadcast to 3. V may be 0.
    key: a PRNG key.
    presets: non-empty sequence of ``ViewPreset`` cycled over the views.
    precision: the pixel matmuls' ``jax.lax.Precision`` (crop resize, blur): HIGHEST keeps
      float32 pixels exact on accelerators; a bfloat16 network can take DEFAULT.

  Returns:
    float32 [V, B, H, W, 3] in [0, 1].
  """
  return _photometric(_prepare_views(views), key, _check_presets(presets), precision)


def multi_crop(images, key, *, num_large: int, num_small: int, large_size: int,
               small_size: int, large_scale=(0.08, 1.0), small_scale=(0.08, 1.0),
               ratio=(3.0 / 4.0, 4.0 / 3.0),
               presets: Sequence[ViewPreset] = (BYOL_VIEW_1, BYOL_VIEW_2),
               precision=jax.lax.Precision.HIGHEST):
  """All views of a batch: ``num_large`` large and ``num_small`` small augmented crops.

  With ``crop_key, photo_key = jax.random.split(key)``: view ``v`` (large views
  ``v = 0..L-1``, then small views ``v = L..L+S-1``) is cropped by ``random_resized_crop``
  with the key ``jax.random.fold_in(crop_key, v)``; then each group goes through
  ``photometric_views`` (large views with ``jax.random.fold_in(photo_key, 0)``, small views with
  ``jax.random.fold_in(photo_key, 1)``). So within each group the presets alternate: large view
  ``i`` and small view ``j`` use ``presets[i % P]`` and ``presets[j % P]`` (default:
  ``BYOL_VIEW_1`` for even, ``BYOL_VIEW_2`` for odd). Both groups crop with aspect ratio in
  ``ratio``; the default area range is docs/design.md's 0.08–1 for both (pass e.g.
  ``small_scale=(0.05, 0.14)`` for SwAV-style small crops).

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    num_large: L >= 1.
    num_small: S >= 0.
    large_size: output side of the large views.
    small_size: output side of the small views.
    large_scale: area range of the large crops (fraction of the image).
    small_scale: area range of the small crops.
    ratio: aspect-ratio range (width / height) of all crops.
    presets: non-empty sequence of ``ViewPreset`` cycled over the views of each group.
    precision: the pixel matmuls' ``jax.lax.Precision`` (crop resize, blur): HIGHEST keeps
      float32 pixels exact on accelerators; a bfloat16 network can take DEFAULT.

  Returns:
    ``(large float32 [L, B, large_size, large_size, 3],
    small float32 [S, B, small_size, small_size, 3])``, values in [0, 1].
  """
  images = image_batch.prepare_images(images)
  if isinstance(num_large, bool) or not isinstance(num_large, (int, np.integer)) or num_large < 1:
    raise ValueError(f"num_large must be an int >= 1; got {num_large!r}.")
  if isinstance(num_small, bool) or not isinstance(num_small, (int, np.integer)) or num_small < 0:
    raise ValueError(f"num_small must be an int >= 0; got {num_small!r}.")
  large_size = image_batch.check_size(large_size, "large_size")
  small_size = image_batch.check_size(small_size, "small_size")
  large_scale = image_batch.check_range(large_scale, "large_scale")
  small_scale = image_batch.check_range(small_scale, "small_scale")
  ratio = image_batch.check_range(ratio, "ratio")
  presets = _check_presets(presets)
  crop_key, photo_key = jax.random.split(key)

  def crops(first_view, count, size, scale):
    """[count, B, size, size, 3]: views first_view.., cropped as one vmapped computation."""
    if count == 0:
      return jnp.zeros((0, images.shape[0], size, size, 3), jnp.float32)
    keys = jnp.stack([jax.random.fold_in(crop_key, first_view + i) for i in range(count)])
    return jax.vmap(lambda k: random_resized_crop(
        images, k, output_size=size, scale=scale, ratio=ratio, precision=precision))(keys)

  large = crops(0, int(num_large), large_size, large_scale)
  small = crops(int(num_large), int(num_small), small_size, small_scale)
  return (_photometric(large, jax.random.fold_in(photo_key, 0), presets, precision),
          _photometric(small, jax.random.fold_in(photo_key, 1), presets, precision))
