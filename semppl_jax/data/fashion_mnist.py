"""Fashion-MNIST, the embedded default dataset: an IDX reader with tfds as fallback.

Without network the data comes from the Debian package `dataset-fashion-mnist`, which installs
the four original IDX files (gzip-compressed) under `/usr/share/datasets/fashion-mnist/`. Only
when those files are absent do we ask `tensorflow_datasets` for `fashion_mnist` (which needs
network or an already prepared tfds data directory).
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from semppl_jax.data import batching
from semppl_jax.data import splits

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
# Percentages of the committed label splits, and the committed validation split's size: 500
# train images per class, disjoint from both label splits.
LABEL_PERCENTS = (1, 10)
VALIDATION_SIZE = 5_000
# IDX file stems per split (the original distribution's names).
_FILE_STEMS = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_UBYTE = 0x08


def idx_file_paths(split: str, data_dir: str = DEFAULT_DATA_DIR) -> tuple[str, str]:
  """The (images, labels) IDX paths of a split, preferring `.gz` over uncompressed files.

  Args:
    split: 'train' or 'test'.
    data_dir: folder holding the IDX files.

  Returns:
    Two paths (they may not exist): `{train,t10k}-images-idx3-ubyte[.gz]` and
    `{train,t10k}-labels-idx1-ubyte[.gz]`.
  """
  _check_split(split)
  stem = _FILE_STEMS[split]
  paths = []
  for kind in ("images-idx3", "labels-idx1"):
    plain = os.path.join(data_dir, f"{stem}-{kind}-ubyte")
    paths.append(plain + ".gz" if os.path.exists(plain + ".gz") or not os.path.exists(plain)
                 else plain)
  return paths[0], paths[1]


def read_idx(path: str, expected_shape: tuple[int | None, ...]) -> np.ndarray:
  """Reads an unsigned-byte IDX file (optionally gzip-compressed).

  Args:
    path: the file; a name ending in `.gz` is decompressed.
    expected_shape: the dimensions the header must declare; `None` accepts any size for that
      axis. Its length is the expected number of dimensions.

  Returns:
    uint8 array of the declared shape.

  Raises:
    ValueError: naming the file and the expectation, if it is not valid gzip, the magic number
      is wrong, the dimensions differ from `expected_shape`, or the payload length differs from
      the product of the dimensions.
  """
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    # gzip.BadGzipFile is an OSError; truncated streams raise EOFError.
    raise ValueError(f"{path}: not a readable gzip-compressed IDX file ({e})") from e
  ndim = len(expected_shape)
  expected_magic = (_UBYTE << 8) | ndim
  if len(raw) < 4:
    raise ValueError(f"{path}: file too short for an IDX header (expected at least 4 bytes, "
                     f"got {len(raw)})")
  magic = int.from_bytes(raw[:4], "big")
  if magic != expected_magic:
    raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x}, expected "
                     f"0x{expected_magic:08x} (unsigned bytes, {ndim} dimensions)")
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(f"{path}: truncated IDX header (expected {header_len} bytes, "
                     f"got {len(raw)})")
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  for got, want in zip(dims, expected_shape):
    if want is not None and got != want:
      raise ValueError(f"{path}: IDX dimensions {dims}, expected "
                       f"{tuple('any' if w is None else w for w in expected_shape)}")
  payload = len(raw) - header_len
  if payload != int(np.prod(dims)):
    raise ValueError(f"{path}: IDX payload has {payload} bytes, expected "
                     f"{int(np.prod(dims))} for dimensions {dims}")
  return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def load_fashion_mnist(split: str, data_dir: str = DEFAULT_DATA_DIR
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Loads a Fashion-MNIST split into memory.

  Reads the IDX files in `data_dir`; only if a file of the split is missing falls back to
  `tfds.load('fashion_mnist')` (which downloads, so needs network or a prepared tfds data dir).

  Args:
    split: 'train' (60,000 examples) or 'test' (10,000 examples).
    data_dir: folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.

  Returns:
    images: uint8 `[N, 28, 28, 1]`, labels: int32 `[N]` in `[0, 10)`.

  Raises:
    ValueError: unknown split, or malformed IDX files (naming the file).
    FileNotFoundError: the IDX files are absent and tfds cannot provide the data either; the
      message names both ways to get it.
  """
  _check_split(split)
  n = NUM_EXAMPLES[split]
  images_path, labels_path = idx_file_paths(split, data_dir)
  missing = [p for p in (images_path, labels_path) if not os.path.exists(p)]
  if missing:
    return _load_from_tfds(split, missing)
  images = read_idx(images_path, (n, IMAGE_SHAPE[0], IMAGE_SHAPE[1]))
  labels = read_idx(labels_path, (n,))
  if labels.max() >= NUM_CLASSES:
    raise ValueError(f"{labels_path}: labels must lie in [0, {NUM_CLASSES}), found "
                     f"{int(labels.max())}")
  # frombuffer views are read-only; hand out owned, writable arrays.
  return images.reshape((n,) + IMAGE_SHAPE).copy(), labels.astype(np.int32)


def _load_from_tfds(split: str, missing: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """The tfds fallback, used only when IDX files are absent."""
  hint = (f"Fashion-MNIST '{split}' is unavailable: missing {', '.join(missing)}. Either install "
          f"the Debian package `dataset-fashion-mnist` (IDX files under {DEFAULT_DATA_DIR}) or "
          f"pass data_dir= a folder holding the IDX files; or make tfds `fashion_mnist` "
          f"available (network access for its download, or a prepared tfds data directory).")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FileNotFoundError(hint + f" (tensorflow_datasets is not importable: {e})") from e
  try:
    data = tfds.as_numpy(tfds.load("fashion_mnist", split=split, batch_size=-1))
  except Exception as e:  # pylint: disable=broad-except
    # Download errors come in many types (network, DNS, checksum); all mean the same here.
    raise FileNotFoundError(hint + f" (tfds failed: {type(e).__name__}: {e})") from e
  images = np.asarray(data["image"], dtype=np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = np.asarray(data["label"], dtype=np.int32)
  return images, labels


def _check_split(split: str) -> None:
  if split not in NUM_EXAMPLES:
    raise ValueError(f"split must be one of {sorted(NUM_EXAMPLES)}, got {split!r}")


def write_fashion_mnist_split_files(output_dir: str | None = None, *,
                                    data_dir: str = DEFAULT_DATA_DIR,
                                    percents: tuple[int, ...] = LABEL_PERCENTS,
                                    seed: int = splits.DEFAULT_SEED,
                                    validation_size: int | None = VALIDATION_SIZE,
                                    validation_seed: int = splits.VALIDATION_SEED
                                    ) -> list[str]:
  """Regenerates the committed Fashion-MNIST split files from the train labels.

  Args:
    output_dir: where to write; defaults to the package's `splits/` folder.
    data_dir: Fashion-MNIST IDX folder (default: the Debian package's).
    percents: which label splits to write.
    seed: label split selection seed.
    validation_size: size of the validation split, disjoint from all `percents` splits;
      None writes none.
    validation_seed: its selection seed.

  Returns:
    The paths written: one per percent, then the validation file.
  """
  if output_dir is None:
    output_dir = splits.default_splits_dir()
  _, labels = load_fashion_mnist("train", data_dir)
  records = [splits.label_split_record("fashion_mnist", labels, p, seed, NUM_CLASSES)
             for p in percents]
  if validation_size is not None:
    records.append(splits.validation_split_record(
        "fashion_mnist", labels, validation_size, validation_seed, NUM_CLASSES, records))
  return [splits.write_split_file(r, output_dir) for r in records]


def fashion_mnist_validation(data_dir: str = DEFAULT_DATA_DIR
                             ) -> tuple[np.ndarray, np.ndarray]:
  """The committed validation split: held-out Fashion-MNIST *train* images.

  Use it (not the test split) to choose hyper-parameters, together with
  `fashion_mnist_semi_supervised(..., hold_out_validation=True)` so that the held-out images
  never reach training.

  Args:
    data_dir: the IDX folder.

  Returns:
    images uint8 `[5000, 28, 28, 1]`, labels int32 `[5000]` (500 per class).

  Raises:
    ValueError: the split file fails its checks or does not match the loaded labels.
  """
  images, labels = load_fashion_mnist("train", data_dir)
  indices = splits.load_validation_split("fashion_mnist", labels)
  return images[indices], labels[indices]


def fashion_mnist_semi_supervised(percent: int, *, labelled_batch_size: int,
                                  unlabelled_batch_size: int, seed: int,
                                  process_index: int = 0, process_count: int = 1,
                                  data_dir: str = DEFAULT_DATA_DIR,
                                  hold_out_validation: bool = False
                                  ) -> batching.SemiSupervisedBatches:
  """Semi-supervised Fashion-MNIST batches with a committed label split.

  Labelled images are the train images selected by `load_label_split('fashion_mnist',
  percent)` (checked against the loaded labels); the unlabelled pool is the whole train split
  (labelled images included), minus the validation split if `hold_out_validation`, with its
  true labels kept as hidden `unlabelled_labels` for monitoring only.

  Args:
    percent: 1 or 10.
    labelled_batch_size, unlabelled_batch_size: global batch sizes (divisible by
      `process_count`).
    seed: data-order seed.
    process_index, process_count: this host and the number of hosts.
    data_dir: the IDX folder.
    hold_out_validation: remove the 5,000 validation images from the unlabelled pool (they
      are never labelled anyway), leaving 55,000.

  Returns:
    a `SemiSupervisedBatches`: call it with a step, or `.iterate(start_step)`; batches have
    `labelled_images` uint8 `[b_l, 28, 28, 1]`, `labels` int32 `[b_l]`, `unlabelled_images`
    uint8 `[b_u, 28, 28, 1]`, `unlabelled_labels` int32 `[b_u]`.

  Raises:
    ValueError: a split file that fails its checks or does not match the loaded labels.
  """
  images, labels = load_fashion_mnist("train", data_dir)
  indices = splits.load_label_split("fashion_mnist", percent, labels)
  unlabelled_images, unlabelled_labels = images, labels
  if hold_out_validation:
    keep = splits.train_indices_without(
        labels.shape[0], splits.load_validation_split("fashion_mnist", labels))
    unlabelled_images, unlabelled_labels = images[keep], labels[keep]
  return batching.SemiSupervisedBatches(
      labelled_images=images[indices], labelled_labels=labels[indices],
      unlabelled_images=unlabelled_images, unlabelled_labels=unlabelled_labels,
      labelled_batch_size=labelled_batch_size, unlabelled_batch_size=unlabelled_batch_size,
      seed=seed, process_index=process_index, process_count=process_count,
      num_classes=NUM_CLASSES)
