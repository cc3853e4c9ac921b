"""Label splits: selection, the committed files, their checksums and regeneration."""
import hashlib
import importlib.resources
import json
import os

import numpy as np
import pytest

from semppl_jax.data import fashion_mnist
from semppl_jax.data import splits

HAVE_IDX = os.path.exists(os.path.join(fashion_mnist.DEFAULT_DATA_DIR,
                                       "train-images-idx3-ubyte.gz"))
needs_idx = pytest.mark.skipif(not HAVE_IDX, reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def train_labels():
  return fashion_mnist.load_fashion_mnist("train")[1]


def _package_text(name):
  name = f"{name}pct" if isinstance(name, int) else name
  return importlib.resources.files("semppl_jax.data").joinpath(
      "splits", f"fashion_mnist_{name}.json").read_text()


def test_make_label_split_is_balanced_sorted_unique_and_seeded():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, size=1000)
  idx = splits.make_label_split(labels, 0.1, seed=3)
  assert idx.dtype == np.int64
  assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
  assert idx.min() >= 0 and idx.max() < 1000
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [25, 25, 25, 25])
  np.testing.assert_array_equal(idx, splits.make_label_split(labels, 0.1, seed=3))
  assert not np.array_equal(idx, splits.make_label_split(labels, 0.1, seed=4))
  # Same seed: the smaller split is contained in the larger one.
  small = splits.make_label_split(labels, 0.02, seed=3)
  assert set(small.tolist()) <= set(idx.tolist())


def test_make_label_split_equal_counts_on_imbalanced_classes():
  labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
  idx = splits.make_label_split(labels, 0.3, seed=0)  # round(0.3 * 100 / 3) = 10 per class
  np.testing.assert_array_equal(np.bincount(labels[idx]), [10, 10, 10])
  with pytest.raises(ValueError, match="class 2 has 20 eligible examples"):
    splits.make_label_split(labels, 0.9, seed=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
    (dict(seed=-1), "seed"), (dict(fraction=0.001), "no example per class"),
    (dict(labels=np.array([0, 1, 5])), "labels must lie in"),
    (dict(labels=np.zeros((2, 2), int)), "labels must be"),
    (dict(labels=np.array([0.0, 1.0])), "labels must be"),
])
def test_make_label_split_rejects_bad_input(kwargs, match):
  args = dict(labels=np.arange(100) % 3, fraction=0.1, seed=0, num_classes=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    splits.make_label_split(**args)


@needs_idx
@pytest.mark.parametrize("percent,per_class", [(1, 60), (10, 600)])
def test_committed_split_files(train_labels, percent, per_class):
  idx = splits.load_label_split("fashion_mnist", percent)
  record = json.loads(_package_text(percent))
  assert idx.dtype == np.int64 and idx.shape == (10 * per_class,)
  assert np.all(np.diff(idx) > 0)
  assert idx.min() >= 0 and idx.max() < 60_000  # train indices only
  np.testing.assert_array_equal(np.bincount(train_labels[idx], minlength=10),
                                np.full(10, per_class))
  assert record["dataset"] == "fashion_mnist" and record["split"] == "train"
  assert record["fraction"] == percent / 100 and record["seed"] == splits.DEFAULT_SEED
  assert record["num_examples"] == 10 * per_class
  assert record["per_class_counts"] == [per_class] * 10
  assert record["sha256"] == hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
  splits.check_split_matches_labels(record, train_labels)


@needs_idx
def test_one_percent_is_inside_ten_percent():
  small = splits.load_label_split("fashion_mnist", 1)
  large = splits.load_label_split("fashion_mnist", 10)
  assert np.isin(small, large).all()


@needs_idx
def test_regenerating_gives_the_committed_files(tmp_path):
  paths = fashion_mnist.write_fashion_mnist_split_files(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["fashion_mnist_1pct.json",
                                                  "fashion_mnist_10pct.json",
                                                  "fashion_mnist_validation.json"]
  for name, path in zip((1, 10, "validation"), paths):
    with open(path) as f:
      assert f.read() == _package_text(name)


def test_checksum_and_consistency_are_verified():
  record = json.loads(_package_text(1))
  splits.verify_label_split_record(record, "fashion_mnist", 1, "f.json")
  tampered = dict(record, indices=[record["indices"][0] + 1] + record["indices"][1:])
  with pytest.raises(ValueError, match="f.json is corrupt: sha256"):
    splits.verify_label_split_record(tampered, "fashion_mnist", 1, "f.json")
  # A consistent checksum does not excuse duplicates.
  dup = record["indices"][:1] + record["indices"][:-1]
  tampered = dict(record, indices=dup, sha256=splits.indices_sha256(np.array(dup)))
  with pytest.raises(ValueError, match="sorted, unique"):
    splits.verify_label_split_record(tampered, "fashion_mnist", 1, "f.json")
  with pytest.raises(ValueError, match="expected fashion_mnist 10%"):
    splits.verify_label_split_record(record, "fashion_mnist", 10, "f.json")


def test_labels_mismatch_is_detected():
  record = json.loads(_package_text(1))
  with pytest.raises(ValueError, match="labels differ"):
    splits.check_split_matches_labels(record, np.zeros(60_000, np.int32))


def test_unknown_split_is_rejected():
  with pytest.raises(ValueError, match="available"):
    splits.load_label_split("fashion_mnist", 5)
  with pytest.raises(ValueError, match="available"):
    splits.load_label_split("imagenet", 1)
  with pytest.raises(ValueError, match="available"):
    splits.load_validation_split("imagenet")
  assert splits.available_splits()["fashion_mnist"] == ["10pct", "1pct", "validation"]


@needs_idx
def test_load_label_split_checks_the_labels(train_labels):
  idx = splits.load_label_split("fashion_mnist", 1, labels=train_labels)
  assert idx.shape == (600,)
  shuffled = train_labels.copy()
  shuffled[idx[0]] = (shuffled[idx[0]] + 1) % 10
  with pytest.raises(ValueError, match="labels differ"):
    splits.load_label_split("fashion_mnist", 1, labels=shuffled)


# --- validate_label_split: the check a data source runs on any split it is handed. ---

def test_validate_label_split_accepts_a_matching_split():
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
  out = splits.validate_label_split(np.array([0, 4, 8], np.int32), labels, 3, 1)
  assert out.dtype == np.int64 and out.tolist() == [0, 4, 8]
  splits.validate_label_split([0, 1, 3], labels, 3, [2, 1, 0])


@pytest.mark.parametrize("indices,per_class,match", [
    ([0, 1, 1], 1, "sorted and unique"),
    ([2, 1, 0], 1, "sorted and unique"),
    ([0, 1, 9], 1, r"in \[0, 9\)"),
    ([-1, 1, 2], 1, r"in \[0, 9\)"),
    ([0, 3, 4], 1, r"per-class counts \[2, 1, 0\] under the indices, expected \[1, 1, 1\]"),
    ([0, 1, 2], 2, r"expected \[2, 2, 2\]"),
    (np.zeros((1, 3), int), 1, "1-D integer"),
])
def test_validate_label_split_rejects_mismatches(indices, per_class, match):
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
  with pytest.raises(ValueError, match="my_split.json does not match the data.*" + match):
    splits.validate_label_split(np.asarray(indices), labels, 3, per_class,
                                name="my_split.json")


def test_validate_label_split_rejects_labels_out_of_range():
  with pytest.raises(ValueError, match=r"labels under the indices must lie in \[0, 2\)"):
    splits.validate_label_split([0, 1], np.array([0, 5]), 2, 1)


# --- The validation split. ---

def test_make_validation_split_is_balanced_disjoint_and_seeded():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 4, size=2000)
  exclude = splits.make_label_split(labels, 0.1, seed=0)
  val = splits.make_validation_split(labels, 200, seed=1, exclude=exclude)
  assert val.dtype == np.int64 and np.all(np.diff(val) > 0)
  assert not np.intersect1d(val, exclude).size
  np.testing.assert_array_equal(np.bincount(labels[val], minlength=4), [50] * 4)
  np.testing.assert_array_equal(val, splits.make_validation_split(labels, 200, 1, None,
                                                                  exclude))
  assert not np.array_equal(val, splits.make_validation_split(labels, 200, 2, None, exclude))
  # Excluding changes the pick only where it must: without exclusion the same seed may hit
  # excluded indices, with it never.
  free = splits.make_validation_split(labels, 200, seed=0)
  assert np.intersect1d(free, exclude).size > 0
  rest = splits.train_indices_without(2000, val)
  assert rest.shape == (1800,) and not np.intersect1d(rest, val).size
  assert np.union1d(rest, val).tolist() == list(range(2000))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=10), "num_examples must be a positive multiple of num_classes=4"),
    (dict(num_examples=0), "num_examples must be a positive multiple"),
    (dict(exclude=[5000]), r"exclude must hold indices in \[0, 100\)"),
    (dict(num_examples=92, exclude=np.arange(10)), "22 eligible examples, fewer than the 23"),
])
def test_make_validation_split_rejects_bad_input(kwargs, match):
  args = dict(labels=np.arange(100) % 4, num_examples=8, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    splits.make_validation_split(**args)


def test_committed_validation_split_is_disjoint_balanced_and_verified():
  val = splits.load_validation_split("fashion_mnist")
  assert val.shape == (5000,) and val.dtype == np.int64 and np.all(np.diff(val) > 0)
  assert val.min() >= 0 and val.max() < 60_000
  for percent in (1, 10):
    assert not np.intersect1d(val, splits.load_label_split("fashion_mnist", percent)).size
  record = json.loads(_package_text("validation"))
  assert record["per_class_counts"] == [500] * 10 and record["purpose"] == "validation"
  assert record["excludes"] == ["fashion_mnist_10pct.json", "fashion_mnist_1pct.json"]
  assert record["seed"] == splits.VALIDATION_SEED
  assert record["sha256"] == hashlib.sha256(val.astype("<i8").tobytes()).hexdigest()


@needs_idx
def test_committed_validation_split_matches_the_data(train_labels):
  val = splits.load_validation_split("fashion_mnist", labels=train_labels)
  np.testing.assert_array_equal(np.bincount(train_labels[val]), [500] * 10)
  images, labels = fashion_mnist.fashion_mnist_validation()
  assert images.shape == (5000, 28, 28, 1) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, train_labels[val])


def _with_validation_file(monkeypatch, tmp_path, edit):
  """Points the package's split folder at a copy whose validation file is edited."""
  folder = tmp_path / "pkg"
  (folder / "splits").mkdir(parents=True)
  for name in ("1pct", "10pct", "validation"):
    text = _package_text(name)
    if name == "validation":
      text = splits.split_to_json(edit(json.loads(text)))
    (folder / "splits" / f"fashion_mnist_{name}.json").write_text(text)
  monkeypatch.setattr(splits.importlib.resources, "files", lambda _: folder)


def test_validation_checksum_mismatch_raises(monkeypatch, tmp_path):
  def swap(record):
    record["indices"] = [record["indices"][0] + 1] + record["indices"][1:]
    return record
  _with_validation_file(monkeypatch, tmp_path, swap)
  with pytest.raises(ValueError, match="fashion_mnist_validation.json is corrupt: sha256"):
    splits.load_validation_split("fashion_mnist")


def test_validation_overlapping_a_label_split_raises(monkeypatch, tmp_path):
  labelled = splits.load_label_split("fashion_mnist", 1)

  def overlap(record):
    indices = sorted(set(record["indices"][1:]) | {int(labelled[0])})
    record.update(indices=indices, sha256=splits.indices_sha256(np.array(indices)))
    return record
  _with_validation_file(monkeypatch, tmp_path, overlap)
  with pytest.raises(ValueError, match="1 indices also in fashion_mnist_1pct.json"):
    splits.load_validation_split("fashion_mnist")
