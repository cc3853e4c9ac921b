"""Shared tf.data pieces for the file-based pipelines (ImageNet, image folders).

The host only decodes, crops a centred square and resizes it to a fixed `image_size`, so that
every batch has a static shape. The random-resized crops, flips and colour augmentations of the
multi-crop views are pure JAX functions on device (semppl_jax.augmentations): doing the random
crop on the host as well would fix one crop per image, while SemPPL needs several independent
views of the same image.

Training streams are endless and resumable: epoch `e` of a host's shard is the shard's records
shuffled with a seed derived from `(seed, stream, e)`, and a pipeline started at step `s` skips
straight to epoch `s*b // n` and position `s*b % n` in it, reading (but not decoding) only the
records of that one epoch. Orders depend only on these seeds (and on TensorFlow's global seed,
which this library never sets).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

# Keeps the seeds of different streams and epochs apart (primes, no meaning beyond that).
_SEED_STRIDE = 1_000_003
_STREAM_STRIDE = 7_919
_MAX_EPOCHS = 1 << 40


def center_window(height: tf.Tensor, width: tf.Tensor, central_fraction: float) -> tf.Tensor:
  """int32 `[4]` crop window `[y, x, side, side]`: the centred square of side
  `max(1, floor(min(height, width) * central_fraction))`."""
  shorter = tf.minimum(height, width)
  side = tf.maximum(1, tf.cast(tf.cast(shorter, tf.float32) * central_fraction, tf.int32))
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def decode_center_crop(image_bytes: tf.Tensor, image_size: int,
                       central_fraction: float = 1.0) -> tf.Tensor:
  """Decodes an encoded image and returns its resized central square.

  Equivalent to "resize the shorter side to `image_size / central_fraction`, then centre-crop
  `image_size`", but crops first: JPEGs are decoded only inside the window (cheaper; as in the
  usual ImageNet pipelines, with chroma-subsampled JPEGs the window's outermost pixel columns
  can differ slightly from decode-then-crop, because chroma upsampling does not see pixels
  outside the window).

  Args:
    image_bytes: tf.string scalar, a JPEG, PNG, GIF or BMP file.
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
  resized = tf.image.resize(crop, [image_size, image_size], method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


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
                            read_fn: Callable[[tf.Tensor], tf.Tensor], image_size: int,
                            central_fraction: float, labelled_batch_size: int,
                            unlabelled_batch_size: int, seed: int, start_step: int,
                            shuffle_buffer: int) -> tf.data.Dataset:
  """Zips a labelled and an unlabelled endless stream into the semi-supervised batch dicts.

  Args:
    labelled, unlabelled: this host's finite record datasets of `(source, label)` pairs, in a
      fixed order; `read_fn(source)` gives the encoded image bytes (identity for tfds records,
      `tf.io.read_file` for paths).
    num_labelled, num_unlabelled: their sizes.
    read_fn: see above.
    image_size, central_fraction: as in `decode_center_crop`.
    labelled_batch_size, unlabelled_batch_size: host-local batch sizes b_l, b_u.
    seed: base seed; the streams use ids 0 (labelled) and 1 (unlabelled).
    start_step: first step; each stream skips `start_step * b` elements.
    shuffle_buffer: shuffle buffer of each stream.

  Returns:
    endless dataset of dicts `labelled_images` uint8 `[b_l, S, S, 3]`, `labels` int32
    `[b_l]`, `unlabelled_images` uint8 `[b_u, S, S, 3]`, `unlabelled_labels` int32 `[b_u]`.

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
    ds = epoch_stream(records, n, seed=seed, stream=stream, start_position=start_step * b,
                      shuffle_buffer=shuffle_buffer)
    ds = ds.map(lambda source, label: (decode_center_crop(read_fn(source), image_size,
                                                          central_fraction),
                                       tf.cast(label, tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    streams.append(ds.batch(b, drop_remainder=True))
  ds = tf.data.Dataset.zip((streams[0], streams[1])).map(
      lambda lab, unlab: {"labelled_images": lab[0], "labels": lab[1],
                          "unlabelled_images": unlab[0], "unlabelled_labels": unlab[1]})
  return ds.prefetch(tf.data.AUTOTUNE).with_options(deterministic_options())


def eval_dataset(records: tf.data.Dataset, num_host_examples: int, num_examples: int, *,
                 read_fn: Callable[[tf.Tensor], tf.Tensor], image_size: int,
                 central_fraction: float, batch_size: int, process_count: int
                 ) -> tf.data.Dataset:
  """Fixed-shape evaluation batches of this host's shard, padded to a host-independent count.

  Args:
    records: this host's `(source, label)` records (`num_host_examples` of them).
    num_host_examples: their number.
    num_examples: size of the whole split (all hosts).
    read_fn, image_size, central_fraction: as in `semi_supervised_dataset`.
    batch_size: host-local batch size b.
    process_count: number of hosts (every host yields `eval_num_batches(...)` batches).

  Returns:
    finite dataset of dicts `images` uint8 `[b, S, S, 3]`, `labels` int32 `[b]` (-1 on
    padding), `mask` bool `[b]` (False on padding).
  """
  num_batches = eval_num_batches(num_examples, process_count, batch_size)
  examples = records.map(
      lambda source, label: {"images": decode_center_crop(read_fn(source), image_size,
                                                          central_fraction),
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
  check_int("process_count", process_count, 1)
  check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  host = {}
  for name, size in batch_sizes.items():
    check_int(name, size, 1)
    if size % process_count:
      raise ValueError(f"{name} must be divisible by process_count={process_count}, "
                       f"got {size}")
    host[name] = size // process_count
  return host


def check_image_args(image_size: int, central_fraction: float, seed: int | None = None,
                     start_step: int | None = None) -> None:
  """Validates the common preprocessing/seed arguments (ValueError naming them)."""
  check_int("image_size", image_size, 1)
  if not 0.0 < central_fraction <= 1.0:
    raise ValueError(f"central_fraction must lie in (0, 1], got {central_fraction}")
  if seed is not None:
    check_int("seed", seed, 0)
  if start_step is not None:
    check_int("start_step", start_step, 0)


def check_int(name: str, value, minimum: int) -> None:
  """Raises ValueError naming `name` unless `value` is an int >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
