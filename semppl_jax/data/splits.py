"""Seeded, class-balanced subsets of a train split, written down as JSON files in the package.

Dataset-agnostic: this module knows no dataset. A dataset module builds
the records from its labels and writes them; everyone else reads them back by name.

Two kinds of subset, both sorted lists of indices into a dataset's *train* split:
* label splits (`{dataset}_{percent}pct.json`): the labelled images. The unlabelled pool is the
  whole train split (labelled images included), as in the paper's ImageNet setup.
* a validation split (`{dataset}_validation.json`): train images held out for choosing
  hyper-parameters (never the test split), disjoint from every label split of the dataset, and
  removed from the unlabelled pool when used (`train_indices_without`).

Selection (stable across NumPy versions, because it uses only the raw output of the PCG64 bit
generator, which NumPy keeps fixed, and no distribution method): every train index `i` gets the
key `PCG64(SeedSequence(seed)).random_raw(N)[i]`; each class keeps its `k` (eligible) indices
with the smallest keys. With one seed, a smaller fraction's label split is a subset of a larger
one's.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import re
from typing import Sequence

import numpy as np

# Files under semppl_jax/data/splits/: `{dataset}_{percent}pct.json`, `{dataset}_validation.json`.
SPLITS_PACKAGE = "semppl_jax.data"
SPLITS_DIR = "splits"
DEFAULT_SEED = 0
# Not the label splits' seed, so validation keys are not the label keys' runners-up.
VALIDATION_SEED = 1
VALIDATION = "validation"
_SPLIT_FILE = re.compile(r"^(?P<dataset>.+)_(?P<name>\d+pct|validation)\.json$")


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
  labels, num_classes = _check_labels(labels, seed, num_classes)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
  n = labels.shape[0]
  per_class = int(round(fraction * n / num_classes))
  if per_class < 1:
    raise ValueError(f"fraction={fraction} of {n} examples over {num_classes} classes selects "
                     f"no example per class; expected fraction >= {0.5 * num_classes / n:.2g}")
  return _balanced_pick(labels, per_class, seed, num_classes, np.zeros(n, bool),
                        f"fraction={fraction}")


def make_validation_split(labels: np.ndarray, num_examples: int, seed: int,
                          num_classes: int | None = None,
                          exclude: np.ndarray | Sequence[int] = ()) -> np.ndarray:
  """Picks a seeded, class-balanced held-out subset, disjoint from `exclude`.

  Args:
    labels: int `[N]` train labels in `[0, num_classes)`.
    num_examples: size of the subset, a positive multiple of `num_classes`
      (`num_examples / C` per class).
    seed: non-negative int.
    num_classes: C; defaults to `labels.max() + 1`.
    exclude: indices that must not be picked (the label splits).

  Returns:
    int64 `[num_examples]` sorted, unique indices into `labels`, none in `exclude`.

  Raises:
    ValueError: naming `num_examples` (not a positive multiple of C), `exclude` (out of range)
      or `labels` (a class with too few eligible examples).
  """
  labels, num_classes = _check_labels(labels, seed, num_classes)
  if (isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer))
      or num_examples < 1 or num_examples % num_classes):
    raise ValueError(f"num_examples must be a positive multiple of num_classes={num_classes}, "
                     f"got {num_examples!r}")
  n = labels.shape[0]
  exclude = np.asarray(exclude, dtype=np.int64).reshape(-1)
  if exclude.size and (exclude.min() < 0 or exclude.max() >= n):
    raise ValueError(f"exclude must hold indices in [0, {n}), found range "
                     f"[{int(exclude.min())}, {int(exclude.max())}]")
  excluded = np.zeros(n, bool)
  excluded[exclude] = True
  return _balanced_pick(labels, num_examples // num_classes, seed, num_classes, excluded,
                        f"num_examples={num_examples}")


def _check_labels(labels, seed, num_classes) -> tuple[np.ndarray, int]:
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} "
                     f"dtype {labels.dtype}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), found range "
                     f"[{int(labels.min())}, {int(labels.max())}]")
  return labels, int(num_classes)


def _balanced_pick(labels, per_class, seed, num_classes, excluded, what) -> np.ndarray:
  """Per class, the `per_class` non-excluded indices with the smallest selection keys."""
  keys = _selection_keys(seed, labels.shape[0])
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero((labels == c) & ~excluded)
    if members.size < per_class:
      raise ValueError(f"labels: class {c} has {members.size} eligible examples, fewer than "
                       f"the {per_class} per class that {what} requires")
    # Stable sort, so equal keys (vanishingly rare) fall back to index order.
    order = np.argsort(keys[members], kind="stable")
    chosen.append(members[order[:per_class]])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def validate_label_split(indices: np.ndarray, labels: np.ndarray, num_classes: int,
                         expected_per_class: int | Sequence[int], *,
                         name: str = "label split") -> np.ndarray:
  """Checks that a subset of the train split is what it claims to be, for these labels.

  Args:
    indices: int `[M]` indices into `labels`.
    labels: int `[N]` train labels as loaded.
    num_classes: C.
    expected_per_class: examples each class must have under `indices`: one int for all
      classes, or C ints.
    name: what to call the split in messages (e.g. its file name).

  Returns:
    the indices as int64 `[M]`.

  Raises:
    ValueError: naming `name` and every problem found: not 1-D integer, unsorted or duplicate
      indices, indices outside `[0, N)`, labels outside `[0, C)`, per-class counts that differ
      from `expected_per_class`.
  """
  indices, labels = np.asarray(indices), np.asarray(labels)
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"{name} does not match the data: indices must be a 1-D integer array, "
                     f"got shape {indices.shape} dtype {indices.dtype}")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} does not match the data: labels must be a 1-D integer array, "
                     f"got shape {labels.shape} dtype {labels.dtype}")
  expected = np.broadcast_to(np.asarray(expected_per_class, np.int64), (num_classes,))
  problems = []
  n = labels.shape[0]
  if indices.size and np.any(np.diff(indices) <= 0):
    problems.append("indices must be sorted and unique")
  if indices.size and (indices.min() < 0 or indices.max() >= n):
    problems.append(f"indices must lie in [0, {n}) (the train split's size), found range "
                    f"[{int(indices.min())}, {int(indices.max())}]")
  else:
    picked = labels[indices]
    if picked.size and (picked.min() < 0 or picked.max() >= num_classes):
      problems.append(f"labels under the indices must lie in [0, {num_classes}), found range "
                      f"[{int(picked.min())}, {int(picked.max())}]")
    else:
      counts = np.bincount(picked, minlength=num_classes)
      if not np.array_equal(counts, expected):
        problems.append(f"per-class counts {counts.tolist()} under the indices, expected "
                        f"{expected.tolist()}")
  if problems:
    raise ValueError(f"{name} does not match the data: " + "; ".join(problems))
  return indices.astype(np.int64)


def train_indices_without(num_train: int, excluded: np.ndarray) -> np.ndarray:
  """The train indices left when `excluded` (e.g. the validation split) is held out.

  Args:
    num_train: N, the train split's size.
    excluded: int `[M]` indices in `[0, N)`.

  Returns:
    int64 `[N - |unique(excluded)|]` sorted indices not in `excluded`.

  Raises:
    ValueError: naming `excluded` if an index lies outside `[0, num_train)`.
  """
  excluded = np.asarray(excluded, np.int64).reshape(-1)
  if excluded.size and (excluded.min() < 0 or excluded.max() >= num_train):
    raise ValueError(f"excluded must hold indices in [0, {num_train}), found range "
                     f"[{int(excluded.min())}, {int(excluded.max())}]")
  keep = np.ones(num_train, bool)
  keep[excluded] = False
  return np.flatnonzero(keep).astype(np.int64)


def indices_sha256(indices: np.ndarray) -> str:
  """sha256 hex digest of the indices as little-endian int64 bytes."""
  return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def labels_sha256(labels: np.ndarray) -> str:
  """sha256 hex digest of the labels as little-endian int64 bytes (ties a split to its data)."""
  return hashlib.sha256(np.asarray(labels, dtype="<i8").tobytes()).hexdigest()


def _common_record(dataset, labels, indices, seed, num_classes) -> dict:
  counts = np.bincount(labels[indices], minlength=num_classes)
  return {
      "dataset": dataset,
      "split": "train",
      "seed": seed,
      "num_classes": num_classes,
      "source_num_examples": int(labels.shape[0]),
      "labels_sha256": labels_sha256(labels),
      "num_examples": int(indices.shape[0]),
      "per_class_counts": [int(c) for c in counts],
      "sha256": indices_sha256(indices),
      "indices": [int(i) for i in indices],
  }


def label_split_record(dataset: str, labels: np.ndarray, percent: int, seed: int,
                       num_classes: int | None = None) -> dict:
  """Builds the JSON-ready description of a label split.

  Args:
    dataset: dataset name (the file name's prefix).
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
  record = _common_record(dataset, labels, indices, seed, num_classes)
  record.update({
      "fraction": percent / 100.0,
      "percent": percent,
      "selection": ("per class, the round(fraction*N/C) train indices with the smallest "
                    "keys PCG64(SeedSequence(seed)).random_raw(N)"),
  })
  return record


def validation_split_record(dataset: str, labels: np.ndarray, num_examples: int, seed: int,
                            num_classes: int | None = None,
                            exclude_records: Sequence[dict] = ()) -> dict:
  """Builds the JSON-ready description of a validation split.

  Args:
    dataset: dataset name.
    labels: int `[N]` train labels.
    num_examples: validation size (a multiple of the number of classes).
    seed: selection seed.
    num_classes: defaults to `labels.max() + 1`.
    exclude_records: the label split records (`label_split_record`) it must be disjoint from.

  Returns:
    dict with the keys of `label_split_record` except `fraction`/`percent`, plus `purpose`
    ('validation') and `excludes` (the file names of `exclude_records`).
  """
  labels = np.asarray(labels)
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  exclude = np.concatenate([np.asarray(r["indices"], np.int64) for r in exclude_records]
                           + [np.zeros(0, np.int64)])
  indices = make_validation_split(labels, num_examples, seed, num_classes, exclude)
  record = _common_record(dataset, labels, indices, seed, num_classes)
  record.update({
      "purpose": VALIDATION,
      "excludes": sorted(split_filename(r["dataset"], r["percent"]) for r in exclude_records),
      "selection": ("per class, the num_examples/C train indices outside the excluded label "
                    "splits with the smallest keys PCG64(SeedSequence(seed)).random_raw(N)"),
  })
  return record


def split_to_json(record: dict) -> str:
  """Deterministic JSON text: one key per line (sorted, `indices` last), lists compact."""
  keys = sorted(k for k in record if k != "indices") + ["indices"]
  lines = [f"  {json.dumps(k)}: {json.dumps(record[k], separators=(',', ':'))}" for k in keys]
  return "{\n" + ",\n".join(lines) + "\n}\n"


def split_filename(dataset: str, percent: int) -> str:
  """File name of a committed label split, `{dataset}_{percent}pct.json`."""
  return f"{dataset}_{percent}pct.json"


def validation_filename(dataset: str) -> str:
  """File name of a committed validation split, `{dataset}_validation.json`."""
  return f"{dataset}_{VALIDATION}.json"


def default_splits_dir() -> str:
  """This package's `splits/` folder (where the committed files live)."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), SPLITS_DIR)


def write_split_file(record: dict, output_dir: str) -> str:
  """Writes a label or validation record as `split_to_json` text; returns the path."""
  name = (validation_filename(record["dataset"]) if record.get("purpose") == VALIDATION
          else split_filename(record["dataset"], record["percent"]))
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, name)
  with open(path, "w") as f:
    f.write(split_to_json(record))
  return path


def available_splits() -> dict[str, list[str]]:
  """The committed split files: dataset -> sorted names ('1pct', '10pct', 'validation')."""
  found: dict[str, list[str]] = {}
  folder = importlib.resources.files(SPLITS_PACKAGE).joinpath(SPLITS_DIR)
  for entry in folder.iterdir():
    match = _SPLIT_FILE.match(entry.name)
    if match:
      found.setdefault(match["dataset"], []).append(match["name"])
  return {d: sorted(names) for d, names in sorted(found.items())}


def _read_record(dataset: str, name: str) -> tuple[dict, str]:
  available = available_splits()
  if name not in available.get(dataset, ()):
    raise ValueError(f"no committed split {name!r} for dataset={dataset!r}; available: "
                     f"{available}")
  filename = f"{dataset}_{name}.json"
  resource = importlib.resources.files(SPLITS_PACKAGE).joinpath(SPLITS_DIR, filename)
  return json.loads(resource.read_text()), filename


def read_label_split_record(dataset: str, percent: int) -> dict:
  """The verified JSON record of a committed label split (keys: see `label_split_record`).

  Raises:
    ValueError: unknown `dataset`/`percent` (listing the available ones), or a file whose
      indices do not match its checksum, count, per-class counts, order or range.
  """
  record, filename = _read_record(dataset, f"{percent}pct")
  verify_label_split_record(record, dataset, percent, filename)
  return record


def read_validation_split_record(dataset: str) -> dict:
  """The verified JSON record of a committed validation split.

  Raises:
    ValueError: no validation file for `dataset` (listing the available ones), a file failing
      its checksum or consistency checks, or one that overlaps a label split it excludes.
  """
  record, filename = _read_record(dataset, VALIDATION)
  problems = _record_problems(record)
  if record.get("dataset") != dataset or record.get("purpose") != VALIDATION:
    problems.append(f"file describes {record.get('dataset')} {record.get('purpose')}, "
                    f"expected {dataset} {VALIDATION}")
  if not problems:
    indices = np.asarray(record["indices"], np.int64)
    for excluded in record["excludes"]:
      match = _SPLIT_FILE.match(excluded)
      other = read_label_split_record(dataset, int(match["name"][:-3]))
      overlap = np.intersect1d(indices, np.asarray(other["indices"], np.int64))
      if overlap.size:
        problems.append(f"{overlap.size} indices also in {excluded}")
  if problems:
    raise ValueError(f"split file {filename} is corrupt: " + "; ".join(problems))
  return record


def _record_problems(record: dict) -> list[str]:
  """Inconsistencies between a record's indices and its own checksum and metadata."""
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
  return problems


def verify_label_split_record(record: dict, dataset: str, percent: int, name: str) -> None:
  """Checks a label split record against its own checksum and metadata.

  Raises:
    ValueError: naming the file `name` and every inconsistency found: sha256 mismatch, index
      count, per-class counts, unsorted/duplicate/out-of-range indices, wrong dataset/percent.
  """
  problems = _record_problems(record)
  if record.get("dataset") != dataset or record.get("percent") != percent:
    problems.append(f"file describes {record.get('dataset')} {record.get('percent')}%, "
                    f"expected {dataset} {percent}%")
  if problems:
    raise ValueError(f"label split file {name} is corrupt: " + "; ".join(problems))


def load_label_split(dataset: str, percent: int,
                     labels: np.ndarray | None = None) -> np.ndarray:
  """Indices of the labelled subset of a committed split.

  Args:
    dataset: a dataset with committed splits (see `available_splits()`).
    percent: e.g. 1 or 10.
    labels: int `[N]` train labels as loaded; when given, the split is checked against them
      (`check_split_matches_labels`), so a split made from other data is refused.

  Returns:
    int64 `[num_examples]` sorted, unique indices into the dataset's *train* split
    (`percent` % of the train split, class-balanced).

  Raises:
    ValueError: unknown split, a file that fails its checksum or consistency checks, or (with
      `labels`) a split that does not match the labels.
  """
  record = read_label_split_record(dataset, percent)
  if labels is not None:
    check_split_matches_labels(record, labels)
  return np.asarray(record["indices"], dtype=np.int64)


def load_validation_split(dataset: str, labels: np.ndarray | None = None) -> np.ndarray:
  """Indices of the committed validation subset of a dataset's train split.

  Args:
    dataset: a dataset with a committed validation file.
    labels: int `[N]` train labels; when given, the split is checked against them.

  Returns:
    int64 `[num_examples]` sorted, unique train indices, disjoint
    from every committed label split of the dataset.

  Raises:
    ValueError: as `read_validation_split_record`, or a mismatch with `labels`.
  """
  record = read_validation_split_record(dataset)
  if labels is not None:
    check_split_matches_labels(record, labels)
  return np.asarray(record["indices"], dtype=np.int64)


def check_split_matches_labels(record: dict, labels: np.ndarray) -> None:
  """Verifies that a split record (label or validation) was made from these train labels.

  Args:
    record: from `read_label_split_record` or `read_validation_split_record`.
    labels: int `[N]` train labels as loaded.

  Raises:
    ValueError: naming `labels`, when their checksum or per-class counts under the split's
      indices differ from the record.
  """
  labels = np.asarray(labels)
  what = (f"{record['dataset']} {record['percent']}%" if "percent" in record
          else f"{record['dataset']} {record.get('purpose', '')}")
  if labels_sha256(labels) != record["labels_sha256"]:
    raise ValueError(f"labels differ from those the {what} split was made from "
                     f"(labels_sha256 {labels_sha256(labels)} != {record['labels_sha256']})")
  validate_label_split(np.asarray(record["indices"], np.int64), labels, record["num_classes"],
                       record["per_class_counts"], name=f"the {what} split")


def _selection_keys(seed: int, n: int) -> np.ndarray:
  """uint64 `[n]` per-index keys from the raw PCG64 stream (fixed across NumPy versions)."""
  return np.random.PCG64(np.random.SeedSequence(seed)).random_raw(n)
