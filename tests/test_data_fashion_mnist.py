"""Fashion-MNIST IDX reader, tfds fallback, dataset metadata."""
import gzip
import os
import shutil
import struct
import sys
import types

import numpy as np
import pytest

from semppl_jax.data import fashion_mnist
from semppl_jax.data import info

DATA_DIR = fashion_mnist.DEFAULT_DATA_DIR
HAVE_IDX = os.path.exists(os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz"))
needs_idx = pytest.mark.skipif(not HAVE_IDX, reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def train():
  return fashion_mnist.load_fashion_mnist("train")


def _idx_bytes(array: np.ndarray, magic: int | None = None, dims=None) -> bytes:
  """Independent IDX writer: big-endian magic, dims, then raw bytes."""
  array = np.asarray(array, np.uint8)
  dims = array.shape if dims is None else dims
  magic = (0x08 << 8 | len(dims)) if magic is None else magic
  return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + array.tobytes()


def _write(path, payload: bytes, compress=True):
  if compress:
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)
  return str(path)


@needs_idx
def test_train_split_shapes_dtypes_and_counts(train):
  images, labels = train
  assert images.shape == (60_000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (60_000,) and labels.dtype == np.int32
  assert labels.min() == 0 and labels.max() == 9
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 6000))
  # Published facts about the data: the first train labels, and the pixel mean (0.2860 * 255).
  np.testing.assert_array_equal(labels[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])
  assert abs(images.mean() - 0.2860 * 255) < 0.3
  assert images.flags.writeable


@needs_idx
def test_test_split_matches_an_independent_parse():
  images, labels = fashion_mnist.load_fashion_mnist("test")
  assert images.shape == (10_000, 28, 28, 1) and labels.shape == (10_000,)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))
  with gzip.open(os.path.join(DATA_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
    raw = f.read()
  assert struct.unpack(">II", raw[:8]) == (2049, 10_000)
  np.testing.assert_array_equal(labels, np.frombuffer(raw[8:], np.uint8))
  with gzip.open(os.path.join(DATA_DIR, "t10k-images-idx3-ubyte.gz")) as f:
    raw = f.read()
  assert struct.unpack(">IIII", raw[:16]) == (2051, 10_000, 28, 28)
  np.testing.assert_array_equal(images[123, :, :, 0],
                                np.frombuffer(raw[16 + 123 * 784:16 + 124 * 784],
                                              np.uint8).reshape(28, 28))


@needs_idx
def test_uncompressed_files_are_read_too(tmp_path):
  for kind in ("images-idx3", "labels-idx1"):
    with gzip.open(os.path.join(DATA_DIR, f"t10k-{kind}-ubyte.gz")) as src:
      with open(tmp_path / f"t10k-{kind}-ubyte", "wb") as dst:
        shutil.copyfileobj(src, dst)
  images, labels = fashion_mnist.load_fashion_mnist("test", str(tmp_path))
  ref_images, ref_labels = fashion_mnist.load_fashion_mnist("test")
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, ref_labels)


def test_read_idx_small_file(tmp_path):
  data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  path = _write(tmp_path / "x.gz", _idx_bytes(data))
  np.testing.assert_array_equal(fashion_mnist.read_idx(path, (2, 3, 4)), data)
  np.testing.assert_array_equal(fashion_mnist.read_idx(path, (None, 3, 4)), data)


@pytest.mark.parametrize("payload,expected_shape,match", [
    (_idx_bytes(np.zeros((2, 3, 4)), magic=0x0803 + 0x0100), (2, 3, 4), "magic"),
    (_idx_bytes(np.zeros((2, 3, 4))), (2, 3), "magic"),  # 3 dims where 1 label dim expected
    (_idx_bytes(np.zeros((2, 3, 5))), (2, 3, 4), r"dimensions \(2, 3, 5\), expected"),
    (_idx_bytes(np.zeros((2, 3, 4)))[:-1], (2, 3, 4), "payload has 23 bytes, expected 24"),
    (_idx_bytes(np.zeros((2, 3, 4))) + b"\0", (2, 3, 4), "payload has 25 bytes"),
    (b"\0\0", (2,), "too short"),
    (struct.pack(">I", 0x0803) + b"\0\0\0\2", (2, 3, 4), "truncated IDX header"),
])
def test_read_idx_rejects_malformed_files(tmp_path, payload, expected_shape, match):
  path = _write(tmp_path / "bad-idx-ubyte.gz", payload)
  with pytest.raises(ValueError, match=match) as e:
    fashion_mnist.read_idx(path, expected_shape)
  assert path in str(e.value)


def test_read_idx_rejects_non_gzip(tmp_path):
  path = _write(tmp_path / "plain-but-named.gz", _idx_bytes(np.zeros((2,))), compress=False)
  with pytest.raises(ValueError, match="gzip") as e:
    fashion_mnist.read_idx(path, (2,))
  assert path in str(e.value)


def test_load_rejects_wrong_counts_and_labels(tmp_path):
  images = _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((5, 28, 28))))
  _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros((5,))))
  with pytest.raises(ValueError, match=r"expected \(10000, 28, 28\)") as e:
    fashion_mnist.load_fashion_mnist("test", str(tmp_path))
  assert images in str(e.value)
  _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((10_000, 28, 28))))
  labels = np.zeros(10_000)
  labels[7] = 10
  path = _write(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(labels))
  with pytest.raises(ValueError, match=r"\[0, 10\)") as e:
    fashion_mnist.load_fashion_mnist("test", str(tmp_path))
  assert path in str(e.value)
  with pytest.raises(ValueError, match="split"):
    fashion_mnist.load_fashion_mnist("validation", str(tmp_path))


def _fake_tfds(monkeypatch, load):
  module = types.ModuleType("tensorflow_datasets")
  module.load = load
  module.as_numpy = lambda x: x
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)


def test_tfds_fallback_only_when_files_absent(tmp_path, monkeypatch):
  calls = []

  def load(name, split, batch_size):
    calls.append((name, split, batch_size))
    return {"image": np.full((3, 28, 28, 1), 7, np.uint8), "label": np.array([1, 2, 3])}

  _fake_tfds(monkeypatch, load)
  images, labels = fashion_mnist.load_fashion_mnist("test", str(tmp_path))
  assert calls == [("fashion_mnist", "test", -1)]
  assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.tolist() == [1, 2, 3]
  if HAVE_IDX:
    fashion_mnist.load_fashion_mnist("test")
    assert len(calls) == 1  # files present: tfds untouched


def test_missing_files_and_no_tfds_data_is_a_clear_error(tmp_path, monkeypatch):

  def load(*args, **kwargs):
    raise ConnectionError("no network")

  _fake_tfds(monkeypatch, load)
  with pytest.raises(FileNotFoundError) as e:
    fashion_mnist.load_fashion_mnist("train", str(tmp_path))
  message = str(e.value)
  assert "dataset-fashion-mnist" in message and "tfds" in message
  assert "train-images-idx3-ubyte" in message and "no network" in message


def test_dataset_info():
  assert info.dataset_info("fashion_mnist") == (10, (28, 28, 1), 60_000)
  num_classes, image_shape, num_train = info.dataset_info("imagenet")
  assert (num_classes, image_shape, num_train) == (1000, (224, 224, 3), 1_281_167)
  assert info.dataset_info("imagenet2012") == info.dataset_info("imagenet")
  with pytest.raises(ValueError, match="fashion_mnist"):
    info.dataset_info("cifar10")


@needs_idx
@pytest.mark.parametrize("hold_out", [False, True])
def test_semi_supervised_pools_and_validation_hold_out(train, hold_out):
  images, labels = train
  batches = fashion_mnist.fashion_mnist_semi_supervised(
      1, labelled_batch_size=600, unlabelled_batch_size=1000, seed=0,
      hold_out_validation=hold_out)
  assert batches.num_labelled == 600
  assert batches.num_unlabelled == (55_000 if hold_out else 60_000)
  val = fashion_mnist.splits.load_validation_split("fashion_mnist")
  labelled = fashion_mnist.splits.load_label_split("fashion_mnist", 1)
  lab_idx, _ = batches.indices(0)
  batch = batches(0)
  # The labelled stream is the committed split (one epoch in one batch of 600).
  np.testing.assert_array_equal(np.sort(lab_idx), np.arange(600))
  np.testing.assert_array_equal(batch["labels"], labels[labelled][lab_idx])
  # Unlabelled images: with the hold-out, none is a validation image (compare pixels: the
  # pool is re-indexed).
  val_rows = {images[i].tobytes() for i in val}
  hits = sum(im.tobytes() in val_rows for im in batch["unlabelled_images"])
  assert (hits == 0) if hold_out else (hits > 0)


@needs_idx
def test_semi_supervised_refuses_a_split_that_does_not_match(tmp_path):
  # Same images, labels of another dataset: the committed split's checksum no longer matches.
  for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz"):
    shutil.copy(os.path.join(DATA_DIR, name), tmp_path / name)
  _, labels = fashion_mnist.load_fashion_mnist("train")
  _write(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.roll(labels, 1)))
  with pytest.raises(ValueError, match="labels differ from those the fashion_mnist 1% split"):
    fashion_mnist.fashion_mnist_semi_supervised(
        1, labelled_batch_size=2, unlabelled_batch_size=2, seed=0, data_dir=str(tmp_path))
