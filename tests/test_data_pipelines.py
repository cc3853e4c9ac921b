"""Shared tf.data pieces: host preprocessing, resumable epoch streams, shard bounds."""
import numpy as np
import pytest
import tensorflow as tf

from semppl_jax.data import pipelines


def test_decode_center_crop_against_numpy():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)
  png = tf.io.encode_png(image)
  # Same size after cropping: the resize is the identity, so the crop must be exact.
  np.testing.assert_array_equal(pipelines.decode_center_crop(png, 6).numpy(), image[:, 2:8])
  tall = np.transpose(image, (1, 0, 2))
  np.testing.assert_array_equal(
      pipelines.decode_center_crop(tf.io.encode_png(tall), 6).numpy(), tall[2:8])
  # central_fraction 0.5: the centred 3x3 square, resized to 6x6 (2x upsampling).
  out = pipelines.decode_center_crop(png, 6, central_fraction=0.5).numpy()
  assert out.shape == (6, 6, 3) and out.dtype == np.uint8
  ref = tf.image.resize(image[1:4, 3:6].astype(np.float32), [6, 6], antialias=True).numpy()
  np.testing.assert_array_equal(out, np.clip(np.round(ref), 0, 255).astype(np.uint8))
  # Grayscale input becomes RGB.
  gray = pipelines.decode_center_crop(tf.io.encode_png(image[..., :1]), 6).numpy()
  np.testing.assert_array_equal(gray, np.repeat(image[:, 2:8, :1], 3, axis=-1))


def test_decode_center_crop_jpeg_window_matches_full_decode():
  rng = np.random.default_rng(1)
  blocks = np.kron(rng.integers(0, 256, size=(4, 6, 3)), np.ones((8, 8, 1))).astype(np.uint8)
  # Without chroma subsampling, decoding only the window equals decode-then-crop exactly.
  jpeg = tf.io.encode_jpeg(blocks, quality=95, chroma_downsampling=False)
  full = tf.io.decode_jpeg(jpeg, channels=3).numpy()  # 32 x 48
  np.testing.assert_array_equal(pipelines.decode_center_crop(jpeg, 32).numpy(), full[:, 8:40])
  # With 4:2:0 chroma, libjpeg's upsampling lacks the neighbours outside the window: only the
  # window's first and last columns may differ.
  jpeg = tf.io.encode_jpeg(blocks, quality=95)
  full = tf.io.decode_jpeg(jpeg, channels=3).numpy()
  out = pipelines.decode_center_crop(jpeg, 32).numpy()
  np.testing.assert_array_equal(out[:, 1:-1], full[:, 9:39])


def test_even_shard_bounds_partition():
  for n in (0, 1, 7, 10):
    for count in (1, 2, 3, 4):
      bounds = [pipelines.even_shard_bounds(n, p, count) for p in range(count)]
      assert bounds[0][0] == 0 and bounds[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
      sizes = [e - s for s, e in bounds]
      assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _stream(start_position, seed=0, stream=0, n=5, take=17, buffer=5):
  ds = pipelines.epoch_stream(tf.data.Dataset.range(n), n, seed=seed, stream=stream,
                              start_position=start_position, shuffle_buffer=buffer)
  return [int(x) for x in ds.take(take)]


def test_epoch_stream_epochs_permute_and_resume_exactly():
  full = _stream(0, take=20)
  for e in range(4):
    assert sorted(full[5 * e:5 * e + 5]) == list(range(5))
  assert len({tuple(full[5 * e:5 * e + 5]) for e in range(4)}) > 1  # reshuffled per epoch
  for start in (1, 5, 7, 13):
    assert _stream(start, take=20 - start) == full[start:]
  assert _stream(0, take=20) == full
  assert _stream(0, seed=1, take=20) != full
  assert _stream(0, stream=1, take=20) != full


def test_epoch_stream_small_buffer_still_covers_each_epoch():
  full = _stream(0, n=9, take=27, buffer=2)
  for e in range(3):
    assert sorted(full[9 * e:9 * e + 9]) == list(range(9))
  assert _stream(11, n=9, take=16, buffer=2) == full[11:]


def test_eval_num_batches():
  assert pipelines.eval_num_batches(11, 2, 2) == 3  # shards 6 + 5
  assert pipelines.eval_num_batches(10, 3, 3) == 2  # shards 4 + 3 + 3
  assert pipelines.eval_num_batches(0, 1, 4) == 1


def _window(h, w, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  return pipelines.crop_window(tf.constant(h), tf.constant(w), tf.constant(seed, tf.int64),
                               scale=scale, aspect_ratio_range=ratio,
                               max_attempts=10).numpy()


def test_crop_window_respects_scale_ratio_and_bounds():
  areas = []
  for i in range(40):
    y, x, h, w = _window(120, 200, [i, 7])
    assert 0 <= y and y + h <= 120 and 0 <= x and x + w <= 200
    areas.append(h * w / (120 * 200))
    if (h, w) != (105, 105):  # not the fallback
      assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
  assert min(areas) < 0.3 and max(areas) > 0.5  # spans the range
  # Seeded: the same seed gives the same window.
  np.testing.assert_array_equal(_window(120, 200, [3, 7]), _window(120, 200, [3, 7]))


def test_crop_window_falls_back_to_the_centre_square():
  # No 3:1 box covering the whole area fits a square image.
  np.testing.assert_array_equal(_window(64, 64, [1, 2], scale=(1.0, 1.0), ratio=(3.0, 3.0)),
                                [4, 4, 56, 56])
  np.testing.assert_array_equal(_window(40, 80, [1, 2], scale=(1.0, 1.0), ratio=(0.2, 0.2)),
                                [2, 22, 35, 35])


def test_multi_crop_views_shapes_and_independent_views():
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))
  crops = pipelines.MultiCrop(3, 12, (0.2, 1.0), 2, 6, (0.05, 0.2)).check()
  large, small = pipelines.multi_crop_views(image, tf.constant([0, 1], tf.int64), crops)
  assert large.shape == (3, 12, 12, 3) and small.shape == (2, 6, 6, 3)
  assert large.dtype == tf.uint8 and small.dtype == tf.uint8
  assert not np.array_equal(large[0], large[1])
  again, _ = pipelines.multi_crop_views(image, tf.constant([0, 1], tf.int64), crops)
  np.testing.assert_array_equal(large, again)
  none = pipelines.multi_crop_views(image, tf.constant([0, 1], tf.int64),
                                    crops._replace(num_small=0))[1]
  assert none.shape == (0, 6, 6, 3)


def test_element_seed_depends_on_every_input():
  base = pipelines.element_seed(1, 0, 0, tf.constant(5, tf.int64)).numpy()
  for args in ((2, 0, 0, 5), (1, 1, 0, 5), (1, 0, 1, 5), (1, 0, 0, 6), (1, 0, 0, 1 << 40)):
    other = pipelines.element_seed(*args[:3], tf.constant(args[3], tf.int64)).numpy()
    assert not np.array_equal(base, other), args


def test_multi_crop_check_rejects_bad_fields():
  for fields, match in ((dict(num_large=0), "num_large"), (dict(num_small=-1), "num_small"),
                        (dict(large_scale=(0.0, 1.0)), "large_scale"),
                        (dict(small_scale=(0.5,)), "small_scale"),
                        (dict(max_attempts=0), "max_attempts"),
                        (dict(antialias=1), "antialias")):
    with pytest.raises(ValueError, match=match):
      pipelines.MultiCrop(**fields).check()


def _reference_views(image, seed, crops):
  """Each view: its box from `crop_window` (tested above) with the per-view seeds, cut in
  numpy, resized by `tf.image.resize` in float32, then rounded and clipped to [0, 255]."""
  seeds = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64),
                                                 crops.num_large + crops.num_small)
  views = []
  for v in range(crops.num_large + crops.num_small):
    large = v < crops.num_large
    y, x, h, w = pipelines.crop_window(
        tf.constant(image.shape[0]), tf.constant(image.shape[1]), seeds[v],
        scale=crops.large_scale if large else crops.small_scale,
        aspect_ratio_range=crops.aspect_ratio_range, max_attempts=crops.max_attempts).numpy()
    size = crops.large_size if large else crops.small_size
    out = tf.image.resize(image[y:y + h, x:x + w].astype(np.float32), [size, size],
                          method="bicubic", antialias=crops.antialias).numpy()
    views.append(np.clip(np.round(out), 0, 255).astype(np.uint8))
  return np.stack(views[:crops.num_large]), np.stack(views[crops.num_large:])


def test_multi_crop_views_are_the_resized_boxes_with_saturated_values():
  # A 0/255 checkerboard: bicubic overshoots below 0 and above 255, so a view that wrapped
  # instead of clipping would differ from the reference (and both extremes must appear).
  yy, xx = np.mgrid[:60, :80]
  image = np.repeat((((yy // 3 + xx // 3) % 2) * 255).astype(np.uint8)[..., None], 3, -1)
  image[..., 1] = 255 - image[..., 1]
  crops = pipelines.MultiCrop(2, 24, (0.1, 1.0), 2, 40, (0.05, 0.2)).check()
  assert crops.antialias is False  # the default since issue #20 (BYOL/SimCLR's resize)
  for antialias in (False, True):  # True: the pipeline before issue #20
    crops = crops._replace(antialias=antialias)
    large, small = pipelines.multi_crop_views(tf.constant(image), tf.constant([4, 2], tf.int64),
                                              crops)
    ref_large, ref_small = _reference_views(image, [4, 2], crops)
    np.testing.assert_array_equal(large.numpy(), ref_large)
    np.testing.assert_array_equal(small.numpy(), ref_small)
    assert large.numpy().min() == 0 and large.numpy().max() == 255
  # The switch is real: downsampling a 3-pixel checkerboard aliases without the filter.
  aliased = pipelines.multi_crop_views(tf.constant(image), tf.constant([4, 2], tf.int64),
                                       crops._replace(antialias=False))[0].numpy()
  assert not np.array_equal(aliased, large.numpy())


def test_resize_uint8_upsampling_ignores_antialias():
  rng = np.random.default_rng(3)
  for shape, size in (((7, 9, 3), 16), ((30, 40, 3), 96)):
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    with_filter = pipelines.resize_uint8(image, size, antialias=True).numpy().astype(int)
    plain = pipelines.resize_uint8(image, size, antialias=False).numpy().astype(int)
    assert np.abs(with_filter - plain).max() <= 1
  # Downsampling differs: the filter averages 1-pixel stripes to grey (away from the border,
  # where the renormalised kernel is lopsided); the plain kernel samples them.
  stripes = np.repeat((np.arange(64) % 2 * 255).astype(np.uint8)[None, :, None], 64, 0)
  stripes = np.repeat(stripes, 3, -1)
  grey = pipelines.resize_uint8(stripes, 20, antialias=True).numpy()[:, 2:-2]
  assert np.abs(grey.astype(int) - 128).max() <= 2
  plain = pipelines.resize_uint8(stripes, 20, antialias=False).numpy()[:, 2:-2]
  assert np.abs(plain.astype(int) - 128).max() > 50
