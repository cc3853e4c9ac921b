"""Tests for semppl_jax.augmentations against tf.image, numpy and colorsys references."""
import colorsys
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from semppl_jax import augmentations as aug

B, H, W = 4, 16, 16
KEY = jax.random.PRNGKey(0)
OTHER_KEY = jax.random.PRNGKey(1)
RGB = np.random.default_rng(0).uniform(size=(B, H, W, 3)).astype(np.float32)
GRAY1 = np.random.default_rng(1).uniform(size=(B, H, W, 1)).astype(np.float32)

# One jitted function per configuration, shared by the tests (keeps compiles few).
crop_8 = jax.jit(functools.partial(aug.random_resized_crop, output_size=8))
jitter = jax.jit(aug.color_jitter)
view_2 = jax.jit(functools.partial(aug.augment_view, preset=aug.BYOL_VIEW_2))
IDENTITY_PRESET = aug.ViewPreset(
    blur_probability=0.0, solarize_probability=0.0, flip_probability=0.0,
    color_jitter_probability=0.0, grayscale_probability=0.0)
# Two presets told apart by their output: never gray / always gray.
COLOR_PRESET = aug.ViewPreset(blur_probability=1.0, solarize_probability=0.0,
                              grayscale_probability=0.0)
GRAY_PRESET = aug.ViewPreset(blur_probability=0.1, solarize_probability=0.2,
                             grayscale_probability=1.0)
# One multi_crop compile for all multi_crop tests.
multi = jax.jit(functools.partial(aug.multi_crop, num_large=2, num_small=3, large_size=12,
                                  small_size=8, presets=(COLOR_PRESET, GRAY_PRESET)))
photo = jax.jit(functools.partial(aug.photometric_views, presets=(COLOR_PRESET, GRAY_PRESET)))
view_color = jax.jit(functools.partial(aug.augment_view, preset=COLOR_PRESET))
view_gray = jax.jit(functools.partial(aug.augment_view, preset=GRAY_PRESET))
VIEWS = np.stack([RGB, RGB[::-1], 1.0 - RGB])  # Pre-cropped views [V=3, B, H, W, 3].


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


@pytest.mark.parametrize("name", ["crop", "flip", "jitter", "gray", "blur", "solarize", "view"])
def test_shapes_range_and_determinism(name):
  fns = {
      "crop": (crop_8, (B, 8, 8, 3)),
      "flip": (jax.jit(aug.random_flip), (B, H, W, 3)),
      "jitter": (jitter, (B, H, W, 3)),
      "gray": (jax.jit(functools.partial(aug.random_grayscale, probability=0.5)), (B, H, W, 3)),
      "blur": (jax.jit(functools.partial(aug.gaussian_blur, probability=1.0)), (B, H, W, 3)),
      "solarize": (jax.jit(functools.partial(aug.solarize, probability=0.5)), (B, H, W, 3)),
      "view": (view_2, (B, H, W, 3)),
  }
  fn, shape = fns[name]
  # Many images so that a probabilistic op surely acts on some of them for both keys.
  images = np.concatenate([RGB] * 4)
  shape = (4 * B,) + shape[1:]
  first = _check_basic(fn(images, KEY), shape)
  np.testing.assert_array_equal(first, np.asarray(fn(images, KEY)))
  assert not np.array_equal(first, np.asarray(fn(images, OTHER_KEY)))


def test_typed_keys_are_accepted():
  out = _run(aug.random_flip, RGB, jax.random.key(0))
  assert out.shape == (B, H, W, 3)


@pytest.mark.parametrize("fn", [
    functools.partial(aug.random_flip, probability=0.0),
    functools.partial(aug.color_jitter, probability=0.0),
    functools.partial(aug.random_grayscale, probability=0.0),
    functools.partial(aug.gaussian_blur, probability=0.0),
    functools.partial(aug.solarize, probability=0.0),
    functools.partial(aug.augment_view, preset=IDENTITY_PRESET),
])
def test_probability_zero_is_identity(fn):
  np.testing.assert_array_equal(np.asarray(jax.jit(fn)(RGB, KEY)), RGB)


# ----------------------------------------------------------------------------- crop


def _resize_reference(image, top, left, h, w, out):
  """Bilinear resize of the box [top, top+h) x [left, left+w) to out x out (numpy).

  Half-pixel centres; when shrinking, the triangle kernel is stretched by 1/scale
  (antialiasing); weights are renormalised over the pixels inside the image.
  """

  def weights(size, start, extent):
    s = out / extent
    stretch = max(1.0 / s, 1.0)
    centres = (np.arange(out) + 0.5) / s + start - 0.5
    m = np.maximum(0.0, 1.0 - np.abs(centres[None, :] - np.arange(size)[:, None]) / stretch)
    return m / m.sum(axis=0, keepdims=True)  # [size, out]

  wy = weights(image.shape[0], top, h)
  wx = weights(image.shape[1], left, w)
  return np.einsum("hwc,hi,wj->ijc", image.astype(np.float64), wy, wx)


@pytest.mark.parametrize("size", [16, 24, 8])
def test_crop_of_whole_square_image_is_resized_image(size):
  out = np.asarray(_run(aug.random_resized_crop, RGB, KEY, output_size=size, scale=(1.0, 1.0),
                        ratio=(1.0, 1.0)))
  expected = np.stack([_resize_reference(im, 0, 0, H, W, size) for im in RGB])
  np.testing.assert_allclose(out, expected, atol=1e-5)
  if size == H:  # Same size: the image itself.
    np.testing.assert_allclose(out, RGB, atol=1e-6)


def test_crop_falls_back_to_central_crop():
  # 8 x 12 cannot hold a square box of the whole area: central 8 x 8 crop.
  images = RGB[:, :8, :12]
  out = _run(aug.random_resized_crop, images, KEY, output_size=8, scale=(1.0, 1.0),
             ratio=(1.0, 1.0))
  np.testing.assert_allclose(np.asarray(out), images[:, :, 2:10], atol=1e-6)


def test_crop_box_is_a_window_of_the_image():
  # Area 1/4 of 16 x 16 with ratio 1: an 8 x 8 box at an integer offset, resized 8 -> 8.
  images = np.concatenate([RGB] * 4)
  out = np.asarray(_run(aug.random_resized_crop, images, KEY, output_size=8, scale=(0.25, 0.25),
                        ratio=(1.0, 1.0)))
  offsets = set()
  for image, crop in zip(images, out):
    matches = [(t, l) for t in range(H - 7) for l in range(W - 7)
               if np.allclose(image[t:t + 8, l:l + 8], crop, atol=1e-6)]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 1  # Offsets are random per image.


def test_crop_sizes_are_random_and_within_scale():
  # Output = input size so each output pixel is a bilinear sample; compare with references for
  # every admissible box and require exactly one to match.
  images = np.concatenate([RGB[:, :8, :8]] * 3)
  out = np.asarray(_run(aug.random_resized_crop, images, KEY, output_size=8, scale=(0.3, 1.0)))
  boxes = set()
  for image, crop in zip(images, out):
    found = [(t, l, h, w) for h in range(1, 9) for w in range(1, 9)
             if 0.3 * 64 - 8 <= h * w <= 64 and 0.75 - 0.2 <= w / h <= 4 / 3 + 0.2
             for t in range(9 - h) for l in range(9 - w)
             if np.allclose(_resize_reference(image, t, l, h, w, 8), crop, atol=1e-5)]
    assert found, "crop is not a bilinear resize of any box"
    boxes.add(found[0][2:])
  assert len(boxes) > 1


# ----------------------------------------------------------------------------- flip


def test_flip_probability_one_flips_every_image():
  out = _run(aug.random_flip, RGB, KEY, probability=1.0)
  np.testing.assert_array_equal(np.asarray(out), RGB[:, :, ::-1])


def test_flip_rate_is_about_one_half():
  n = 4000
  images = np.broadcast_to(np.array([0.0, 1.0], np.float32)[None, None, :, None], (n, 1, 2, 1))
  out = np.asarray(_run(aug.random_flip, images, KEY, probability=0.5))
  flipped = out[:, 0, 0, 0] == 1.0
  assert np.all(out[:, 0, 1, 0] == 1.0 - out[:, 0, 0, 0])
  # Binomial(n, 0.5): 5 standard deviations.
  assert abs(flipped.mean() - 0.5) < 5 * np.sqrt(0.25 / n)


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
    "brightness": aug._adjust_brightness,
    "contrast": aug._adjust_contrast,
    "saturation": aug._adjust_saturation,
    "hue": aug._adjust_hue,
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
  out = np.asarray(aug._adjust_contrast(jnp.asarray(RGB[0]), 0.0))
  np.testing.assert_allclose(out, np.broadcast_to(RGB[0].mean(axis=(0, 1)), out.shape),
                             atol=1e-6)


def test_grayscale_matches_tf_image_and_has_equal_channels():
  out = np.asarray(_run(aug.random_grayscale, COLOR_IMAGES, KEY, probability=1.0))
  expected = tf.image.rgb_to_grayscale(COLOR_IMAGES).numpy()
  np.testing.assert_allclose(out, np.repeat(expected, 3, axis=-1), atol=1e-6)
  assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_grayscale_with_probability_half_mixes():
  images = np.concatenate([RGB] * 8)
  out = np.asarray(_run(aug.random_grayscale, images, KEY, probability=0.5))
  gray = np.all(out[..., 0] == out[..., 2], axis=(1, 2))
  untouched = np.all(out == images, axis=(1, 2, 3))
  assert np.all(gray ^ untouched) and 0 < gray.sum() < len(images)


def _jitter_reference(image, u, order=None, strengths=(0.4, 0.4, 0.2, 0.1), probability=0.8):
  """BYOL's jitter of one image with tf.image ops, from the image's uniforms ``u``."""
  apply_u, amounts, drawn_order = aug._jitter_plan(jnp.asarray(u), *strengths)
  if apply_u >= probability:
    return image
  for index in (drawn_order if order is None else order):
    image = _tf_op(_JITTER_OP_NAMES[int(index)], image, amounts[int(index)])
  return image


def test_color_jitter_matches_tf_reference_in_a_random_order_per_image():
  n = 24
  images = np.concatenate([COLOR_IMAGES] * (n // B))
  out = np.asarray(jitter(images, KEY))  # Default BYOL strengths, probability 0.8.
  uniforms = np.asarray(aug._image_uniforms(KEY, n, aug._JITTER_UNIFORMS))
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
  uniforms = aug._image_uniforms(KEY, 64, aug._JITTER_UNIFORMS)
  apply_u, amounts, orders = jax.vmap(lambda u: aug._jitter_plan(u, 0.4, 0.3, 0.2, 0.1))(uniforms)
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
  out = np.asarray(_run(aug.color_jitter, gray, KEY, brightness=0.0, contrast=0.0, saturation=0.9,
                        hue=0.5, probability=1.0))
  np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)
  np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-6)
  # Default jitter (all four ops) keeps them gray as well.
  out = np.asarray(jitter(gray, KEY))
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)


def test_brightness_jitter_is_an_additive_shift():
  images = 0.45 + 0.1 * RGB  # No clipping for shifts up to 0.4.
  out = np.asarray(_run(aug.color_jitter, images, KEY, brightness=0.4, contrast=0.0,
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
  out = np.asarray(_run(aug.color_jitter, RGB, KEY, brightness=0.0, contrast=0.0, saturation=0.0,
                        hue=0.5, probability=1.0))
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
  out = _run(aug.gaussian_blur, RGB, KEY, probability=1.0, sigma_range=(sigma, sigma),
             kernel_size=size)
  np.testing.assert_allclose(np.asarray(out), _blur_reference(RGB, sigma, size), atol=1e-5)


def test_blur_keeps_a_constant_interior_and_darkens_the_border():
  images = np.full((B, H, W, 3), 0.37, np.float32)
  out = np.asarray(_run(aug.gaussian_blur, images, KEY, probability=1.0, sigma_range=(1.0, 1.0),
                        kernel_size=5))
  np.testing.assert_allclose(out[:, 2:-2, 2:-2], images[:, 2:-2, 2:-2], atol=1e-6)
  assert np.all(out[:, 0, :] < 0.37 - 1e-3) and np.all(out[:, :, -1] < 0.37 - 1e-3)


def test_blur_sigma_is_drawn_per_image():
  images = np.repeat(RGB[:1], 8, axis=0)
  out = np.asarray(_run(aug.gaussian_blur, images, KEY, probability=1.0, kernel_size=5))
  # Image b uses its uniforms [apply, sigma]: sigma = 0.1 + 1.9 u[1].
  sigmas = 0.1 + 1.9 * np.asarray(aug._image_uniforms(KEY, 8, 2))[:, 1]
  for o, sigma in zip(out, sigmas):
    np.testing.assert_allclose(o, _blur_reference(images[:1], sigma, 5)[0], atol=1e-5)
  assert np.ptp(sigmas) > 0.5
  assert all(not np.allclose(out[i], out[j]) for i in range(8) for j in range(i))


def test_default_blur_kernel_size():
  assert aug.default_blur_kernel_size(224, 224) == 23
  assert aug.default_blur_kernel_size(96, 96) == 9
  assert aug.default_blur_kernel_size(32, 32) == 3
  assert aug.default_blur_kernel_size(8, 8) == 3
  with pytest.raises(ValueError, match="kernel_size"):
    _run(aug.gaussian_blur, RGB, KEY, probability=1.0, kernel_size=4)


def test_solarize_inverts_pixels_at_or_above_threshold():
  threshold = 0.3
  images = RGB.copy()
  images[:, 0, 0, :] = threshold  # Exactly at the threshold: inverted.
  out = np.asarray(_run(aug.solarize, images, KEY, probability=1.0, threshold=threshold))
  np.testing.assert_array_equal(out, np.where(images >= threshold, 1.0 - images, images))


# ----------------------------------------------------------------------------- normalize


def test_normalize_matches_reference():
  out = aug.normalize(RGB, aug.IMAGENET_MEAN, aug.IMAGENET_STD)
  expected = (RGB - np.array(aug.IMAGENET_MEAN)) / np.array(aug.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="mean"):
    aug.normalize(RGB, (0.5, 0.5), aug.IMAGENET_STD)
  with pytest.raises(ValueError, match="std"):
    aug.normalize(RGB, aug.IMAGENET_MEAN, (0.2, 0.0, 0.2))


# ----------------------------------------------------------------------------- views


def test_presets():
  assert aug.BYOL_VIEW_1.blur_probability == 1.0 and aug.BYOL_VIEW_1.solarize_probability == 0.0
  assert aug.BYOL_VIEW_2.blur_probability == 0.1 and aug.BYOL_VIEW_2.solarize_probability == 0.2
  for preset in (aug.BYOL_VIEW_1, aug.BYOL_VIEW_2):
    assert preset.flip_probability == 0.5 and preset.grayscale_probability == 0.2
    assert (preset.brightness, preset.contrast, preset.saturation, preset.hue) == (
        0.4, 0.4, 0.2, 0.1)
    assert preset.color_jitter_probability == 0.8
  with pytest.raises(ValueError, match="blur_probability"):
    aug.ViewPreset(blur_probability=1.5, solarize_probability=0.0)


def test_grayscale_input_is_broadcast_to_three_channels():
  out = np.asarray(view_2(GRAY1, KEY))
  assert out.shape == (B, H, W, 3)
  np.testing.assert_array_equal(out, np.asarray(view_2(np.repeat(GRAY1, 3, axis=-1), KEY)))
  np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)  # Gray stays gray.
  # multi_crop and photometric_views validate and broadcast the same way (shapes only: no
  # extra compile).
  large, small = jax.eval_shape(multi, GRAY1, KEY)
  assert large.shape == (2, B, 12, 12, 3) and small.shape == (3, B, 8, 8, 3)
  assert large.dtype == small.dtype == jnp.float32
  views = jax.eval_shape(photo, GRAY1[None], KEY)
  assert views.shape == (1, B, H, W, 3) and views.dtype == jnp.float32


def test_photometric_views_is_augment_view_per_view_with_alternating_presets():
  out = _check_basic(photo(VIEWS, KEY), (3, B, H, W, 3))
  for v, view_fn in enumerate((view_color, view_gray, view_color)):
    expected = view_fn(VIEWS[v], jax.random.fold_in(KEY, v))
    np.testing.assert_allclose(out[v], np.asarray(expected), atol=1e-5)
  is_gray = [bool(np.all(view[..., 0] == view[..., 2])) for view in out]
  assert is_gray == [False, True, False]
  np.testing.assert_array_equal(out, np.asarray(photo(VIEWS, KEY)))
  assert not np.array_equal(out, np.asarray(photo(VIEWS, OTHER_KEY)))


def test_photometric_views_takes_uint8_as_value_over_255():
  views = np.round(VIEWS * 255).astype(np.uint8)
  out = _check_basic(photo(views, KEY), (3, B, H, W, 3))
  expected = photo(views.astype(np.float32) / 255.0, KEY)
  np.testing.assert_allclose(out, np.asarray(expected), atol=1e-6)


def test_photometric_views_defaults_and_no_views():
  default = inspect.signature(aug.photometric_views).parameters["presets"].default
  assert tuple(default) == (aug.BYOL_VIEW_1, aug.BYOL_VIEW_2)
  out = aug.photometric_views(np.zeros((0, B, H, W, 3), np.uint8), KEY)
  assert out.shape == (0, B, H, W, 3) and out.dtype == jnp.float32


def test_multi_crop_shapes_and_keys():
  large, small = multi(RGB, KEY)
  large = _check_basic(large, (2, B, 12, 12, 3))
  small = _check_basic(small, (3, B, 8, 8, 3))
  again = multi(RGB, KEY)
  np.testing.assert_array_equal(large, np.asarray(again[0]))
  np.testing.assert_array_equal(small, np.asarray(again[1]))
  other = multi(RGB, OTHER_KEY)
  assert not np.array_equal(large, np.asarray(other[0]))
  assert not np.array_equal(small, np.asarray(other[1]))
  # Every view has its own randomness.
  assert not np.array_equal(large[0], large[1])
  assert all(not np.array_equal(small[i], small[j]) for i in range(3) for j in range(i))


def test_multi_crop_alternates_presets_within_each_group():
  large, small = multi(RGB, KEY)
  is_gray = lambda views: [bool(np.all(np.asarray(v)[..., 0] == np.asarray(v)[..., 2]))
                           for v in views]
  assert is_gray(large) == [False, True]
  assert is_gray(small) == [False, True, False]


def test_multi_crop_default_presets_are_the_byol_pair():
  default = inspect.signature(aug.multi_crop).parameters["presets"].default
  assert tuple(default) == (aug.BYOL_VIEW_1, aug.BYOL_VIEW_2)


def test_multi_crop_view_is_crop_then_photometric_chain():
  # Small view 2 is global view L + 2 = 4: it is cropped with fold_in(crop_key, 4), and it is
  # view 2 of the small group, whose photometric key is fold_in(photo_key, 1); preset
  # presets[2 % 2] = COLOR_PRESET.
  _, small = multi(RGB, KEY)
  crop_key, photo_key = jax.random.split(KEY)
  crops = crop_8(RGB, jax.random.fold_in(crop_key, 4))
  expected = view_color(crops, jax.random.fold_in(jax.random.fold_in(photo_key, 1), 2))
  np.testing.assert_allclose(np.asarray(small[2]), np.asarray(expected), atol=1e-5)


def test_multi_crop_without_small_views():
  large, small = jax.eval_shape(
      functools.partial(aug.multi_crop, num_large=3, num_small=0, large_size=8, small_size=4),
      RGB, KEY)
  assert large.shape == (3, B, 8, 8, 3) and small.shape == (0, B, 4, 4, 3)
  assert small.dtype == jnp.float32


# ----------------------------------------------------------------------------- bad input


_ALL_FUNCTIONS = [
    functools.partial(aug.random_resized_crop, output_size=8),
    aug.random_flip,
    aug.color_jitter,
    aug.random_grayscale,
    functools.partial(aug.gaussian_blur, probability=0.5),
    functools.partial(aug.solarize, probability=0.5),
    lambda images, key: aug.normalize(images),
    functools.partial(aug.augment_view, preset=aug.BYOL_VIEW_1),
    functools.partial(aug.multi_crop, num_large=2, num_small=0, large_size=8, small_size=4),
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
    (aug.random_flip, "probability"),
    (aug.color_jitter, "probability"),
    (aug.random_grayscale, "probability"),
    (aug.gaussian_blur, "probability"),
    (aug.solarize, "probability"),
])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bad_probability_raises(fn, name, value):
  with pytest.raises(ValueError, match=name):
    fn(RGB, KEY, probability=value)


@pytest.mark.parametrize("views", [
    np.zeros((B, H, W, 3), np.uint8),        # Rank 4.
    np.zeros((2, B, H, W, 3), np.int32),     # Integer dtype other than uint8.
    np.zeros((2, B, H, W, 2), np.float32),   # Two channels.
])
def test_bad_views_raise(views):
  with pytest.raises(ValueError, match=r"\[V, B, H, W, 1 or 3\]"):
    aug.photometric_views(views, KEY)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="scale"):
    aug.random_resized_crop(RGB, KEY, output_size=8, scale=(0.5, 0.2))
  with pytest.raises(ValueError, match="ratio"):
    aug.random_resized_crop(RGB, KEY, output_size=8, ratio=(0.0, 1.0))
  with pytest.raises(ValueError, match="output_size"):
    aug.random_resized_crop(RGB, KEY, output_size=0)
  with pytest.raises(ValueError, match="hue"):
    aug.color_jitter(RGB, KEY, hue=0.7)
  with pytest.raises(ValueError, match="brightness"):
    aug.color_jitter(RGB, KEY, brightness=-0.1)
  with pytest.raises(ValueError, match="sigma_range"):
    aug.gaussian_blur(RGB, KEY, probability=1.0, sigma_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="num_large"):
    aug.multi_crop(RGB, KEY, num_large=0, num_small=1, large_size=8, small_size=4)
  with pytest.raises(ValueError, match="num_small"):
    aug.multi_crop(RGB, KEY, num_large=1, num_small=-1, large_size=8, small_size=4)
  with pytest.raises(ValueError, match="preset"):
    aug.augment_view(RGB, KEY, preset={"blur_probability": 1.0})
  with pytest.raises(ValueError, match="presets"):
    aug.photometric_views(VIEWS, KEY, presets=())
