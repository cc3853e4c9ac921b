"""View generation and photometric augmentations: pure JAX functions of ``(images, key)``.

Every public function takes a batch of images ``float [B, H, W, C]`` (NHWC, values in [0, 1],
``C`` in {1, 3}) and a PRNG key, and returns ``float32 [B, H', W', 3]``:

* a single-channel input (``C = 1``) is broadcast to 3 equal channels by *every* public
  function, so the output always has 3 channels;
* each image of the batch draws its own randomness: the key is split into one key per image,
  and each image's key gives one vector of uniforms that feeds all of that image's decisions
  (one random draw per op keeps the compiled program small);
* outputs are clipped to [0, 1] (interpolation and blurring are convex combinations, the clip
  only removes rounding error; colour jitter clips after each of its operations as in BYOL);
* all functions are jit-able; keyword arguments (sizes, ranges, probabilities, presets) are
  Python values, i.e. static under ``jax.jit``;
* the same key gives the same output.

The chain for one view (DESIGN.md §2) is ``random_resized_crop`` followed by
``augment_view`` = flip → colour jitter → grayscale → blur → solarize, with the two BYOL
presets ``BYOL_VIEW_1`` / ``BYOL_VIEW_2``; ``multi_crop`` builds all large and small views.
Per-image Bernoulli decisions use ``uniform < probability``, so probability 0 is exactly the
identity and probability 1 always applies.
"""
import dataclasses
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Per-channel RGB statistics of ImageNet, for ``normalize``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ITU-R 601 luma weights (as torchvision's rgb_to_grayscale).
_LUMA_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Candidate boxes tried per image before falling back to the central crop (as torchvision).
_CROP_ATTEMPTS = 10

_EXPECTED_IMAGES = "a floating array of shape [B, H, W, 1 or 3] (NHWC)"


# ---------------------------------------------------------------------------------------------
# Validation helpers.
# ---------------------------------------------------------------------------------------------


def _prepare_images(images, name: str = "images") -> jax.Array:
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


def _check_probability(value, name: str) -> float:
  try:
    value = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a Python float in [0, 1]; got {value!r}.") from e
  if not 0.0 <= value <= 1.0:  # Also rejects NaN.
    raise ValueError(f"{name} must be in [0, 1]; got {value}.")
  return value


def _check_nonnegative(value, name: str, upper: float = math.inf) -> float:
  try:
    value = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a Python float >= 0; got {value!r}.") from e
  if not 0.0 <= value <= upper:  # Also rejects NaN.
    bound = f"[0, {upper}]" if upper != math.inf else ">= 0"
    raise ValueError(f"{name} must be {bound}; got {value}.")
  return value


def _check_range(value, name: str) -> Tuple[float, float]:
  """A (low, high) pair of Python floats with 0 < low <= high < inf."""
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be a pair (low, high) of floats; got {value!r}.") from e
  if not 0.0 < low <= high < math.inf:
    raise ValueError(f"{name} must satisfy 0 < low <= high; got {value!r}.")
  return low, high


def _check_size(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")
  return int(value)


def _per_image(fn, images: jax.Array, key: jax.Array, num_uniforms: int) -> jax.Array:
  """Maps ``fn(image [H, W, 3], u float32 [num_uniforms])`` over the batch.

  Each image gets its own key from ``jax.random.split(key, B)`` and ``u = U[0, 1)`` drawn from
  it.
  """
  keys = jax.random.split(key, images.shape[0])
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (num_uniforms,)))(keys)
  return jax.vmap(fn)(images, uniforms)


def _between(u, low, high):
  """Maps u in [0, 1) to [low, high)."""
  return low + (high - low) * u


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
                        ratio=(3.0 / 4.0, 4.0 / 3.0)) -> jax.Array:
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

  Returns:
    float32 [B, output_size, output_size, 3] in [0, 1].
  """
  images = _prepare_images(images)
  output_size = _check_size(output_size, "output_size")
  scale = _check_range(scale, "scale")
  ratio = _check_range(ratio, "ratio")
  _, height, width, channels = images.shape
  fallback_h, fallback_w = _fallback_box(height, width, ratio)
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

  def crop_one(image, u):
    area_u, ratio_u = u[:_CROP_ATTEMPTS], u[_CROP_ATTEMPTS:2 * _CROP_ATTEMPTS]
    top_u, left_u = u[2 * _CROP_ATTEMPTS], u[2 * _CROP_ATTEMPTS + 1]
    area = _between(area_u, scale[0], scale[1]) * (height * width)
    aspect = jnp.exp(_between(ratio_u, log_ratio[0], log_ratio[1]))
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
        translation=translation, method="linear", antialias=True)

  return jnp.clip(_per_image(crop_one, images, key, 2 * _CROP_ATTEMPTS + 2), 0.0, 1.0)


def random_flip(images, key, *, probability: float = 0.5) -> jax.Array:
  """Flips each image left-right with the given probability.

  Args:
    images: float [B, H, W, C], C in {1, 3}; C = 1 is broadcast to 3.
    key: a PRNG key.
    probability: chance that an image is flipped, in [0, 1].

  Returns:
    float32 [B, H, W, 3].
  """
  images = _prepare_images(images)
  return _flip(images, key, _check_probability(probability, "probability"))


def _flip(images, key, probability):
  # Probabilities and strengths of the private batch functions may be traced (multi_crop
  # vmaps them over views); the public wrappers validate Python values first.
  def flip_one(image, u):
    # u in [0, 1): probability 0 never fires, probability 1 always does.
    return jnp.where(u[0] < probability, image[:, ::-1], image)

  return _per_image(flip_one, images, key, 1)


# ---------------------------------------------------------------------------------------------
# Colour.
# ---------------------------------------------------------------------------------------------


def _luma(image: jax.Array) -> jax.Array:
  """[..., 3] -> [..., 1] grayscale intensity."""
  weights = jnp.asarray(_LUMA_WEIGHTS, jnp.float32)
  return jnp.sum(image * weights, axis=-1, keepdims=True)


def _rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """[..., 3] RGB in [0, 1] -> [..., 3] HSV, all components in [0, 1] (hue in turns)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.max(rgb, axis=-1)
  chroma = value - jnp.min(rgb, axis=-1)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  # Hue sector (in sixths of a turn) from whichever channel holds the maximum.
  hue6 = jnp.where(value == r, (g - b) / safe_chroma,
                   jnp.where(value == g, (b - r) / safe_chroma + 2.0,
                             (r - g) / safe_chroma + 4.0))
  hue = jnp.where(chroma > 0, jnp.mod(hue6 / 6.0, 1.0), 0.0)
  return jnp.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """[..., 3] HSV (hue in turns) -> [..., 3] RGB, branch-free."""
  hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  channels = []
  for n in (5.0, 3.0, 1.0):  # R, G, B.
    k = jnp.mod(n + hue * 6.0, 6.0)
    ramp = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    channels.append(value - value * saturation * ramp)
  return jnp.stack(channels, axis=-1)


def _adjust_brightness(image, delta):
  return jnp.clip(image + delta, 0.0, 1.0)


def _adjust_contrast(image, factor):
  mean = jnp.mean(_luma(image))
  return jnp.clip(mean + factor * (image - mean), 0.0, 1.0)


def _adjust_saturation(image, factor):
  gray = _luma(image)
  return jnp.clip(gray + factor * (image - gray), 0.0, 1.0)


def _adjust_hue(image, delta):
  hsv = _rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0))
  return jnp.clip(_hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(images, key, *, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1,
                 probability: float = 0.8) -> jax.Array:
  """BYOL colour jitter: brightness, contrast, saturation, hue in a random order per image.

  With the given probability an image gets all four operations, in an order drawn per image,
  each followed by a clip to [0, 1]:

  * brightness: ``x + delta``, ``delta ~ U(-brightness, brightness)`` (additive, as BYOL);
  * contrast: ``m + f (x - m)`` with ``m`` the image's mean luma, ``f ~ U(1 - c, 1 + c)``;
  * saturation: ``g + f (x - g)`` with ``g`` the pixel's luma, ``f ~ U(1 - s, 1 + s)``;
  * hue: rotate the HSV hue by ``delta ~ U(-hue, hue)`` turns.

  An operation whose strength is 0 is skipped.

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    brightness: >= 0.
    contrast: >= 0.
    saturation: >= 0.
    hue: in [0, 0.5].
    probability: chance that an image is jittered, in [0, 1].

  Returns:
    float32 [B, H, W, 3] in [0, 1] (jittered images); untouched images are returned as given.
  """
  images = _prepare_images(images)
  brightness = _check_nonnegative(brightness, "brightness")
  contrast = _check_nonnegative(contrast, "contrast")
  saturation = _check_nonnegative(saturation, "saturation")
  hue = _check_nonnegative(hue, "hue", upper=0.5)
  probability = _check_probability(probability, "probability")
  return _jitter(images, key, brightness, contrast, saturation, hue, probability)


def _jitter(images, key, brightness, contrast, saturation, hue, probability):

  def unless_zero(strength, op):
    # A zero-strength op is skipped, so that it does not even round.
    return lambda x: jnp.where(strength > 0, op(x), x)

  def jitter_one(image, u):
    b_delta = _between(u[1], -brightness, brightness)
    c_factor = _between(u[2], 1.0 - contrast, 1.0 + contrast)
    s_factor = _between(u[3], 1.0 - saturation, 1.0 + saturation)
    h_delta = _between(u[4], -hue, hue)
    ops = [
        unless_zero(brightness, lambda x: _adjust_brightness(x, b_delta)),
        unless_zero(contrast, lambda x: _adjust_contrast(x, c_factor)),
        unless_zero(saturation, lambda x: _adjust_saturation(x, s_factor)),
        unless_zero(hue, lambda x: _adjust_hue(x, h_delta)),
    ]
    order = jnp.argsort(u[5:9])  # A uniformly random permutation of the four ops.
    # Position p applies op order[p]. A loop (not unrolled) keeps the compiled program small:
    # under vmap the switch evaluates all four ops and selects per image.
    jittered = jax.lax.fori_loop(
        0, len(ops), lambda position, x: jax.lax.switch(order[position], ops, x), image)
    return jnp.where(u[0] < probability, jittered, image)

  return _per_image(jitter_one, images, key, 9)


def random_grayscale(images, key, *, probability: float = 0.2) -> jax.Array:
  """Replaces each image, with the given probability, by its luma on all three channels.

  Luma = 0.2989 R + 0.5870 G + 0.1140 B.

  Args:
    images: float [B, H, W, C], C in {1, 3}; C = 1 is broadcast to 3 (then luma = 0.9999 x).
    key: a PRNG key.
    probability: chance that an image is turned gray, in [0, 1].

  Returns:
    float32 [B, H, W, 3]; converted images have three equal channels.
  """
  images = _prepare_images(images)
  return _grayscale(images, key, _check_probability(probability, "probability"))


def _grayscale(images, key, probability):
  def gray_one(image, u):
    gray = jnp.broadcast_to(_luma(image), image.shape)
    return jnp.where(u[0] < probability, gray, image)

  return _per_image(gray_one, images, key, 1)


# ---------------------------------------------------------------------------------------------
# Blur and solarize.
# ---------------------------------------------------------------------------------------------


def default_blur_kernel_size(height: int, width: int) -> int:
  """Odd kernel side ~10 % of the image side: ``max(3, 2 * floor(0.05 * min(H, W)) + 1)``.

  E.g. 23 for 224 px (as BYOL), 9 for 96 px, 3 for 32 px and below.
  """
  return max(3, 2 * int(0.1 * min(height, width) / 2) + 1)


def _blur_axis(image: jax.Array, weights: jax.Array, axis: int) -> jax.Array:
  """1-D convolution of ``image`` along ``axis`` with reflect padding.

  Written as ``x + sum_k w_k (x_shifted_k - x)``: with sum(w) = 1 this is the usual
  convolution, and a constant image stays bit-exactly constant (every difference is 0).
  """
  size = image.shape[axis]
  radius = (weights.shape[0] - 1) // 2
  # Static reflect indices (numpy handles pads longer than the image by repeated reflection).
  index = np.pad(np.arange(size), radius, mode="reflect" if size > 1 else "edge")
  padded = jnp.take(image, jnp.asarray(index), axis=axis)
  out = jnp.zeros_like(image)
  for k in range(weights.shape[0]):
    shifted = jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
    out = out + weights[k] * (shifted - image)
  return image + out


def gaussian_blur(images, key, *, probability: float, sigma_range=(0.1, 2.0),
                  kernel_size=None) -> jax.Array:
  """Separable Gaussian blur with a per-image ``sigma ~ U(sigma_range)``, applied with a
  probability.

  The kernel ``exp(-d^2 / (2 sigma^2))`` over ``d = -r..r`` is normalised to sum 1; borders use
  reflect padding, so a constant image is returned exactly unchanged.

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    probability: chance that an image is blurred, in [0, 1].
    sigma_range: (low, high) of the standard deviation in pixels, 0 < low <= high.
    kernel_size: odd int >= 1, the kernel side; None = ``default_blur_kernel_size(H, W)``.

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  images = _prepare_images(images)
  probability = _check_probability(probability, "probability")
  sigma_range = _check_range(sigma_range, "sigma_range")
  _, height, width, _ = images.shape
  if kernel_size is None:
    kernel_size = default_blur_kernel_size(height, width)
  kernel_size = _check_size(kernel_size, "kernel_size")
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be an odd positive int; got {kernel_size}.")
  return _blur(images, key, probability, sigma_range[0], sigma_range[1], kernel_size)


def _blur(images, key, probability, sigma_low, sigma_high, kernel_size: int):
  offsets = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2

  def blur_one(image, u):
    sigma = _between(u[1], sigma_low, sigma_high)
    weights = jnp.exp(-jnp.square(offsets) / (2.0 * jnp.square(sigma)))
    weights = weights / jnp.sum(weights)
    blurred = _blur_axis(_blur_axis(image, weights, axis=0), weights, axis=1)
    return jnp.where(u[0] < probability, blurred, image)

  return jnp.clip(_per_image(blur_one, images, key, 2), 0.0, 1.0)


def solarize(images, key, *, probability: float, threshold: float = 0.5) -> jax.Array:
  """Solarizes each image with the given probability.

  Convention (as BYOL and PIL): pixels at or above the threshold are inverted,
  ``x -> 1 - x`` for ``x >= threshold``; pixels below it are untouched.

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    probability: chance that an image is solarized, in [0, 1].
    threshold: the inversion threshold.

  Returns:
    float32 [B, H, W, 3].
  """
  images = _prepare_images(images)
  probability = _check_probability(probability, "probability")
  return _solarize(images, key, probability, float(threshold))


def _solarize(images, key, probability, threshold):
  def solarize_one(image, u):
    solarized = jnp.where(image >= threshold, 1.0 - image, image)
    return jnp.where(u[0] < probability, solarized, image)

  return _per_image(solarize_one, images, key, 1)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """Per-channel standardisation ``(x - mean) / std``.

  Args:
    images: float [B, H, W, C], C in {1, 3}; C = 1 is broadcast to 3.
    mean: 3 per-channel means (RGB).
    std: 3 per-channel standard deviations, all > 0.

  Returns:
    float32 [B, H, W, 3].
  """
  images = _prepare_images(images)
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
      _check_probability(getattr(self, name), name)
    for name in ("brightness", "contrast", "saturation"):
      _check_nonnegative(getattr(self, name), name)
    _check_nonnegative(self.hue, "hue", upper=0.5)
    _check_range(self.blur_sigma_range, "blur_sigma_range")


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
  images = _prepare_images(images)
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


def _augment(images, key, params):
  """augment_view on validated images with parameters that may be traced scalars."""
  flip_key, jitter_key, gray_key, blur_key, solarize_key = jax.random.split(key, 5)
  images = _flip(images, flip_key, params["flip_probability"])
  images = _jitter(images, jitter_key, params["brightness"], params["contrast"],
                   params["saturation"], params["hue"], params["color_jitter_probability"])
  images = _grayscale(images, gray_key, params["grayscale_probability"])
  images = _blur(images, blur_key, params["blur_probability"], params["sigma_low"],
                 params["sigma_high"], default_blur_kernel_size(*images.shape[1:3]))
  return _solarize(images, solarize_key, params["solarize_probability"],
                   params["solarize_threshold"])


def multi_crop(images, key, *, num_large: int, num_small: int, large_size: int,
               small_size: int, large_scale=(0.08, 1.0), small_scale=(0.08, 1.0),
               ratio=(3.0 / 4.0, 4.0 / 3.0),
               presets: Sequence[ViewPreset] = (BYOL_VIEW_1, BYOL_VIEW_2)):
  """All views of a batch: ``num_large`` large and ``num_small`` small augmented crops.

  View ``v`` (large views ``v = 0..L-1``, then small views ``v = L..L+S-1``) uses the key
  ``jax.random.fold_in(key, v)``, split by ``jax.random.split`` into ``(crop_key,
  augment_key)``; the view is ``augment_view(random_resized_crop(images, crop_key, ...),
  augment_key, preset=...)`` (all views of a group run as one computation vmapped over views,
  the presets entering as per-view parameter arrays). Within each
  group the presets alternate: large view ``i`` and small view ``j`` use ``presets[i % P]`` and
  ``presets[j % P]`` (default: ``BYOL_VIEW_1`` for even, ``BYOL_VIEW_2`` for odd). Both groups
  crop with aspect ratio in ``ratio``; the default area range is DESIGN.md's 0.08–1 for both
  (pass e.g. ``small_scale=(0.05, 0.14)`` for SwAV-style small crops).

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

  Returns:
    ``(large float32 [L, B, large_size, large_size, 3],
    small float32 [S, B, small_size, small_size, 3])``, values in [0, 1].
  """
  images = _prepare_images(images)
  if isinstance(num_large, bool) or not isinstance(num_large, (int, np.integer)) or num_large < 1:
    raise ValueError(f"num_large must be an int >= 1; got {num_large!r}.")
  if isinstance(num_small, bool) or not isinstance(num_small, (int, np.integer)) or num_small < 0:
    raise ValueError(f"num_small must be an int >= 0; got {num_small!r}.")
  large_size = _check_size(large_size, "large_size")
  small_size = _check_size(small_size, "small_size")
  large_scale = _check_range(large_scale, "large_scale")
  small_scale = _check_range(small_scale, "small_scale")
  ratio = _check_range(ratio, "ratio")
  presets = tuple(presets)
  if not presets or not all(isinstance(p, ViewPreset) for p in presets):
    raise ValueError("presets must be a non-empty sequence of ViewPreset.")

  def group(first_view, count, size, scale):
    """Views first_view..first_view+count-1 as one computation vmapped over the views."""
    if count == 0:
      return jnp.zeros((0, images.shape[0], size, size, 3), jnp.float32)
    view_keys = jnp.stack([jax.random.fold_in(key, first_view + i) for i in range(count)])
    # The presets become per-view parameter arrays, so all views share one compiled chain.
    per_view = [_preset_params(presets[i % len(presets)]) for i in range(count)]
    params = {name: jnp.asarray([p[name] for p in per_view], jnp.float32)
              for name in per_view[0]}

    def one_view(view_key, view_params):
      crop_key, augment_key = jax.random.split(view_key)
      crops = random_resized_crop(images, crop_key, output_size=size, scale=scale, ratio=ratio)
      return _augment(crops, augment_key, view_params)

    return jax.vmap(one_view)(view_keys, params)

  large = group(0, int(num_large), large_size, large_scale)
  small = group(int(num_large), int(num_small), small_size, small_scale)
  return large, small
