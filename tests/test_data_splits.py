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


def _package_text(percent):
  return importlib.resources.files("semppl_jax.data").joinpath(
      "splits", f"fashion_mnist_{percent}pct.json").read_text()


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
  with pytest.raises(ValueError, match="class 2 has 20 examples"):
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
  paths = splits.write_fashion_mnist_split_files(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["fashion_mnist_1pct.json",
                                                  "fashion_mnist_10pct.json"]
  for percent, path in zip((1, 10), paths):
    with open(path) as f:
      assert f.read() == _package_text(percent)


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
