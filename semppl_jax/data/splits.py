"""Seeded, class-balanced label splits, written down as JSON files shipped with the package.

A split is a sorted list of indices into a dataset's train split: the labelled images. The
unlabelled pool is always the *whole* train split (labelled images included), as in the paper's
ImageNet setup.

Selection (stable across NumPy versions, because it uses only the raw output of the PCG64 bit
generator, which NumPy keeps fixed, and no distribution method): every train index `i` gets the
key `PCG64(SeedSequence(seed)).random_raw(N)[i]`; each class keeps its `k` indices with the
smallest keys. With one seed, a smaller fraction's split is a subset of a larger one's.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os

import numpy as np

# Files under semppl_jax/data/splits/, named `{dataset}_{percent}pct.json`.
SPLITS_PACKAGE = "semppl_jax.data"
SPLITS_DIR = "splits"
DEFAULT_SEED = 0
# Percentages for which a split file is committed, per dataset.
AVAILABLE_SPLITS = {"fashion_mnist": (1, 10)}


def make_label_split(labels: np.ndarray, fraction: float, seed: int,
                     num_classes: int | None = None) -> np.ndarray:
  """Picks a seeded, class-balanced labelled subset.

  Every class gets the same number of examples, `k = round(fraction * N / C)`.

  Args:
    labels: int `[N]`, the train labels, in `[0, num_classes)`.
    fraction: share of the N examples to label, in `(0, 1]`.
    seed: non-negative int.
    num_classes: C; defaults to `labels.max() + 1`.

  Returns:
    int64 `[C * k]` sorted, unique indices into `labels`.

  Raises:
    ValueError: naming `labels`, `fraction`, `seed` or `num_classes` when out of range, or
      when a class has fewer than `k` examples.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} "
                     f"dtype {labels.dtype}")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), found range "
                     f"[{int(labels.min())}, {int(labels.max())}]")
  n = labels.shape[0]
  per_class = int(round(fraction * n / num_classes))
  if per_class < 1:
    raise ValueError(f"fraction={fraction} of {n} examples over {num_classes} classes selects "
                     f"no example per class; expected fraction >= {0.5 * num_classes / n:.2g}")
  keys = _selection_keys(seed, n)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if members.size < per_class:
      raise ValueError(f"labels: class {c} has {members.size} examples, fewer than the "
                       f"{per_class} per class that fraction={fraction} requires")
    # Stable sort, so equal keys (vanishingly rare) fall back to index order.
    order = np.argsort(keys[members], kind="stable")
    chosen.append(members[order[:per_class]])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def indices_sha256(indices: np.ndarray) -> str:
  """sha256 hex digest of the indices as little-endian int64 bytes."""
  return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def labels_sha256(labels: np.ndarray) -> str:
  """sha256 hex digest of the labels as little-endian int64 bytes (ties a split to its data)."""
  return hashlib.sha256(np.asarray(labels, dtype="<i8").tobytes()).hexdigest()


def label_split_record(dataset: str, labels: np.ndarray, percent: int, seed: int,
                       num_classes: int | None = None) -> dict:
  """Builds the JSON-ready description of a split.

  Args:
    dataset: dataset name, e.g. 'fashion_mnist'.
    labels: int `[N]` labels of the dataset's train split.
    percent: labelled share in percent (1, 10, ...).
    seed: selection seed.
    num_classes: defaults to `labels.max() + 1`.

  Returns:
    dict with `dataset`, `split` ('train'), `fraction`, `percent`, `seed`, `selection`,
    `num_classes`, `source_num_examples`, `labels_sha256`, `num_examples`, `per_class_counts`,
    `sha256` (of the indices, see `indices_sha256`) and `indices` (sorted list of ints).
  """
  labels = np.asarray(labels)
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  indices = make_label_split(labels, percent / 100.0, seed, num_classes)
  counts = np.bincount(labels[indices], minlength=num_classes)
  return {
      "dataset": dataset,
      "split": "train",
      "fraction": percent / 100.0,
      "percent": percent,
      "seed": seed,
      "selection": ("per class, the round(fraction*N/C) train indices with the smallest "
                    "keys PCG64(SeedSequence(seed)).random_raw(N)"),
      "num_classes": num_classes,
      "source_num_examples": int(labels.shape[0]),
      "labels_sha256": labels_sha256(labels),
      "num_examples": int(indices.shape[0]),
      "per_class_counts": [int(c) for c in counts],
      "sha256": indices_sha256(indices),
      "indices": [int(i) for i in indices],
  }


def split_to_json(record: dict) -> str:
  """Deterministic JSON text: one key per line (sorted, `indices` last), lists compact."""
  keys = sorted(k for k in record if k != "indices") + ["indices"]
  lines = [f"  {json.dumps(k)}: {json.dumps(record[k], separators=(',', ':'))}" for k in keys]
  return "{\n" + ",\n".join(lines) + "\n}\n"


def split_filename(dataset: str, percent: int) -> str:
  """File name of a committed split, e.g. `fashion_mnist_1pct.json`."""
  return f"{dataset}_{percent}pct.json"


def write_fashion_mnist_split_files(output_dir: str | None = None, *,
                                    data_dir: str | None = None,
                                    percents: tuple[int, ...] = (1, 10),
                                    seed: int = DEFAULT_SEED) -> list[str]:
  """Regenerates the committed Fashion-MNIST split files from the train labels.

  Args:
    output_dir: where to write; defaults to this package's `splits/` folder.
    data_dir: Fashion-MNIST IDX folder (default: the Debian package's).
    percents: which splits to write.
    seed: selection seed.

  Returns:
    The paths written.
  """
  from semppl_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  if output_dir is None:
    output_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), SPLITS_DIR)
  kwargs = {} if data_dir is None else {"data_dir": data_dir}
  _, labels = fashion_mnist.load_fashion_mnist("train", **kwargs)
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for percent in percents:
    record = label_split_record("fashion_mnist", labels, percent, seed,
                                fashion_mnist.NUM_CLASSES)
    path = os.path.join(output_dir, split_filename("fashion_mnist", percent))
    with open(path, "w") as f:
      f.write(split_to_json(record))
    paths.append(path)
  return paths


def read_label_split_record(dataset: str, percent: int) -> dict:
  """The verified JSON record of a committed split (see `label_split_record` for its keys).

  Raises:
    ValueError: unknown `dataset`/`percent` (listing the available ones), or a file whose
      indices do not match its checksum, count, per-class counts, order or range.
  """
  if dataset not in AVAILABLE_SPLITS or percent not in AVAILABLE_SPLITS[dataset]:
    raise ValueError(f"no committed label split for dataset={dataset!r} percent={percent!r}; "
                     f"available: {AVAILABLE_SPLITS}")
  name = split_filename(dataset, percent)
  resource = importlib.resources.files(SPLITS_PACKAGE).joinpath(SPLITS_DIR, name)
  record = json.loads(resource.read_text())
  verify_label_split_record(record, dataset, percent, name)
  return record


def verify_label_split_record(record: dict, dataset: str, percent: int, name: str) -> None:
  """Checks a split record against its own checksum and metadata.

  Raises:
    ValueError: naming the file `name` and every inconsistency found: sha256 mismatch, index
      count, per-class counts, unsorted/duplicate/out-of-range indices, wrong dataset/percent.
  """
  indices = np.asarray(record["indices"], dtype=np.int64)
  problems = []
  if indices_sha256(indices) != record["sha256"]:
    problems.append(f"sha256 {indices_sha256(indices)} != recorded {record['sha256']}")
  if indices.shape[0] != record["num_examples"]:
    problems.append(f"{indices.shape[0]} indices != num_examples {record['num_examples']}")
  if sum(record["per_class_counts"]) != record["num_examples"]:
    problems.append("per_class_counts do not sum to num_examples")
  if indices.size and (np.any(np.diff(indices) <= 0) or indices[0] < 0
                       or indices[-1] >= record["source_num_examples"]):
    problems.append(f"indices must be sorted, unique, in [0, {record['source_num_examples']})")
  if record["dataset"] != dataset or record["percent"] != percent:
    problems.append(f"file describes {record['dataset']} {record['percent']}%, expected "
                    f"{dataset} {percent}%")
  if problems:
    raise ValueError(f"label split file {name} is corrupt: " + "; ".join(problems))


def load_label_split(dataset: str, percent: int) -> np.ndarray:
  """Indices of the labelled subset of a committed split.

  Args:
    dataset: 'fashion_mnist'.
    percent: 1 or 10.

  Returns:
    int64 `[num_examples]` sorted, unique indices into the dataset's *train* split
    (600 for Fashion-MNIST 1 %, 6,000 for 10 %).

  Raises:
    ValueError: unknown split, or a file that fails its checksum or consistency checks.
  """
  return np.asarray(read_label_split_record(dataset, percent)["indices"], dtype=np.int64)


def check_split_matches_labels(record: dict, labels: np.ndarray) -> None:
  """Verifies that a split record was made from these train labels.

  Args:
    record: from `read_label_split_record`.
    labels: int `[N]` train labels as loaded.

  Raises:
    ValueError: naming `labels`, when their checksum or per-class counts under the split's
      indices differ from the record.
  """
  labels = np.asarray(labels)
  if labels_sha256(labels) != record["labels_sha256"]:
    raise ValueError(f"labels differ from those the {record['dataset']} {record['percent']}% "
                     f"split was made from (labels_sha256 {labels_sha256(labels)} != "
                     f"{record['labels_sha256']})")
  counts = np.bincount(labels[np.asarray(record["indices"])], minlength=record["num_classes"])
  if [int(c) for c in counts] != record["per_class_counts"]:
    raise ValueError(f"labels: per-class counts {counts.tolist()} under the split's indices, "
                     f"expected {record['per_class_counts']}")


def _selection_keys(seed: int, n: int) -> np.ndarray:
  """uint64 `[n]` per-index keys from the raw PCG64 stream (fixed across NumPy versions)."""
  return np.random.PCG64(np.random.SeedSequence(seed)).random_raw(n)
