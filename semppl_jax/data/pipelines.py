"""Shared tf.data pieces for the file-based pipelines (ImageNet, image folders).

Training (multi-crop views on the host). Every view of an image is a random-resized crop of the
*full* decoded image, as in BYOL/SimCLR: a box of area fraction ~ U(scale) and aspect ratio in
`aspect_ratio_range` (`tf.image.stateless_sample_distorted_bounding_box`), falling back to a
centred square when no box fits after `max_attempts` tries; only the box is then resized to the
view's side. Cropping before any resize means off-centre content is seen and a small-scale crop
keeps the pixels it covers (a 0.08-scale crop of a 500 px image is ~140 px, not the ~63 px it
would be in a 224 px pre-resized copy). Flips and photometric augmentations stay on device.
The resize is bicubic without antialiasing, as in the BYOL/SimCLR input pipelines: the
antialiased one (`MultiCrop.antialias=True`, the behaviour before issue #20) costs ~2.8x the
host CPU per image (BENCHMARKS.md, "Host input pipeline").

Evaluation: decode, centred square (`central_fraction` of the shorter side), resize.

Training streams are endless and resumable: epoch `e` of a host's shard is the shard's records
shuffled with a seed derived from `(seed, stream, e)`, and a pipeline started at step `s` skips
straight to epoch `s*b // n` and position `s*b % n` in it, reading (but not decoding) only the
records of that one epoch. The crops of the element at stream position `i` use the stateless
seed `fold_in(fold_in(fold_in([seed, stream], process_index), i))`, so the batch of step `k` is
a function of `(seed, k, process_index)` alone and a resumed run sees the same crops. Orders
depend only on these seeds (and on TensorFlow's global seed, which this library never sets).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

from semppl_jax import checks

# Keeps the seeds of different streams and epochs apart (primes, no meaning beyond that).
_SEED_STRIDE = 1_000_003
_STREAM_STRIDE = 7_919
_MAX_EPOCHS = 1 << 40
# Centred square used when no random box fits (the evaluation crop's share, as BYOL/SimCLR).
FALLBACK_CENTRAL_FRACTION = 0.875


class MultiCrop(NamedTuple):
  """The host-side crops of each training image (docs/design.md §2, Views).

  Attributes:
    num_large: L >= 1 large views per image.
    large_size: their side in pixels.
    large_scale: (low, high) area fraction of the full image covered by a large view's box.
    num_small: S >= 0 small views per image.
    small_size: their side.
    small_scale: (low, high) area fraction for small views.
    aspect_ratio_range: (low, high) width / height of the boxes.
    max_attempts: boxes tried before falling back to the centred square.
    antialias: resize a box that is larger than the view with an antialiasing (widened)
      bicubic kernel. False (default): plain bicubic (Keys, a = -0.5, half-pixel centres),
      as the BYOL/SimCLR pipelines; boxes smaller than the view are upsampled the same way
      either way (up to float rounding: values within 1).
  """
  num_large: int = 4
  large_size: int = 224
  large_scale: tuple[float, float] = (0.08, 1.0)
  num_small: int = 2
  small_size: int = 96
  small_scale: tuple[float, float] = (0.08, 1.0)
  aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3)
  max_attempts: int = 10
  antialias: bool = False

  def check(self) -> "MultiCrop":
    """Validates the fields; returns self with ranges as float tuples.

    Raises:
      ValueError: naming the field and the expected value.
    """
    checks.check_int("num_large", self.num_large, 1)
    checks.check_int("num_small", self.num_small, 0)
    checks.check_int("large_size", self.large_size, 1)
    checks.check_int("small_size", self.small_size, 1)
    checks.check_int("max_attempts", self.max_attempts, 1)
    if not isinstance(self.antialias, bool):
      raise ValueError(f"antialias must be a bool, got {self.antialias!r}")
    ranges = {}
    for name, upper in (("large_scale", 1.0), ("small_scale", 1.0),
                        ("aspect_ratio_range", None)):
      value = getattr(self, name)
      try:
        low, high = (float(v) for v in value)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from e
      if not 0.0 < low <= high or (upper is not None and high > upper):
        bound = f"0 < low <= high <= {upper}" if upper else "0 < low <= high"
        raise ValueError(f"{name} must satisfy {bound}, got {value!r}")
      ranges[name] = (low, high)
    return self._replace(**ranges)


def center_window(height: tf.Tensor, width: tf.Tensor, central_fraction: float) -> tf.Tensor:
  """int32 `[4]` crop window `[y, x, side, side]`: the centred square of side
  `max(1, floor(min(height, width) * central_fraction))`."""
  shorter = tf.minimum(height, width)
  side = tf.maximum(1, tf.cast(tf.cast(shorter, tf.float32) * central_fraction, tf.int32))
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, *,
                scale: tuple[float, float], aspect_ratio_range: tuple[float, float],
                max_attempts: int) -> tf.Tensor:
  """int32 `[4]` window `[y, x, h, w]` of a random-resized crop of a `height x width` image.

  Area fraction ~ U(scale) of the whole image and aspect ratio (w / h) in
  `aspect_ratio_range`, sampled statelessly from `seed` by
  `tf.image.stateless_sample_distorted_bounding_box` (the whole image is the "object", so its
  `min_object_covered` is `scale[0]`, the same bound). When no box fits in `max_attempts`
  tries that op returns the whole image; we return the centred square of side
  `FALLBACK_CENTRAL_FRACTION * min(height, width)` instead, as BYOL does (a legitimately drawn
  whole-image box is treated the same way: it can only occur when `scale[1]` is 1).

  Args:
    height, width: int32 scalars, the image size.
    seed: int `[2]` stateless seed.
    scale, aspect_ratio_range, max_attempts: see above.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      min_object_covered=scale[0], aspect_ratio_range=aspect_ratio_range, area_range=scale,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  failed = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  return tf.where(failed, center_window(height, width, FALLBACK_CENTRAL_FRACTION),
                  tf.stack([begin[0], begin[1], size[0], size[1]]))


def resize_uint8(image: tf.Tensor, size: int, method: str = "bicubic",
                 antialias: bool = True) -> tf.Tensor:
  """Resizes an image `[H, W, 3]` to uint8 `[size, size, 3]`, rounded and clipped to [0, 255].

  `antialias=True` widens the kernel by the downsampling factor; `antialias=False` samples
  the plain `method` kernel at half-pixel centres. Upsampling is the same either way (values
  within 1, float rounding).
  """
  # Cast first: TF's resize kernels are faster on float32 than on uint8 input (measured,
  # experiments/bench_input.py).
  resized = tf.image.resize(tf.cast(image, tf.float32), [size, size], method=method,
                            antialias=antialias)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def element_seed(seed: int, stream: int, process_index: int, position: tf.Tensor) -> tf.Tensor:
  """int64 `[2]` stateless seed of the element at `position` of a host's stream."""
  base = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, stream], tf.int64), tf.constant(process_index, tf.int64))
  return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def multi_crop_views(image: tf.Tensor, seed: tf.Tensor, crops: MultiCrop
                     ) -> tuple[tf.Tensor, tf.Tensor]:
  """The L large and S small random-resized crops of one decoded image.

  Every view's box is sampled from the full image (`crop_window`, independent seeds split
  from `seed`) and only that box is resized (bicubic; antialiased if `crops.antialias`).

  Args:
    image: uint8 `[H, W, 3]`, the full decoded image.
    seed: int `[2]` stateless seed of this image.
    crops: a checked `MultiCrop`.

  Returns:
    large uint8 `[L, large_size, large_size, 3]`, small uint8 `[S, small_size, small_size, 3]`.
  """
  shape = tf.shape(image)
  seeds = tf.random.experimental.stateless_split(seed, crops.num_large + crops.num_small)

  def views(first, count, size, scale):
    out = []
    for v in range(first, first + count):
      y, x, h, w = tf.unstack(crop_window(shape[0], shape[1], seeds[v], scale=scale,
                                          aspect_ratio_range=crops.aspect_ratio_range,
                                          max_attempts=crops.max_attempts))
      out.append(resize_uint8(image[y:y + h, x:x + w], size, antialias=crops.antialias))
    if not out:
      return tf.zeros([0, size, size, 3], tf.uint8)
    return tf.stack(out)

  return (views(0, crops.num_large, crops.large_size, crops.large_scale),
          views(crops.num_large, crops.num_small, crops.small_size, crops.small_scale))


def decode_full(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes a whole JPEG, PNG, GIF (first frame), BMP or WebP file to uint8 `[H, W, 3]`.

  Training decodes each image once in full and cuts all its views from that: with several
  views per image, covering on average much of it, one full decode is cheaper than one
  `decode_and_crop_jpeg` per view.
  """
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_center_crop(image_bytes: tf.Tensor, image_size: int,
                       central_fraction: float = 1.0) -> tf.Tensor:
  """Decodes an encoded image and returns its resized central square.

  Equivalent to "resize the shorter side to `image_size / central_fraction`, then centre-crop
  `image_size`", but crops first: JPEGs are decoded only inside the window (cheaper; as in the
  usual ImageNet pipelines, with chroma-subsampled JPEGs the window's outermost pixel columns
  can differ slightly from decode-then-crop, because chroma upsampling does not see pixels
  outside the window).

  Args:
    image_bytes: tf.string scalar, a JPEG, PNG, GIF, BMP or WebP file.
    image_size: output side S.
    central_fraction: share of the shorter side kept, in (0, 1].

  Returns:
    uint8 `[S, S, 3]` (grayscale and RGBA inputs are converted to RGB).
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = center_window(shape[0], shape[1], central_fraction)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = tf.unstack(center_window(shape[0], shape[1], central_fraction))
    return image[y:y + h, x:x + w]

  crop = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  crop.set_shape([None, None, 3])
  return resize_uint8(crop, image_size, method="bilinear")


def center_crop_resize(image: tf.Tensor, image_size: int, central_fraction: float = 1.0
                       ) -> tf.Tensor:
  """The centred square (`central_fraction` of the shorter side) of a decoded image `[H, W,
  3]`, resized to uint8 `[S, S, 3]` (bilinear, antialiased, as `decode_center_crop`)."""
  shape = tf.shape(image)
  y, x, h, w = tf.unstack(center_window(shape[0], shape[1], central_fraction))
  return resize_uint8(image[y:y + h, x:x + w], image_size, method="bilinear")


def epoch_stream(records: tf.data.Dataset, num_records: int, *, seed: int, stream: int,
                 start_position: int, shuffle_buffer: int) -> tf.data.Dataset:
  """An endless, seeded, resumable stream of `records` (one shuffled epoch after another).

  Args:
    records: a finite dataset of `num_records` elements in a fixed order.
    num_records: its size (> 0).
    seed: base seed.
    stream: stream id (labelled and unlabelled streams use different ids).
    start_position: number of stream elements to skip (resume point).
    shuffle_buffer: shuffle buffer size; capped at `num_records` (which gives a full shuffle).

  Returns:
    The stream from `start_position` on.
  """
  buffer = max(1, min(shuffle_buffer, num_records))
  start_epoch, offset = divmod(start_position, num_records)

  def one_epoch(epoch):
    epoch_seed = (tf.constant(seed, tf.int64) * _SEED_STRIDE + stream * _STREAM_STRIDE + epoch)
    return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  epochs = tf.data.Dataset.range(start_epoch, start_epoch + _MAX_EPOCHS)
  return epochs.flat_map(one_epoch).skip(offset)


def even_shard_bounds(num_examples: int, process_index: int, process_count: int
                      ) -> tuple[int, int]:
  """`[start, end)` of host `process_index`'s contiguous shard (sizes differ by at most one,
  the first `num_examples % process_count` hosts getting one more, as `tfds.even_splits`)."""
  base, extra = divmod(num_examples, process_count)
  start = base * process_index + min(process_index, extra)
  return start, start + base + (1 if process_index < extra else 0)


def eval_num_batches(num_examples: int, process_count: int, host_batch_size: int) -> int:
  """Batches every host yields so that the largest host shard (`ceil(N / P)`) fits."""
  largest_shard = -(-num_examples // process_count)
  return max(1, -(-largest_shard // host_batch_size))


def padded_eval_batches(examples: tf.data.Dataset, num_examples: int, num_batches: int,
                        batch_size: int, image_size: int) -> tf.data.Dataset:
  """Batches `examples` (dicts `images`, `labels`) into exactly `num_batches` batches of
  `batch_size`, adding `mask` (False on padding: zero images, label -1)."""
  padding = num_batches * batch_size - num_examples
  real = examples.map(lambda ex: {**ex, "mask": tf.constant(True)})
  pad = tf.data.Dataset.from_tensors({
      "images": tf.zeros([image_size, image_size, 3], tf.uint8),
      "labels": tf.constant(-1, tf.int32),
      "mask": tf.constant(False),
  }).repeat(padding)
  return real.concatenate(pad).batch(batch_size, drop_remainder=True)


def semi_supervised_dataset(labelled: tf.data.Dataset, num_labelled: int,
                            unlabelled: tf.data.Dataset, num_unlabelled: int, *,
                            decode_fn: Callable[[tf.Tensor], tf.Tensor], crops: MultiCrop,
                            labelled_batch_size: int, unlabelled_batch_size: int, seed: int,
                            start_step: int, shuffle_buffer: int, process_index: int
                            ) -> tf.data.Dataset:
  """Zips a labelled and an unlabelled endless stream into batches of multi-crop views.

  Args:
    labelled, unlabelled: this host's finite record datasets of `(source, label)` pairs, in a
      fixed order; `decode_fn(source)` gives the full decoded image, uint8 `[H, W, 3]`.
    num_labelled, num_unlabelled: their sizes.
    decode_fn: see above.
    crops: a checked `MultiCrop`.
    labelled_batch_size, unlabelled_batch_size: host-local batch sizes b_l, b_u.
    seed: base seed; the streams use ids 0 (labelled) and 1 (unlabelled).
    start_step: first step; each stream skips `start_step * b` elements.
    shuffle_buffer: shuffle buffer of each stream.
    process_index: this host (folded into the crop seeds).

  Returns:
    endless dataset of dicts `labelled_large` uint8 `[b_l, L, Hl, Hl, 3]`, `labelled_small`
    uint8 `[b_l, S, Hs, Hs, 3]`, `labels` int32 `[b_l]`, `unlabelled_large` uint8
    `[b_u, L, Hl, Hl, 3]`, `unlabelled_small` uint8 `[b_u, S, Hs, Hs, 3]`,
    `unlabelled_labels` int32 `[b_u]` (hidden labels, -1 = unknown), where
    `Hl = crops.large_size`, `Hs = crops.small_size`.

  Raises:
    ValueError: naming the batch size that exceeds this host's share of the data.
  """
  streams = []
  for stream, (records, n, b, name) in enumerate((
      (labelled, num_labelled, labelled_batch_size, "labelled_batch_size"),
      (unlabelled, num_unlabelled, unlabelled_batch_size, "unlabelled_batch_size"))):
    if n < 1 or b > n:
      raise ValueError(f"{name}: the host-local batch of {b} exceeds this host's {n} "
                       f"examples; expected at most {n}")
    start = start_step * b
    ds = epoch_stream(records, n, seed=seed, stream=stream, start_position=start,
                      shuffle_buffer=shuffle_buffer).enumerate(start=start)

    def views(position, record, stream=stream):
      source, label = record
      large, small = multi_crop_views(
          decode_fn(source), element_seed(seed, stream, process_index, position), crops)
      return large, small, tf.cast(label, tf.int32)

    ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    streams.append(ds.batch(b, drop_remainder=True))
  ds = tf.data.Dataset.zip((streams[0], streams[1])).map(
      lambda lab, unlab: {"labelled_large": lab[0], "labelled_small": lab[1], "labels": lab[2],
                          "unlabelled_large": unlab[0], "unlabelled_small": unlab[1],
                          "unlabelled_labels": unlab[2]})
  return ds.prefetch(tf.data.AUTOTUNE).with_options(deterministic_options())


def eval_dataset(records: tf.data.Dataset, num_host_examples: int, num_examples: int, *,
                 preprocess_fn: Callable[[tf.Tensor], tf.Tensor], image_size: int,
                 batch_size: int, process_count: int) -> tf.data.Dataset:
  """Fixed-shape evaluation batches of this host's shard, padded to a host-independent count.

  Args:
    records: this host's `(source, label)` records (`num_host_examples` of them).
    num_host_examples: their number.
    num_examples: size of the whole split (all hosts).
    preprocess_fn: `source` -> uint8 `[S, S, 3]` (e.g. `decode_center_crop`).
    image_size: S.
    batch_size: host-local batch size b.
    process_count: number of hosts (every host yields `eval_num_batches(...)` batches).

  Returns:
    finite dataset of dicts `images` uint8 `[b, S, S, 3]`, `labels` int32 `[b]` (-1 on
    padding), `mask` bool `[b]` (False on padding).
  """
  num_batches = eval_num_batches(num_examples, process_count, batch_size)
  examples = records.map(
      lambda source, label: {"images": preprocess_fn(source),
                             "labels": tf.cast(label, tf.int32)},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = padded_eval_batches(examples, num_host_examples, num_batches, batch_size, image_size)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(deterministic_options())


def deterministic_options() -> tf.data.Options:
  """tf.data options that keep the element order fixed whatever the parallelism."""
  options = tf.data.Options()
  options.deterministic = True
  return options


def check_host_args(*, process_index: int, process_count: int, **batch_sizes: int
                    ) -> dict[str, int]:
  """Validates host arguments and global batch sizes; returns the host-local batch sizes.

  Raises:
    ValueError: naming the argument, if a value is not a positive int, `process_index` is
      outside `[0, process_count)`, or a batch size is not divisible by `process_count`.
  """
  checks.check_int("process_count", process_count, 1)
  checks.check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  host = {}
  for name, size in batch_sizes.items():
    checks.check_int(name, size, 1)
    if size % process_count:
      raise ValueError(f"{name} must be divisible by process_count={process_count}, "
                       f"got {size}")
    host[name] = size // process_count
  return host


def check_image_args(image_size: int, central_fraction: float, seed: int | None = None,
                     start_step: int | None = None) -> None:
  """Validates the common preprocessing/seed arguments (ValueError naming them)."""
  checks.check_int("image_size", image_size, 1)
  if not 0.0 < central_fraction <= 1.0:
    raise ValueError(f"central_fraction must lie in (0, 1], got {central_fraction}")
  if seed is not None:
    checks.check_int("seed", seed, 0)
  if start_step is not None:
    checks.check_int("start_step", start_step, 0)
