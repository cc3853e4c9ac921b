"""ImageNet tf.data pipelines: the paper's 1 % / 10 % semi-supervised setup, and evaluation.

Data comes from tfds: `imagenet2012` (train: the unlabelled pool, *all* 1,281,167 images, the
labelled ones included; validation: evaluation) and `imagenet2012_subset/1pct`, `/10pct` (train:
the labelled images, the SimCLR label splits the paper uses). Both need ImageNet's manual
download prepared in the tfds data directory beforehand (`tfds build imagenet2012` and
`tfds build imagenet2012_subset` with the tarballs in `<data_dir>/downloads/manual/`).

Each host reads only its own contiguous shard of every split (`tfds.split_for_jax_process` with
explicit `process_index` / `process_count`), so hosts never read the same record. Images are
read undecoded, shuffled, and decoded after the shuffle (the shuffle buffer holds JPEG bytes, and
skipping on resume costs no decoding). Host preprocessing is decode + centred square crop +
resize to `image_size` only; see `pipelines.py` for why the random crops happen on device.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from semppl_jax.data import pipelines

TRAIN_DATASET = "imagenet2012"
SUBSET_DATASET = "imagenet2012_subset"
SPLIT_PERCENTS = (1, 10)


def imagenet_semi_supervised(split_percent: int, *, image_size: int = 224,
                             labelled_batch_size: int, unlabelled_batch_size: int, seed: int,
                             process_index: int = 0, process_count: int = 1,
                             data_dir: str | None = None, start_step: int = 0,
                             shuffle_buffer: int = 10_000, central_fraction: float = 1.0
                             ) -> tf.data.Dataset:
  """Endless semi-supervised ImageNet batches for this host.

  Args:
    split_percent: 1 or 10 (`imagenet2012_subset/1pct` or `/10pct` as the labelled set).
    image_size: side S of the host-side centred square crop.
    labelled_batch_size: global B_l (divisible by `process_count`).
    unlabelled_batch_size: global B_u (divisible by `process_count`).
    seed: data-order seed (non-negative int).
    process_index, process_count: this host and the number of hosts; each host reads a
      disjoint shard of both streams.
    data_dir: tfds data directory (None: tfds' default).
    start_step: global step to start from; the result equals the `start_step=0` pipeline
      with its first `start_step` batches dropped.
    shuffle_buffer: records per stream in the shuffle buffer (capped at the shard size). The
      tfds record order is already shuffled once at preparation time.
    central_fraction: share of the shorter side kept by the crop.

  Returns:
    tf.data.Dataset of dicts `labelled_images` uint8 `[b_l, S, S, 3]`, `labels` int32
    `[b_l]`, `unlabelled_images` uint8 `[b_u, S, S, 3]`, `unlabelled_labels` int32 `[b_u]`
    (true labels of the unlabelled images, for monitoring only), `b = B / process_count`.
    Iterate with `tfds.as_numpy(ds)` for numpy batches.

  Raises:
    ValueError: naming a bad argument.
    FileNotFoundError: the tfds data is not prepared in `data_dir`.
  """
  if split_percent not in SPLIT_PERCENTS:
    raise ValueError(f"split_percent must be one of {SPLIT_PERCENTS}, got {split_percent!r}")
  pipelines.check_image_args(image_size, central_fraction, seed, start_step)
  pipelines.check_int("shuffle_buffer", shuffle_buffer, 1)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   labelled_batch_size=labelled_batch_size,
                                   unlabelled_batch_size=unlabelled_batch_size)
  labelled, num_labelled = _host_records(f"{SUBSET_DATASET}/{split_percent}pct", "train",
                                         data_dir, process_index, process_count)
  unlabelled, num_unlabelled = _host_records(TRAIN_DATASET, "train", data_dir, process_index,
                                             process_count)
  return pipelines.semi_supervised_dataset(
      labelled, num_labelled, unlabelled, num_unlabelled, read_fn=lambda x: x,
      image_size=image_size, central_fraction=central_fraction,
      labelled_batch_size=host["labelled_batch_size"],
      unlabelled_batch_size=host["unlabelled_batch_size"], seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer)


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
  records, num_host = _host_records(TRAIN_DATASET, split, data_dir, process_index,
                                    process_count)
  num_examples = _num_examples(TRAIN_DATASET, split, data_dir)
  return pipelines.eval_dataset(records, num_host, num_examples, read_fn=lambda x: x,
                                image_size=image_size, central_fraction=central_fraction,
                                batch_size=host["batch_size"], process_count=process_count)


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
