"""Photometric augmentations: colour jitter, grayscale, blur and solarize, pure JAX functions
of ``(images, key)``.

The conventions are those of :mod:`semppl_jax.augmentations` (which re-exports every public name
here): each public function takes a batch of images ``float [B, H, W, C]`` (NHWC, values in
[0, 1], ``C`` in {1, 3}; ``C = 1`` is broadcast to 3 channels) and a PRNG key and returns
``float32 [B, H, W, 3]``; each image draws its own randomness (one vector of uniforms per image,
from ``jax.random.split(key, B)``); keyword arguments are Python values (static under
``jax.jit``); the same key gives the same output. Per-image Bernoulli decisions use
``uniform < probability``, so probability 0 is exactly the identity and probability 1 always
applies.

The operations are BYOL's, i.e. ``tf.image``'s, computed with ``dm_pix``: brightness adds a
delta (``tf.image.adjust_brightness``), contrast scales each channel around its mean over the
image (``tf.image.adjust_contrast``), saturation scales the HSV saturation
(``tf.image.adjust_saturation``), hue rotates the HSV hue (``tf.image.adjust_hue``), grayscale
is Rec. 601 luma (``tf.image.rgb_to_grayscale``), blur is a separable Gaussian with zero
('SAME') padding (``dm_pix.gaussian_blur``'s, computed as two matrix products so that the batch
stays sharded) and solarize inverts pixels at or above the threshold. Outputs are clipped to
[0, 1] (colour jitter clips after each of its operations, as BYOL).

The ``*_unchecked`` functions are the same operations on already validated images with
arguments that may be traced scalars: :func:`semppl_jax.augmentations.photometric_views` vmaps
them over views with per-view probabilities and strengths.
"""
import dm_pix as pix
import jax
import jax.numpy as jnp

from semppl_jax import image_batch


# ---------------------------------------------------------------------------------------------
# Colour (dm_pix, tf.image semantics). Each op maps one image [H, W, 3] to [H, W, 3] in [0, 1].
# ---------------------------------------------------------------------------------------------


def _adjust_brightness(image, delta):
  return jnp.clip(pix.adjust_brightness(image, delta), 0.0, 1.0)


def _adjust_contrast(image, factor):
  return jnp.clip(pix.adjust_contrast(image, factor), 0.0, 1.0)


def _adjust_saturation(image, factor):
  return jnp.clip(pix.adjust_saturation(image, factor), 0.0, 1.0)


def _adjust_hue(image, delta):
  return jnp.clip(pix.adjust_hue(image, delta), 0.0, 1.0)


def color_jitter(images, key, *, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1,
                 probability: float = 0.8) -> jax.Array:
  """BYOL colour jitter: brightness, contrast, saturation, hue in a random order per image.

  With the given probability an image gets all four operations, in an order drawn per image
  (a uniformly random permutation), each followed by a clip to [0, 1]. The operations are
  ``tf.image``'s (computed by ``dm_pix``):

  * brightness: ``x + delta``, ``delta ~ U(-brightness, brightness)``
    (``tf.image.adjust_brightness``);
  * contrast: ``m_c + f (x - m_c)`` with ``m_c`` the mean of channel ``c`` over the image,
    ``f ~ U(1 - contrast, 1 + contrast)`` (``tf.image.adjust_contrast``);
  * saturation: the HSV saturation times ``f ~ U(1 - saturation, 1 + saturation)``, clipped to
    [0, 1] (``tf.image.adjust_saturation``);
  * hue: the HSV hue rotated by ``delta ~ U(-hue, hue)`` turns (``tf.image.adjust_hue``).

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
  images = image_batch.prepare_images(images)
  brightness = image_batch.check_nonnegative(brightness, "brightness")
  contrast = image_batch.check_nonnegative(contrast, "contrast")
  saturation = image_batch.check_nonnegative(saturation, "saturation")
  hue = image_batch.check_nonnegative(hue, "hue", upper=0.5)
  probability = image_batch.check_probability(probability, "probability")
  return color_jitter_unchecked(images, key, brightness, contrast, saturation, hue, probability)


# Uniforms per image drawn by colour jitter: [apply, brightness, contrast, saturation, hue,
# 4 order keys].
_JITTER_UNIFORMS = 9


def _jitter_plan(u, brightness, contrast, saturation, hue):
  """One image's jitter parameters from its uniforms ``u`` float32 [9].

  Returns:
    ``(apply_u, (brightness_delta, contrast_factor, saturation_factor, hue_delta), order)``:
    the image is jittered iff ``apply_u < probability``; ``order`` int32 [4] is a permutation
    of the op indices (0 brightness, 1 contrast, 2 saturation, 3 hue), applied first to last.
  """
  amounts = (image_batch.between(u[1], -brightness, brightness),
             image_batch.between(u[2], 1.0 - contrast, 1.0 + contrast),
             image_batch.between(u[3], 1.0 - saturation, 1.0 + saturation),
             image_batch.between(u[4], -hue, hue))
  # argsort of i.i.d. uniforms is a uniformly random permutation.
  return u[0], amounts, jnp.argsort(u[5:9])


def color_jitter_unchecked(images, key, brightness, contrast, saturation, hue, probability):
  """:func:`color_jitter` of validated float32 [B, H, W, 3] images, arguments unchecked."""
  # Strengths and the probability may be traced (photometric_views vmaps them over views).

  def unless_zero(strength, op):
    # A zero-strength op is skipped, so that it does not even round.
    return lambda x: jnp.where(strength > 0, op(x), x)

  def jitter_one(image, u):
    apply_u, (b_delta, c_factor, s_factor, h_delta), order = _jitter_plan(
        u, brightness, contrast, saturation, hue)
    ops = [
        unless_zero(brightness, lambda x: _adjust_brightness(x, b_delta)),
        unless_zero(contrast, lambda x: _adjust_contrast(x, c_factor)),
        unless_zero(saturation, lambda x: _adjust_saturation(x, s_factor)),
        unless_zero(hue, lambda x: _adjust_hue(x, h_delta)),
    ]
    # Position p applies op order[p]. A loop (not unrolled) keeps the compiled program small:
    # under vmap the switch evaluates all four ops and selects per image.
    jittered = jax.lax.fori_loop(
        0, len(ops), lambda position, x: jax.lax.switch(order[position], ops, x), image)
    return jnp.where(apply_u < probability, jittered, image)

  return image_batch.per_image(jitter_one, images, key, _JITTER_UNIFORMS)


def random_grayscale(images, key, *, probability: float = 0.2) -> jax.Array:
  """Replaces each image, with the given probability, by its luma on all three channels.

  Luma = 0.2989 R + 0.5870 G + 0.1140 B (Rec. 601, ``tf.image.rgb_to_grayscale``).

  Args:
    images: float [B, H, W, C], C in {1, 3}; C = 1 is broadcast to 3 (then luma = 0.9999 x).
    key: a PRNG key.
    probability: chance that an image is turned gray, in [0, 1].

  Returns:
    float32 [B, H, W, 3]; converted images have three equal channels.
  """
  images = image_batch.prepare_images(images)
  return grayscale_unchecked(images, key, image_batch.check_probability(probability, "probability"))


def grayscale_unchecked(images, key, probability):
  """:func:`random_grayscale` of validated float32 [B, H, W, 3] images, unchecked."""
  def gray_one(image, u):
    gray = pix.rgb_to_grayscale(image, keep_dims=True)
    return jnp.where(u[0] < probability, gray, image)

  return image_batch.per_image(gray_one, images, key, 1)


# ---------------------------------------------------------------------------------------------
# Blur and solarize.
# ---------------------------------------------------------------------------------------------


def default_blur_kernel_size(height: int, width: int) -> int:
  """Odd kernel side ~10 % of the image side: ``max(3, 2 * floor(0.05 * min(H, W)) + 1)``.

  E.g. 23 for 224 px (as BYOL), 9 for 96 px, 3 for 32 px and below.
  """
  return max(3, 2 * int(0.1 * min(height, width) / 2) + 1)


def gaussian_blur(images, key, *, probability: float, sigma_range=(0.1, 2.0),
                  kernel_size=None) -> jax.Array:
  """Separable Gaussian blur with a per-image ``sigma ~ U(sigma_range)``, applied with a
  probability.

  As BYOL (``dm_pix.gaussian_blur``): the kernel ``exp(-d^2 / (2 sigma^2))`` over
  ``d = -r..r`` is normalised to sum 1 and convolved along H, then W, with zero ('SAME')
  padding, so pixels within ``r`` of the border are darkened by the missing neighbours.

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    probability: chance that an image is blurred, in [0, 1].
    sigma_range: (low, high) of the standard deviation in pixels, 0 < low <= high.
    kernel_size: odd int >= 1, the kernel side; None = ``default_blur_kernel_size(H, W)``.

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  images = image_batch.prepare_images(images)
  probability = image_batch.check_probability(probability, "probability")
  sigma_range = image_batch.check_range(sigma_range, "sigma_range")
  _, height, width, _ = images.shape
  if kernel_size is None:
    kernel_size = default_blur_kernel_size(height, width)
  kernel_size = image_batch.check_size(kernel_size, "kernel_size")
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel_size must be an odd positive int; got {kernel_size}.")
  return blur_unchecked(images, key, probability, sigma_range[0], sigma_range[1], kernel_size)


def blur_matrix(sigma, size: int, kernel_size: int) -> jax.Array:
  """The 1-D zero-padded Gaussian blur along an axis of ``size`` pixels, as a matrix.

  ``out[i] = sum_j M[i, j] x[j]`` with ``M[i, j] = g[j - i + r]`` for ``|j - i| <= r`` (the
  normalised kernel ``g`` of side ``2 r + 1``, ``r = kernel_size // 2``) and 0 elsewhere: the
  'SAME' convolution of ``dm_pix.gaussian_blur``.

  Args:
    sigma: float32 [], the standard deviation in pixels (may be traced).
    size: the axis length.
    kernel_size: the kernel side (``dm_pix``'s rounding: ``2 * (kernel_size // 2) + 1``).

  Returns:
    float32 [size, size].
  """
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-taps**2 / (2.0 * sigma**2))
  kernel = kernel / jnp.sum(kernel)
  offset = jnp.arange(size)[None, :] - jnp.arange(size)[:, None]  # j - i
  inside = jnp.abs(offset) <= radius
  return jnp.where(inside, kernel[jnp.clip(offset + radius, 0, 2 * radius)], 0.0)


def blur_unchecked(images, key, probability, sigma_low, sigma_high, kernel_size: int,
                   precision=jax.lax.Precision.HIGHEST):
  """:func:`gaussian_blur` of validated float32 [B, H, W, 3] images, arguments unchecked.

  ``precision`` is the two matmuls' (a ``jax.lax.Precision``). HIGHEST keeps float32 pixels
  exact on accelerators; a step whose network runs in bfloat16 rounds the blurred pixels to
  bfloat16 at its input anyway, so it can pass DEFAULT (one bf16 pass) and lose nothing more.
  """
  # Two matrix products per image instead of dm_pix's depthwise convolution: under vmap that
  # convolution folds the batch into its feature groups, and GSPMD then gathers the whole
  # batch onto every device (each device blurred every image). A batched matmul keeps the
  # batch a batch dimension, so each device blurs only its own images.
  _, height, width, _ = images.shape

  def blur_one(image, u):
    sigma = image_batch.between(u[1], sigma_low, sigma_high)
    blurred = jnp.einsum("wv,hvc->hwc", blur_matrix(sigma, width, kernel_size), image,
                         precision=precision)
    blurred = jnp.einsum("hg,gwc->hwc", blur_matrix(sigma, height, kernel_size), blurred,
                         precision=precision)
    return jnp.where(u[0] < probability, blurred, image)

  return jnp.clip(image_batch.per_image(blur_one, images, key, 2), 0.0, 1.0)


def solarize(images, key, *, probability: float, threshold: float = 0.5) -> jax.Array:
  """Solarizes each image with the given probability.

  Convention (as BYOL, PIL and ``dm_pix.solarize``): pixels at or above the threshold are
  inverted, ``x -> 1 - x`` for ``x >= threshold``; pixels below it are untouched.

  Args:
    images: float [B, H, W, C], C in {1, 3}, values in [0, 1]; C = 1 is broadcast to 3.
    key: a PRNG key.
    probability: chance that an image is solarized, in [0, 1].
    threshold: the inversion threshold.

  Returns:
    float32 [B, H, W, 3].
  """
  images = image_batch.prepare_images(images)
  probability = image_batch.check_probability(probability, "probability")
  return solarize_unchecked(images, key, probability, float(threshold))


def solarize_unchecked(images, key, probability, threshold):
  """:func:`solarize` of validated float32 [B, H, W, 3] images, arguments unchecked."""
  def solarize_one(image, u):
    return jnp.where(u[0] < probability, pix.solarize(image, threshold), image)

  return image_batch.per_image(solarize_one, images, key, 1)
