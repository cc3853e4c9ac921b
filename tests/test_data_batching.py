"""Host-local numpy batches: determinism, resume, epochs, host shards, evaluation padding."""
import itertools
import os

import numpy as np
import pytest

from semppl_jax.data import batching
from semppl_jax.data import fashion_mnist

N_L, N_U, C = 12, 30, 4


def _images(n, offset):
  """uint8 [n, 2, 3, 1] images whose pixels all equal offset + index (identifies the row)."""
  return np.broadcast_to((offset + np.arange(n, dtype=np.uint8))[:, None, None, None],
                         (n, 2, 3, 1)).copy()


@pytest.fixture(scope="module")
def data():
  return dict(labelled_images=_images(N_L, 0), labelled_labels=np.arange(N_L) % C,
              unlabelled_images=_images(N_U, 100), unlabelled_labels=(np.arange(N_U) * 7) % C,
              num_classes=C)


def _make(data, **kwargs):
  args = dict(data, labelled_batch_size=4, unlabelled_batch_size=6, seed=5)
  args.update(kwargs)
  return batching.SemiSupervisedBatches(**args)


def _ids(batch):
  return batch["labelled_images"][:, 0, 0, 0].astype(int), \
      batch["unlabelled_images"][:, 0, 0, 0].astype(int) - 100


def test_keys_shapes_dtypes_and_pairing(data):
  batch = _make(data)(3)
  assert set(batch) == {"labelled_images", "labels", "unlabelled_images", "unlabelled_labels"}
  assert batch["labelled_images"].shape == (4, 2, 3, 1)
  assert batch["unlabelled_images"].shape == (6, 2, 3, 1)
  assert batch["labelled_images"].dtype == np.uint8
  assert batch["labels"].dtype == np.int32 and batch["unlabelled_labels"].dtype == np.int32
  lab, unlab = _ids(batch)
  np.testing.assert_array_equal(batch["labels"], lab % C)  # labels travel with their images
  np.testing.assert_array_equal(batch["unlabelled_labels"], (unlab * 7) % C)


def test_pure_function_of_seed_and_step(data):
  first = _make(data)
  for step in range(6):
    first(step)
  fresh = _make(data)(5)  # no history at all
  after_history = first(5)
  for key in fresh:
    np.testing.assert_array_equal(fresh[key], after_history[key])
  functional = batching.semi_supervised_batch(5, **dict(data, labelled_batch_size=4,
                                                        unlabelled_batch_size=6, seed=5))
  for key in fresh:
    np.testing.assert_array_equal(fresh[key], functional[key])
  other_seed = _make(data, seed=6)(5)
  assert not np.array_equal(other_seed["unlabelled_images"], fresh["unlabelled_images"])


def test_every_epoch_covers_every_example_once(data):
  b = _make(data)
  lab = np.concatenate([_ids(b(s))[0] for s in range(2 * N_L // 4)])  # two labelled epochs
  unlab = np.concatenate([_ids(b(s))[1] for s in range(2 * N_U // 6)])
  for stream, n in ((lab, N_L), (unlab, N_U)):
    np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(stream[n:2 * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # reshuffled per epoch


def test_batches_straddling_epochs(data):
  # 12 labelled examples, batch 8: step 1 holds the last 4 of epoch 0 and the first 4 of 1.
  b = _make(data, labelled_batch_size=8)
  stream = np.concatenate([_ids(b(s))[0] for s in range(3)])  # 24 positions = 2 epochs
  np.testing.assert_array_equal(np.sort(stream[:12]), np.arange(12))
  np.testing.assert_array_equal(np.sort(stream[12:]), np.arange(12))


def test_host_shards_are_disjoint_and_form_the_global_batch(data):
  global_batch = _make(data, labelled_batch_size=8, unlabelled_batch_size=12)(4)
  shards = [_make(data, labelled_batch_size=8, unlabelled_batch_size=12, process_index=p,
                  process_count=4)(4) for p in range(4)]
  for key in global_batch:
    np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), global_batch[key])
  assert shards[0]["labelled_images"].shape[0] == 2
  assert shards[0]["unlabelled_images"].shape[0] == 3
  ids = [set(_ids(s)[1].tolist()) for s in shards]
  for a, b in itertools.combinations(ids, 2):
    assert not a & b


def test_iterate_with_and_without_prefetch_matches_direct_calls(data):
  b = _make(data)
  direct = [b(s) for s in range(3, 8)]
  for prefetch in (0, 2):
    got = list(b.iterate(start_step=3, num_steps=5, prefetch=prefetch))
    assert len(got) == 5
    for x, y in zip(got, direct):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
  module_level = list(batching.iterate(3, num_steps=5, **dict(
      data, labelled_batch_size=4, unlabelled_batch_size=6, seed=5)))
  np.testing.assert_array_equal(module_level[-1]["labels"], direct[-1]["labels"])


def test_endless_prefetch_iterator_stops_its_thread(data):
  it = _make(data).iterate(start_step=0, prefetch=3)
  first = next(it)
  np.testing.assert_array_equal(first["labels"], _make(data)(0)["labels"])
  it.close()
  assert not any(t.name == "semppl-prefetch" and t.is_alive()
                 for t in __import__("threading").enumerate())


def test_prefetch_reraises_producer_errors(data):
  it = batching._prefetch((1 / x for x in (1, 0)), 2)  # pylint: disable=protected-access
  assert next(it) == 1
  with pytest.raises(ZeroDivisionError):
    next(it)


@pytest.mark.parametrize("kwargs,match", [
    (dict(labelled_batch_size=3, process_count=2), "labelled_batch_size must be divisible"),
    (dict(unlabelled_batch_size=0), "unlabelled_batch_size must be an int >= 1"),
    (dict(labelled_batch_size=13), "labelled_batch_size must be at most the dataset size 12"),
    (dict(unlabelled_batch_size=31), "unlabelled_batch_size must be at most"),
    (dict(process_index=2, process_count=2), r"process_index must lie in \[0, 2\)"),
    (dict(seed=-1), "seed"),
    (dict(labelled_labels=np.arange(N_L)), r"labels must lie in \[0, 4\), found range \[0, 11\]"),
    (dict(labelled_labels=np.arange(N_L) - 1), r"labels must lie in \[0, 4\)"),
    (dict(unlabelled_labels=np.full(N_U, -2)), r"unlabelled_labels must lie in \[-1, 4\)"),
    (dict(labelled_labels=np.zeros(5, int)), r"labels must be an integer array of shape \(12,\)"),
    (dict(labelled_images=np.zeros((N_L, 2, 3, 1), np.float32)), "labelled_images must be a uint8"),
    (dict(unlabelled_images=np.zeros((N_U, 2, 2, 1), np.uint8)), "image shape"),
])
def test_bad_input_raises(data, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _make(data, **kwargs)


def test_bad_step_raises(data):
  with pytest.raises(ValueError, match="step"):
    _make(data)(-1)


def test_unknown_unlabelled_labels_default_to_minus_one(data):
  b = _make(dict(data, unlabelled_labels=None))
  np.testing.assert_array_equal(b(0)["unlabelled_labels"], np.full(6, -1))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_every_example_once(process_count):
  n, batch_size = 23, 8
  images = _images(n, 0)
  labels = np.arange(n) % 5
  seen, counts = [], []
  for p in range(process_count):
    batches = list(batching.eval_batches(images, labels, batch_size, process_index=p,
                                         process_count=process_count))
    counts.append(len(batches))
    for batch in batches:
      b = batch_size // process_count
      assert batch["images"].shape == (b, 2, 3, 1) and batch["images"].dtype == np.uint8
      assert batch["labels"].dtype == np.int32 and batch["mask"].dtype == bool
      ids = batch["images"][batch["mask"], 0, 0, 0].astype(int)
      np.testing.assert_array_equal(batch["labels"][batch["mask"]], ids % 5)
      assert np.all(batch["labels"][~batch["mask"]] == -1)
      assert np.all(batch["images"][~batch["mask"]] == 0)
      seen.extend(ids.tolist())
  assert counts == [3] * process_count  # ceil(23 / 8) on every host
  assert sorted(seen) == list(range(n))


def test_eval_batches_bad_input():
  images, labels = _images(4, 0), np.zeros(4, int)
  with pytest.raises(ValueError, match="batch_size must be divisible"):
    list(batching.eval_batches(images, labels, 3, process_count=2))
  with pytest.raises(ValueError, match=r"labels must be an integer array of shape \(4,\)"):
    list(batching.eval_batches(images, labels[:3], 4))
  with pytest.raises(ValueError, match="images must have shape"):
    list(batching.eval_batches(images[..., 0], labels, 4))


@pytest.mark.skipif(not os.path.exists(os.path.join(fashion_mnist.DEFAULT_DATA_DIR,
                                                    "train-labels-idx1-ubyte.gz")),
                    reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_semi_supervised():
  from semppl_jax.data import splits
  b = fashion_mnist.fashion_mnist_semi_supervised(
      1, labelled_batch_size=8, unlabelled_batch_size=16, seed=0, process_index=1,
      process_count=2)
  assert b.num_labelled == 600 and b.num_unlabelled == 60_000
  batch = b(7)
  assert batch["labelled_images"].shape == (4, 28, 28, 1)
  assert batch["unlabelled_images"].shape == (8, 28, 28, 1)
  lab_idx, unlab_idx = b.indices(7)
  images, labels = fashion_mnist.load_fashion_mnist("train")
  split = splits.load_label_split("fashion_mnist", 1)
  np.testing.assert_array_equal(batch["labelled_images"], images[split[lab_idx]])
  np.testing.assert_array_equal(batch["labels"], labels[split[lab_idx]])
  np.testing.assert_array_equal(batch["unlabelled_images"], images[unlab_idx])
  np.testing.assert_array_equal(batch["unlabelled_labels"], labels[unlab_idx])
