"""Tests for semppl_jax.photometric against tf.image, numpy and colorsys references."""
import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from semppl_jax import image_batch
from semppl_jax import photometric

B, H, W = 4, 16, 16
KEY = jax.random.PRNGKey(0)
OTHER_KEY = jax.random.PRNGKey(1)
RGB = np.random.default_rng(0).uniform(size=(B, H, W, 3)).astype(np.float32)
GRAY1 = np.random.default_rng(1).uniform(size=(B, H, W, 1)).astype(np.float32)

# One jitted function per configuration, shared by the tests (keeps compiles few).
jitter = jax.jit(photometric.color_jitter)


def _run(fn, images, key, **kwargs):
  """fn(images, key, **kwargs) under jit (one compile instead of many eager op compiles)."""
  return jax.jit(functools.partial(fn, **kwargs))(images, key)


def _check_basic(out, shape):
  out = np.asarray(out)
  assert out.shape == shape
  assert out.dtype == np.float32
  assert np.all(out >= 0.0) and np.all(out <= 1.0)
  return out


# ----------------------------------------------------------------------------- shapes / keys


@pytest.mark.parametrize("name", ["jitter", "gray", "blur", "solarize"])
def test_shapes_range_and_determinism(name):
  fns = {
      "jitter": (jitter, (B, H, W, 3)),
      "gray": (jax.jit(functools.partial(photometric.random_grayscale, probability=0.5)),
               (B, H, W, 3)),
      "blur": (jax.jit(functools.partial(photometric.gaussian_blur, probability=1.0)),
               (B, H, W, 3)),
      "solarize": (jax.jit(functools.partial(photometric.solarize, probability=0.5)),
                   (B, H, W, 3)),
  }
  fn, shape = fns[name]
  # Many images so that a probabilistic op surely acts on some of them for both keys.
  images = np.concatenate([RGB] * 4)
  shape = (4 * B,) + shape[1:]
  first = _check_basic(fn(images, KEY), shape)
  np.testing.assert_array_equal(first, np.asarray(fn(images, KEY)))
  assert not np.array_equal(first, np.asarray(fn(images, OTHER_KEY)))


@pytest.mark.parametrize("fn", [
    functools.partial(photometric.color_jitter, probability=0.0),
    functools.partial(photometric.random_grayscale, probability=0.0),
    functools.partial(photometric.gaussian_blur, probability=0.0),
    functools.partial(photometric.solarize, probability=0.0),
])
def test_probability_zero_is_identity(fn):
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(RGB, KEY)), RGB)


# ----------------------------------------------------------------------------- colour
#
# References are tf.image's ops (what BYOL uses), each followed by a clip to [0, 1] as BYOL.

# Random pixels plus the corners of the RGB cube and gray pixels, where HSV is degenerate.
_EDGE_PIXELS = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1], [0.5, 0.5, 0.5],
                         [1, 1, 0], [0.2, 0.2, 0.9], [0, 0, 0.3]], np.float32)
COLOR_IMAGES = RGB.copy()
COLOR_IMAGES[:, 0, :8] = _EDGE_PIXELS

_TF_OPS = {
    "brightness": tf.image.adjust_brightness,
    "contrast": tf.image.adjust_contrast,
    "saturation": tf.image.adjust_saturation,
    "hue": tf.image.adjust_hue,
}
_OURS = {
    "brightness": photometric._adjust_brightness,
    "contrast": photometric._adjust_contrast,
    "saturation": photometric._adjust_saturation,
    "hue": photometric._adjust_hue,
}
_JITTER_OP_NAMES = ("brightness", "contrast", "saturation", "hue")  # The op indices 0..3.


def _tf_op(name, image, amount):
  return np.clip(_TF_OPS[name](tf.constant(image), float(amount)).numpy(), 0.0, 1.0)


@pytest.mark.parametrize("name,amounts", [
    ("brightness", [-0.4, -0.05, 0.2, 0.4]),
    ("contrast", [0.6, 0.9, 1.2, 1.4]),
    ("saturation", [0.0, 0.8, 1.2, 3.0]),
    ("hue", [-0.5, -0.1, 0.1, 0.45]),
])
def test_colour_ops_match_tf_image(name, amounts):
  # One compile per op: the amount is a traced per-image argument.
  op = jax.jit(jax.vmap(_OURS[name]))
  out = np.asarray(op(COLOR_IMAGES, jnp.asarray(amounts, jnp.float32)))
  assert np.all(out >= 0.0) and np.all(out <= 1.0)
  for image, amount, result in zip(COLOR_IMAGES, amounts, out):
    np.testing.assert_allclose(result, _tf_op(name, image, amount), atol=1e-5)


def test_contrast_is_around_each_channels_mean():
  # tf.image semantics (not torchvision's mean luma): a contrast of 0 gives every channel its
  # own mean over the image.
  out = np.asarray(photometric._adjust_contrast(jnp.asarray(RGB[0]), 0.0))
  np.testing.assert_allclose(out, np.broadcast_to(RGB[0].mean(axis=(0, 1)), out.shape),
                             atol=1e-6)


def test_grayscale_matches_tf_image_and_has_equal_channels():
  out = np.asarray(_run(photometric.random_grayscale, COLOR_IMAGES, KEY, probability=1.0))
  expected = tf.image.rgb_to_grayscale(COLOR_IMAGES).numpy()
  np.testing.assert_allclose(out, np.repeat(expected, 3, axis=-1), atol=1e-6)
  assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_grayscale_with_probability_half_mixes():
  images = np.concatenate([RGB] * 8)
  out = np.asarray(_run(photometric.random_grayscale, images, KEY, probability=0.5))
  gray = np.all(out[..., 0] == out[..., 2], axis=(1, 2))
  untouched = np.all(out == images, axis=(1, 2, 3))
  assert np.all(gray ^ untouched) and 0 < gray.sum() < len(images)


def _jitter_reference(image, u, order=None, strengths=(0.4, 0.4, 0.2, 0.1), probability=0.8):
  """BYOL's jitter of one image with tf.image ops, from the image's uniforms ``u``."""
  apply_u, amounts, drawn_order = photometric._jitter_plan(jnp.asarray(u), *strengths)
  if apply_u >= probability:
    return image
  for index in (drawn_order if order is None else order):
    image = _tf_op(_JITTER_OP_NAMES[int(index)], image, amounts[int(index)])
  return image


def test_color_jitter_matches_tf_reference_in_a_random_order_per_image():
  n = 24
  images = np.concatenate([COLOR_IMAGES] * (n // B))
  out = np.asarray(jitter(images, KEY))  # Default BYOL strengths, probability 0.8.
  uniforms = np.asarray(image_batch.image_uniforms(KEY, n, photometric._JITTER_UNIFORMS))
  orders, order_matters, jittered = set(), 0, 0
  for image, u, result in zip(images, uniforms, out):
    np.testing.assert_allclose(result, _jitter_reference(image, u), atol=1e-5)
    if u[0] < 0.8:
      jittered += 1
      orders.add(tuple(np.argsort(u[5:9])))
      fixed = _jitter_reference(image, u, order=(0, 1, 2, 3))
      order_matters += np.abs(fixed - result).max() > 1e-3
  # Some images are left alone, the others draw different orders, and the order changes the
  # output (so applying the ops in one fixed order would fail the comparison above).
  assert 0 < jittered < n and len(orders) > 3 and order_matters > 0


def test_jitter_plan_draws_amounts_in_range_per_image():
  uniforms = image_batch.image_uniforms(KEY, 64, photometric._JITTER_UNIFORMS)
  apply_u, amounts, orders = jax.vmap(
      lambda u: photometric._jitter_plan(u, 0.4, 0.3, 0.2, 0.1))(uniforms)
  bounds = [(-0.4, 0.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]
  for values, (low, high) in zip(amounts, bounds):
    values = np.asarray(values)
    assert np.all(values >= low) and np.all(values <= high)
    assert np.ptp(values) > 0.5 * (high - low)  # Spread over the range, one draw per image.
  assert np.all(np.sort(np.asarray(orders), axis=1) == np.arange(4))
  assert len({tuple(o) for o in np.asarray(orders)}) > 10
  assert 0.0 <= float(np.min(apply_u)) and float(np.max(apply_u)) < 1.0


def test_hue_and_saturation_jitter_keep_gray_images_gray():
  gray = np.repeat(GRAY1, 3, axis=-1)
  out = np.asarray(_run(photometric.color_jitter, gray, KEY, brightness=0.0, contrast=0.0,
                        saturation=0.9, hue=0.5, probability=1.0))
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)
  # Default jitter (all four ops) keeps them gray as well.
  out = np.asarray(jitter(gray, KEY))
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)


def test_brightness_jitter_is_an_additive_shift():
  images = 0.45 + 0.1 * RGB  # No clipping for shifts up to 0.4.
  out = np.asarray(_run(photometric.color_jitter, images, KEY, brightness=0.4, contrast=0.0,
                        saturation=0.0, hue=0.0, probability=1.0))
  delta = (out - images).reshape(B, -1)
  np.testing.assert_allclose(delta, delta[:, :1] * np.ones_like(delta), atol=1e-6)
  assert np.all(np.abs(delta[:, 0]) <= 0.4) and np.ptp(delta[:, 0]) > 0


def _hue_rotate_reference(image, delta):
  flat = image.reshape(-1, 3).astype(np.float64)
  out = []
  for r, g, b in flat:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    out.append(colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))
  return np.asarray(out).reshape(image.shape)


def test_hue_jitter_is_a_per_image_hue_rotation():
  out = np.asarray(_run(photometric.color_jitter, RGB, KEY, brightness=0.0, contrast=0.0,
                        saturation=0.0, hue=0.5, probability=1.0))
  deltas = []
  for image, result in zip(RGB, out):
    # Read the rotation off the most saturated pixel, then check every pixel with colorsys.
    flat_in, flat_out = image.reshape(-1, 3), result.reshape(-1, 3)
    i = np.argmax(flat_in.max(-1) - flat_in.min(-1))
    delta = (colorsys.rgb_to_hsv(*flat_out[i])[0] - colorsys.rgb_to_hsv(*flat_in[i])[0]) % 1.0
    np.testing.assert_allclose(result, _hue_rotate_reference(image, delta), atol=1e-4)
    deltas.append(delta)
  assert len(set(np.round(deltas, 4))) == B  # Each image draws its own rotation.


# ----------------------------------------------------------------------------- blur / solarize


def _blur_reference(images, sigma, size):
  """Separable Gaussian blur with zero padding (BYOL's 'SAME' depthwise convolution)."""
  d = np.arange(size) - size // 2
  k = np.exp(-d ** 2 / (2 * sigma ** 2))
  k /= k.sum()
  r = size // 2
  padded = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)))
  rows = sum(k[i] * padded[:, i:i + images.shape[1]] for i in range(size))
  return sum(k[j] * rows[:, :, j:j + images.shape[2]] for j in range(size))


def test_blur_matches_zero_padded_separable_reference():
  sigma, size = 1.3, 5
  out = _run(photometric.gaussian_blur, RGB, KEY, probability=1.0, sigma_range=(sigma, sigma),
             kernel_size=size)
  np.testing.assert_allclose(np.asarray(out), _blur_reference(RGB, sigma, size), atol=1e-5)


def test_blur_keeps_a_constant_interior_and_darkens_the_border():
  images = np.full((B, H, W, 3), 0.37, np.float32)
  out = np.asarray(_run(photometric.gaussian_blur, images, KEY, probability=1.0,
                        sigma_range=(1.0, 1.0), kernel_size=5))
  np.testing.assert_allclose(out[:, 2:-2, 2:-2], images[:, 2:-2, 2:-2], atol=1e-6)
  assert np.all(out[:, 0, :] < 0.37 - 1e-3) and np.all(out[:, :, -1] < 0.37 - 1e-3)


def test_blur_sigma_is_drawn_per_image():
  images = np.repeat(RGB[:1], 8, axis=0)
  out = np.asarray(_run(photometric.gaussian_blur, images, KEY, probability=1.0, kernel_size=5))
  # Image b uses its uniforms [apply, sigma]: sigma = 0.1 + 1.9 u[1].
  sigmas = 0.1 + 1.9 * np.asarray(image_batch.image_uniforms(KEY, 8, 2))[:, 1]
  for o, sigma in zip(out, sigmas):
    np.testing.assert_allclose(o, _blur_reference(images[:1], sigma, 5)[0], atol=1e-5)
  assert np.ptp(sigmas) > 0.5
  assert all(not np.allclose(out[i], out[j]) for i in range(8) for j in range(i))


def test_default_blur_kernel_size():
  assert photometric.default_blur_kernel_size(224, 224) == 23
  assert photometric.default_blur_kernel_size(96, 96) == 9
  assert photometric.default_blur_kernel_size(32, 32) == 3
  assert photometric.default_blur_kernel_size(8, 8) == 3
  with pytest.raises(ValueError, match="kernel_size"):
    _run(photometric.gaussian_blur, RGB, KEY, probability=1.0, kernel_size=4)


def test_solarize_inverts_pixels_at_or_above_threshold():
  threshold = 0.3
  images = RGB.copy()
  images[:, 0, 0, :] = threshold  # Exactly at the threshold: inverted.
  out = np.asarray(_run(photometric.solarize, images, KEY, probability=1.0, threshold=threshold))
  np.testing.assert_array_equal(out, np.where(images >= threshold, 1.0 - images, images))


# ----------------------------------------------------------------------------- bad input


_ALL_FUNCTIONS = [
    photometric.color_jitter,
    photometric.random_grayscale,
    functools.partial(photometric.gaussian_blur, probability=0.5),
    functools.partial(photometric.solarize, probability=0.5),
]


@pytest.mark.parametrize("fn", _ALL_FUNCTIONS)
@pytest.mark.parametrize("images", [
    np.zeros((H, W, 3), np.float32),          # Rank 3.
    np.zeros((B, H, W, 3), np.uint8),         # Integer dtype.
    np.zeros((B, H, W, 2), np.float32),       # Two channels.
])
def test_bad_images_raise(fn, images):
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    fn(images, KEY)


@pytest.mark.parametrize("fn,name", [
    (photometric.color_jitter, "probability"),
    (photometric.random_grayscale, "probability"),
    (photometric.gaussian_blur, "probability"),
    (photometric.solarize, "probability"),
])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bad_probability_raises(fn, name, value):
  with pytest.raises(ValueError, match=name):
    fn(RGB, KEY, probability=value)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="hue"):
    photometric.color_jitter(RGB, KEY, hue=0.7)
  with pytest.raises(ValueError, match="brightness"):
    photometric.color_jitter(RGB, KEY, brightness=-0.1)
  with pytest.raises(ValueError, match="sigma_range"):
    photometric.gaussian_blur(RGB, KEY, probability=1.0, sigma_range=(0.0, 1.0))


def test_blur_precision_reaches_both_matmuls():
  """HIGHEST (the default) and DEFAULT blur the same on CPU (float32 dots either way); only
  the HIGHEST program carries HIGHEST dots, so a bfloat16 step can drop them."""
  images = jnp.asarray(np.random.RandomState(0).rand(2, 9, 7, 3), jnp.float32)
  key = jax.random.PRNGKey(1)

  def compiled(precision):
    fn = lambda x, k: photometric.blur_unchecked(x, k, 1.0, 0.5, 2.0, 5, precision)
    return jax.jit(fn).lower(images, key).compile()

  highest, default = (compiled(p) for p in (jax.lax.Precision.HIGHEST,
                                            jax.lax.Precision.DEFAULT))
  assert "operand_precision={highest" in highest.as_text()
  assert "operand_precision={highest" not in default.as_text()
  np.testing.assert_allclose(default(images, key), highest(images, key), atol=1e-6)
