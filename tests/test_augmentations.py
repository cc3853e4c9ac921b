"""Tests for semppl_jax.augmentations (crops, flip, normalize, presets, view chains)."""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import augmentations as aug
from semppl_jax import photometric

B, H, W = 4, 16, 16
KEY = jax.random.PRNGKey(0)
OTHER_KEY = jax.random.PRNGKey(1)
RGB = np.random.default_rng(0).uniform(size=(B, H, W, 3)).astype(np.float32)
GRAY1 = np.random.default_rng(1).uniform(size=(B, H, W, 1)).astype(np.float32)

# One jitted function per configuration, shared by the tests (keeps compiles few).
crop_8 = jax.jit(functools.partial(aug.random_resized_crop, output_size=8))
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


@pytest.mark.parametrize("name", ["crop", "flip", "view"])
def test_shapes_range_and_determinism(name):
  fns = {
      "crop": (crop_8, (B, 8, 8, 3)),
      "flip": (jax.jit(aug.random_flip), (B, H, W, 3)),
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


# ----------------------------------------------------------------------------- photometric


def test_photometric_ops_are_reexported():
  for name in ("color_jitter", "random_grayscale", "gaussian_blur", "solarize",
               "default_blur_kernel_size"):
    assert getattr(aug, name) is getattr(photometric, name)


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


@pytest.mark.slow
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
  with pytest.raises(ValueError, match="num_large"):
    aug.multi_crop(RGB, KEY, num_large=0, num_small=1, large_size=8, small_size=4)
  with pytest.raises(ValueError, match="num_small"):
    aug.multi_crop(RGB, KEY, num_large=1, num_small=-1, large_size=8, small_size=4)
  with pytest.raises(ValueError, match="preset"):
    aug.augment_view(RGB, KEY, preset={"blur_probability": 1.0})
  with pytest.raises(ValueError, match="presets"):
    aug.photometric_views(VIEWS, KEY, presets=())
