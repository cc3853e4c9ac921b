"""ImageNet tf.data pipelines: the paper's 1 % / 10 % semi-supervised setup, and evaluation.

Data comes from tfds: `imagenet2012` (train: the unlabelled pool, *all* 1,281,167 images, the
labelled ones included; validation: evaluation) and `imagenet2012_subset/1pct`, `/10pct` (train:
the labelled images, the SimCLR label splits the paper uses). Both need ImageNet's manual
download prepared in the tfds data directory beforehand (`tfds build imagenet2012` and
`tfds build imagenet2012_subset` with the tarballs in `<data_dir>/downloads/manual/`).

Each host reads only its own contiguous shard of every split (`tfds.split_for_jax_process` with
explicit `process_index` / `process_count`), so hosts never read the same record. Images are
read undecoded, shuffled, and decoded after the shuffle (the shuffle buffer holds JPEG bytes, and
skipping on resume costs no decoding). Training batches carry the multi-crop views, each a
random-resized crop of the full decoded image (see `pipelines.py`); evaluation batches the
usual resize-256 / centre-crop-224 images. The kNN bank is the labelled subset the run was
given (`imagenet_knn_bank`), never more labels than that.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from semppl_jax import checks
from semppl_jax.data import pipelines

TRAIN_DATASET = "imagenet2012"
SUBSET_DATASET = "imagenet2012_subset"
SPLIT_PERCENTS = (1, 10)


def imagenet_semi_supervised(split_percent: int, *, labelled_batch_size: int,
                             unlabelled_batch_size: int, seed: int, process_index: int = 0,
                             process_count: int = 1, data_dir: str | None = None,
                             start_step: int = 0, shuffle_buffer: int = 10_000,
                             num_large: int = 4, large_size: int = 224,
                             large_scale: tuple[float, float] = (0.08, 1.0),
                             num_small: int = 2, small_size: int = 96,
                             small_scale: tuple[float, float] = (0.08, 1.0),
                             aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                             max_attempts: int = 10,
                             antialias: bool = False) -> tf.data.Dataset:
  """Endless semi-supervised ImageNet batches of multi-crop views, for this host.

  Every view is a random-resized crop of the full decoded image (area fraction ~ U(scale),
  aspect ratio in `aspect_ratio_range`, centred-square fallback), resized to its view size;
  flips and colour augmentations are left to the device.

  Args:
    split_percent: 1 or 10 (`imagenet2012_subset/1pct` or `/10pct` as the labelled set).
    labelled_batch_size: global B_l (divisible by `process_count`).
    unlabelled_batch_size: global B_u (divisible by `process_count`).
    seed: data-order and crop seed (non-negative int).
    process_index, process_count: this host and the number of hosts; each host reads a
      disjoint shard of both streams.
    data_dir: tfds data directory (None: tfds' default).
    start_step: global step to start from; the result equals the `start_step=0` pipeline
      with its first `start_step` batches dropped (same images, same crops).
    shuffle_buffer: records per stream in the shuffle buffer (capped at the shard size). The
      tfds record order is already shuffled once at preparation time.
    num_large, large_size, large_scale: L large views per image, their side, their area range.
    num_small, small_size, small_scale: S small views, their side, their area range.
    aspect_ratio_range: (low, high) width / height of the crop boxes.
    max_attempts: boxes tried before the centred-square fallback.
    antialias: smooth crops before shrinking them (`pipelines.MultiCrop.antialias`; ~2.8x the
      host CPU per image).

  Returns:
    tf.data.Dataset of dicts `labelled_large` uint8 `[b_l, L, Hl, Hl, 3]`, `labelled_small`
    uint8 `[b_l, S, Hs, Hs, 3]`, `labels` int32 `[b_l]`, `unlabelled_large` uint8
    `[b_u, L, Hl, Hl, 3]`, `unlabelled_small` uint8 `[b_u, S, Hs, Hs, 3]`,
    `unlabelled_labels` int32 `[b_u]` (true labels of the unlabelled images, for monitoring
    only), with `b = B / process_count`, `Hl = large_size`, `Hs = small_size`. Iterate with
    `tfds.as_numpy(ds)` for numpy batches.

  Raises:
    ValueError: naming a bad argument.
    FileNotFoundError: the tfds data is not prepared in `data_dir`.
  """
  _check_percent(split_percent)
  crops = pipelines.MultiCrop(num_large, large_size, large_scale, num_small, small_size,
                              small_scale, aspect_ratio_range, max_attempts,
                              antialias).check()
  checks.check_int("seed", seed, 0)
  checks.check_int("start_step", start_step, 0)
  checks.check_int("shuffle_buffer", shuffle_buffer, 1)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   labelled_batch_size=labelled_batch_size,
                                   unlabelled_batch_size=unlabelled_batch_size)
  labelled, num_labelled = _host_records(_subset_name(split_percent), "train", data_dir,
                                         process_index, process_count)
  unlabelled, num_unlabelled = _host_records(TRAIN_DATASET, "train", data_dir, process_index,
                                             process_count)
  return pipelines.semi_supervised_dataset(
      labelled, num_labelled, unlabelled, num_unlabelled, decode_fn=pipelines.decode_full,
      crops=crops, labelled_batch_size=host["labelled_batch_size"],
      unlabelled_batch_size=host["unlabelled_batch_size"], seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, process_index=process_index)


def imagenet_eval(*, batch_size: int, image_size: int = 224, process_index: int = 0,
                  process_count: int = 1, split: str = "validation",
                  data_dir: str | None = None, central_fraction: float = 0.875
                  ) -> tf.data.Dataset:
  """Fixed-shape ImageNet evaluation batches for this host, every example exactly once.

  Each host reads its contiguous shard of `split`; every host yields the same number of
  batches, `ceil(ceil(N / P) / b)`, the tail padded with masked rows.

  Args:
    batch_size: global batch size (divisible by `process_count`); b = batch_size / P per host.
    image_size: side S of the centred crop (the usual protocol: shorter side to S / 0.875,
      centre crop S).
    process_index, process_count: this host and the number of hosts.
    split: tfds split of `imagenet2012` ('validation', or e.g. 'train[:10000]').
    data_dir: tfds data directory.
    central_fraction: share of the shorter side kept.

  Returns:
    finite tf.data.Dataset of dicts `images` uint8 `[b, S, S, 3]`, `labels` int32 `[b]` (-1 on
    padding), `mask` bool `[b]` (False on padding).

  Raises:
    ValueError: naming a bad argument.
    FileNotFoundError: the tfds data is not prepared in `data_dir`.
  """
  pipelines.check_image_args(image_size, central_fraction)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   batch_size=batch_size)
  return _eval(TRAIN_DATASET, split, data_dir, image_size, central_fraction,
               host["batch_size"], process_index, process_count)


def imagenet_knn_bank(split_percent: int, *, batch_size: int, image_size: int = 224,
                      process_index: int = 0, process_count: int = 1,
                      data_dir: str | None = None, central_fraction: float = 0.875
                      ) -> tf.data.Dataset:
  """Evaluation batches of the labelled subset a run was given: its kNN bank.

  The bank is exactly `imagenet2012_subset/{split_percent}pct` (train), the images whose labels
  the run trained with, so kNN evaluation never uses more labels than the run had. Same
  preprocessing, sharding and padding as `imagenet_eval`.

  Args:
    split_percent: the run's label split, 1 or 10.
    batch_size, image_size, process_index, process_count, data_dir, central_fraction: as for
      `imagenet_eval`.

  Returns:
    finite tf.data.Dataset of dicts `images` uint8 `[b, S, S, 3]`, `labels` int32 `[b]` (-1 on
    padding), `mask` bool `[b]` (False on padding).

  Raises:
    ValueError: naming a bad argument.
    FileNotFoundError: the tfds data is not prepared in `data_dir`.
  """
  _check_percent(split_percent)
  pipelines.check_image_args(image_size, central_fraction)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   batch_size=batch_size)
  return _eval(_subset_name(split_percent), "train", data_dir, image_size, central_fraction,
               host["batch_size"], process_index, process_count)


def _check_percent(split_percent) -> None:
  if split_percent not in SPLIT_PERCENTS:
    raise ValueError(f"split_percent must be one of {SPLIT_PERCENTS}, got {split_percent!r}")


def _subset_name(split_percent: int) -> str:
  return f"{SUBSET_DATASET}/{split_percent}pct"


def _eval(name, split, data_dir, image_size, central_fraction, host_batch_size,
          process_index, process_count) -> tf.data.Dataset:
  """Padded centre-crop batches of this host's shard of `name`'s `split`."""
  records, num_host = _host_records(name, split, data_dir, process_index, process_count)
  num_examples = _num_examples(name, split, data_dir)
  return pipelines.eval_dataset(
      records, num_host, num_examples,
      preprocess_fn=lambda b: pipelines.decode_center_crop(b, image_size, central_fraction),
      image_size=image_size, batch_size=host_batch_size, process_count=process_count)


def _load(name: str, split, data_dir: str | None) -> tf.data.Dataset:
  """Undecoded tfds records in their stored order."""
  try:
    return tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False,
                     decoders={"image": tfds.decode.SkipDecoding()})
  except AssertionError as e:
    # tfds signals "not prepared" with an AssertionError; say what to do instead.
    raise FileNotFoundError(
        f"tfds dataset {name} is not prepared in data_dir={data_dir!r}: ImageNet needs a "
        f"manual download (put the ILSVRC2012 tarballs in <data_dir>/downloads/manual and run "
        f"`tfds build {name.split('/')[0]}`). tfds said: {e}") from e


def _host_records(name: str, split: str, data_dir: str | None, process_index: int,
                  process_count: int) -> tuple[tf.data.Dataset, int]:
  """This host's `(jpeg bytes, int64 label)` records and their number."""
  host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                          process_count=process_count)
  ds = _load(name, host_split, data_dir)
  num = int(ds.cardinality())
  if num < 1:
    raise ValueError(f"{name} split {split!r} gives host {process_index} of {process_count} "
                     f"no examples (cardinality {num}); expected at least one")
  return ds.map(lambda ex: (ex["image"], ex["label"])), num


def _num_examples(name: str, split: str, data_dir: str | None) -> int:
  """Size of a whole split; tfds knows it from its metadata without reading records."""
  num = int(_load(name, split, data_dir).cardinality())
  if num < 0:
    raise ValueError(f"{name} split {split!r} has unknown size; expected a tfds split with "
                     f"recorded cardinality")
  return num
