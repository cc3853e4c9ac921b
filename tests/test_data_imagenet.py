"""ImageNet tf.data pipelines on mocked tfds data (no ImageNet download needed)."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from semppl_jax.data import imagenet

S = 8
# Mocked split sizes and the id of each split's first example (ids are unique across splits
# and double as labels, so every image can be traced back to its record).
SPLITS = {
    ("imagenet2012", "train"): (14, 0),
    ("imagenet2012", "validation"): (11, 500),
    ("imagenet2012_subset/1pct", "train"): (6, 100),
    ("imagenet2012_subset/10pct", "train"): (8, 200),
}


def _value(example_id):
  return (example_id * 37) % 251


def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
  """A tfds `_as_dataset` mock that honours sub-splits (`train[2:5]`, `even_splits`)."""
  del read_config
  assert not shuffle_files  # the pipelines rely on the stored record order
  assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
  name = self.name + (f"/{self.builder_config.name}" if self.builder_config else "")
  sizes = {s: n for (d, s), (n, _) in SPLITS.items() if d == name}
  split_dict = tfds.core.SplitDict(
      [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in sizes.items()])
  spec = tfds.core.splits.AbstractSplit.from_spec(split)
  ids = []
  for inst in spec.to_absolute(split_dict):
    size, first = SPLITS[(name, inst.splitname)]
    start = 0 if inst.from_ is None else inst.from_
    end = size if inst.to is None else inst.to
    ids.extend(range(first + start, first + end))
  images = [tf.io.encode_jpeg(tf.fill([9 + i % 4, 12, 3], tf.constant(_value(i), tf.uint8)))
            for i in ids]
  return tf.data.Dataset.from_tensor_slices({
      "image": tf.constant([im.numpy() for im in images], tf.string, shape=[len(ids)]),
      "label": tf.constant(ids, tf.int64, shape=[len(ids)]),
      "file_name": tf.constant([f"{i}.JPEG" for i in ids], tf.string, shape=[len(ids)]),
  })


@pytest.fixture
def mocked():
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
    yield


def _check_images(images, ids):
  """JPEG-coded constant images stay (almost) constant and keep their record's value."""
  want = np.array([_value(i) for i in ids])[:, None, None, None]
  assert np.abs(images.astype(int) - want).max() <= 2


SMALL = 4
VIEWS = dict(num_large=2, large_size=S, num_small=1, small_size=SMALL)


def _semi(**kwargs):
  args = dict(labelled_batch_size=2, unlabelled_batch_size=4, seed=1, **VIEWS)
  args.update(kwargs)
  return imagenet.imagenet_semi_supervised(args.pop("split_percent", 1), **args)


def test_semi_supervised_keys_shapes_and_content(mocked):
  batches = list(tfds.as_numpy(_semi(split_percent=10).take(4)))
  for batch in batches:
    assert set(batch) == {"labelled_large", "labelled_small", "labels", "unlabelled_large",
                          "unlabelled_small", "unlabelled_labels"}
    assert batch["labelled_large"].shape == (2, 2, S, S, 3)
    assert batch["labelled_small"].shape == (2, 1, SMALL, SMALL, 3)
    assert batch["unlabelled_large"].shape == (4, 2, S, S, 3)
    assert batch["unlabelled_small"].shape == (4, 1, SMALL, SMALL, 3)
    for key in ("labelled_large", "labelled_small", "unlabelled_large", "unlabelled_small"):
      assert batch[key].dtype == np.uint8
    assert batch["labels"].dtype == np.int32 and batch["unlabelled_labels"].dtype == np.int32
    # Every view of a constant image keeps its record's value.
    for prefix, labels in (("labelled", batch["labels"]),
                           ("unlabelled", batch["unlabelled_labels"])):
      for key in (f"{prefix}_large", f"{prefix}_small"):
        for v in range(batch[key].shape[1]):
          _check_images(batch[key][:, v], labels)
  lab = np.concatenate([b["labels"] for b in batches])
  unlab = np.concatenate([b["unlabelled_labels"] for b in batches])
  # Labelled from the 10pct subset (ids 200..207), one epoch exactly.
  np.testing.assert_array_equal(np.sort(lab), np.arange(200, 208))
  # Unlabelled from all of train: the first 14 positions are one epoch.
  np.testing.assert_array_equal(np.sort(unlab[:14]), np.arange(14))


@pytest.mark.slow
def test_semi_supervised_deterministic_and_resumable(mocked):
  first = list(tfds.as_numpy(_semi().take(6)))
  again = list(tfds.as_numpy(_semi().take(6)))
  resumed = list(tfds.as_numpy(_semi(start_step=4).take(2)))
  for a, b in zip(first + first[4:], again + resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Resuming gives the same crops too, not only the same images.
  border = _border_dataset()
  with tfds.testing.mock_data(as_dataset_fn=border):
    views = list(tfds.as_numpy(_semi(**WIDE).take(4)))
    views_resumed = list(tfds.as_numpy(_semi(**WIDE, start_step=3).take(1)))
  np.testing.assert_array_equal(views[3]["unlabelled_large"],
                                views_resumed[0]["unlabelled_large"])
  other = list(tfds.as_numpy(_semi(seed=2).take(6)))
  assert not all(np.array_equal(a["unlabelled_labels"], b["unlabelled_labels"])
                 for a, b in zip(first, other))


def test_semi_supervised_host_shards_are_disjoint(mocked):
  lab_sets, unlab_sets = [], []
  for p in range(2):
    batches = list(tfds.as_numpy(_semi(process_index=p, process_count=2).take(7)))
    assert batches[0]["labelled_large"].shape == (1, 2, S, S, 3)
    assert batches[0]["unlabelled_small"].shape == (2, 1, SMALL, SMALL, 3)
    lab = np.concatenate([b["labels"] for b in batches])
    unlab = np.concatenate([b["unlabelled_labels"] for b in batches])
    # Host epochs: 3 of the 6 labelled records, 7 of the 14 unlabelled ones.
    assert len(set(lab[:3].tolist())) == 3 and set(lab.tolist()) == set(lab[:3].tolist())
    assert len(set(unlab[:7].tolist())) == 7 and set(unlab.tolist()) == set(unlab[:7].tolist())
    lab_sets.append(set(lab.tolist()))
    unlab_sets.append(set(unlab.tolist()))
  assert not lab_sets[0] & lab_sets[1] and lab_sets[0] | lab_sets[1] == set(range(100, 106))
  assert not unlab_sets[0] & unlab_sets[1] and unlab_sets[0] | unlab_sets[1] == set(range(14))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(mocked, process_count):
  seen, counts = [], []
  for p in range(process_count):
    batches = list(tfds.as_numpy(imagenet.imagenet_eval(
        batch_size=4, image_size=S, process_index=p, process_count=process_count)))
    counts.append(len(batches))
    for batch in batches:
      b = 4 // process_count
      assert batch["images"].shape == (b, S, S, 3) and batch["images"].dtype == np.uint8
      assert batch["labels"].dtype == np.int32 and batch["mask"].dtype == bool
      mask = batch["mask"]
      _check_images(batch["images"][mask], batch["labels"][mask])
      assert np.all(batch["labels"][~mask] == -1) and np.all(batch["images"][~mask] == 0)
      seen.extend(batch["labels"][mask].tolist())
  # 11 validation images: ceil(11 / 4) = 3 batches on one host; 6 + 5 -> 3 batches of 2 each.
  assert counts == [3] * process_count
  assert sorted(seen) == list(range(500, 511))


def test_eval_split_argument(mocked):
  batches = list(tfds.as_numpy(imagenet.imagenet_eval(batch_size=4, image_size=S,
                                                      split="train[:5]")))
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, np.arange(5))


def test_default_mock_data_works_for_both_builders():
  # tfds' own random mock (no custom as_dataset_fn) serves imagenet2012 and
  # imagenet2012_subset; it ignores sub-splits, so only shapes are checked here.
  with tfds.testing.mock_data(num_examples=5):
    batch = next(iter(tfds.as_numpy(_semi(split_percent=10, large_size=16))))
    assert batch["labelled_large"].shape == (2, 2, 16, 16, 3)
    assert batch["unlabelled_small"].shape == (4, 1, SMALL, SMALL, 3)
    assert 0 <= batch["labels"].min() and batch["labels"].max() < 1000
    batch = next(iter(tfds.as_numpy(imagenet.imagenet_eval(batch_size=4, image_size=16))))
    assert batch["images"].shape == (4, 16, 16, 3) and batch["mask"].all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(split_percent=5), "split_percent must be one of"),
    (dict(labelled_batch_size=3, process_count=2), "labelled_batch_size must be divisible"),
    (dict(unlabelled_batch_size=0), "unlabelled_batch_size"),
    (dict(process_index=2, process_count=2), r"process_index must lie in \[0, 2\)"),
    (dict(large_size=0), "large_size"),
    (dict(num_large=0), "num_large"),
    (dict(small_scale=(0.5, 0.2)), "small_scale must satisfy"),
    (dict(large_scale=(0.1, 1.5)), "large_scale must satisfy"),
    (dict(aspect_ratio_range=(0.0, 1.0)), "aspect_ratio_range"),
    (dict(shuffle_buffer=0), "shuffle_buffer"),
    (dict(labelled_batch_size=8), "labelled_batch_size: the host-local batch of 8 exceeds"),
])
def test_bad_input_raises(mocked, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _semi(**kwargs)


def test_missing_data_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="manual download"):
    imagenet.imagenet_eval(batch_size=4, data_dir=str(tmp_path))


# --- Crops come from the full image; evaluation is the centre crop. ---

WIDE = dict(num_large=4, large_size=16, num_small=2, small_size=8, small_scale=(0.05, 0.3),
            labelled_batch_size=2, unlabelled_batch_size=4)
INNER, BORDER = 50, 250


def _wide_png(example_id):
  """A 32 x 96 image: inner value INNER, 10-px left and right bands of BORDER. The bands lie
  outside the centred square, so a pipeline that crops from the centre square never sees them."""
  del example_id
  image = np.full((32, 96, 3), INNER, np.uint8)
  image[:, :10] = BORDER
  image[:, -10:] = BORDER
  return tf.io.encode_png(image).numpy()


def _border_dataset():
  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del decoders, read_config, shuffle_files
    name = self.name + (f"/{self.builder_config.name}" if self.builder_config else "")
    size = 6 if name == "imagenet2012" else 4
    if "[" in str(split) or "%" in str(split):
      raise AssertionError("the border mock serves whole splits only")
    ids = list(range(size))
    return tf.data.Dataset.from_tensor_slices({
        "image": tf.constant([_wide_png(i) for i in ids], tf.string),
        "label": tf.constant(ids, tf.int64),
        "file_name": tf.constant([f"{i}.png" for i in ids], tf.string),
    })
  return as_dataset


def test_training_crops_see_the_whole_image_and_eval_sees_the_centre():
  with tfds.testing.mock_data(as_dataset_fn=_border_dataset()):
    batches = list(tfds.as_numpy(_semi(**WIDE).take(4)))
    evals = list(tfds.as_numpy(imagenet.imagenet_eval(batch_size=2, image_size=16,
                                                      split="train")))
  views = np.concatenate([b[k].reshape((-1,) + b[k].shape[2:]) for b in batches
                          for k in ("labelled_large", "unlabelled_large")])
  assert views.shape[0] == 4 * (2 + 4) * 4  # 96 large crops
  has_border = (views.max(axis=(1, 2, 3)) > 200)
  # Some crops reach the off-centre bands, and (scale >= 0.08 of a 32 x 96 image) some not.
  assert 0 < has_border.sum() < len(views)
  small = np.concatenate([b["unlabelled_small"].reshape((-1, 8, 8, 3)) for b in batches])
  assert (small.max(axis=(1, 2, 3)) > 200).any()
  # Views of one image differ from each other (independent boxes).
  assert not all(np.array_equal(v[0], v[1]) for v in batches[0]["unlabelled_large"])
  eval_images = np.concatenate([e["images"][e["mask"]] for e in evals])
  assert eval_images.shape == (6, 16, 16, 3)
  assert eval_images.max() < 100 and eval_images.min() >= INNER - 2


# --- The kNN bank is the labelled subset the run had. ---

@pytest.mark.parametrize("percent,ids", [(1, range(100, 106)), (10, range(200, 208))])
def test_knn_bank_is_the_run_label_split(mocked, percent, ids):
  seen = []
  for p in range(2):
    for batch in tfds.as_numpy(imagenet.imagenet_knn_bank(
        percent, batch_size=4, image_size=S, process_index=p, process_count=2)):
      assert batch["images"].shape == (2, S, S, 3)
      mask = batch["mask"]
      _check_images(batch["images"][mask], batch["labels"][mask])
      seen.extend(batch["labels"][mask].tolist())
  assert sorted(seen) == list(ids)


def test_knn_bank_rejects_unknown_percent(mocked):
  with pytest.raises(ValueError, match="split_percent must be one of"):
    imagenet.imagenet_knn_bank(5, batch_size=4)
