"""tf.data pipelines over image folders."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from semppl_jax.data import image_folder

S = 6  # output image side
CLASSES = ("cat", "dog", "emu")
PER_CLASS = (3, 4, 3)
NUM_UNLABELLED = 12


def _value(kind, i):
  """The constant pixel value of image i (labelled: 10 + 3i, unlabelled: 120 + 3i)."""
  return (10 if kind == "labelled" else 120) + 3 * i


def _write_png(path, value, shape):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = tf.fill(list(shape) + [3], tf.constant(value, tf.uint8))
  tf.io.write_file(path, tf.io.encode_png(image))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  i = 0
  for c, (name, count) in enumerate(zip(CLASSES, PER_CLASS)):
    for j in range(count):
      # Non-square sizes of both orientations exercise the centred crop.
      shape = (8 + j, 11) if j % 2 else (13, 7 + j)
      _write_png(str(root / "labelled" / name / f"img{j}.png"), _value("labelled", i), shape)
      i += 1
  for k in range(NUM_UNLABELLED):
    sub = "a" if k % 2 else os.path.join("b", "c")
    _write_png(str(root / "unlabelled" / sub / f"u{k}.PNG"), _value("unlabelled", k), (9, 12))
  (root / "unlabelled" / "notes.txt").write_text("not an image")
  (root / "unlabelled" / ".hidden.png").write_text("skipped")
  return str(root / "labelled"), str(root / "unlabelled")


def _ids(images, kind):
  """Recovers image ids from their constant pixel values."""
  flat = images.reshape(images.shape[0], -1).astype(int)
  assert np.all(flat == flat[:, :1]), "host preprocessing must keep constant images constant"
  return (flat[:, 0] - _value(kind, 0)) // 3


def _labelled_label(i):
  return int(np.searchsorted(np.cumsum(PER_CLASS), i, side="right"))


def _take(ds, n):
  return list(tfds.as_numpy(ds.take(n)))


def test_list_image_folder(folders, tmp_path):
  labelled, unlabelled = folders
  paths, labels, names = image_folder.list_image_folder(labelled)
  assert names == list(CLASSES)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(3), PER_CLASS))
  assert labels.dtype == np.int32
  assert all(os.path.basename(os.path.dirname(p)) == CLASSES[l] for p, l in zip(paths, labels))
  files = image_folder.list_images(unlabelled)
  assert len(files) == NUM_UNLABELLED and files == sorted(files)
  with pytest.raises(ValueError, match=r"class_names lacks the sub-folders \['emu'\]"):
    image_folder.list_image_folder(labelled, class_names=["cat", "dog"])
  with pytest.raises(ValueError, match="no class sub-folders"):
    image_folder.list_image_folder(os.path.join(unlabelled, "a"))
  with pytest.raises(ValueError, match="no image files"):
    image_folder.list_images(str(tmp_path))
  with pytest.raises(ValueError, match="is not a folder"):
    image_folder.list_images(os.path.join(unlabelled, "missing"))


def _semi(folders, **kwargs):
  args = dict(large_size=S, num_large=2, small_size=4, num_small=1, labelled_batch_size=4,
              unlabelled_batch_size=6, seed=3)
  args.update(kwargs)
  return image_folder.image_folder_semi_supervised(*folders, **args)


def test_semi_supervised_keys_shapes_and_content(folders):
  batches = _take(_semi(folders), 5)
  for batch in batches:
    assert set(batch) == {"labelled_large", "labelled_small", "labels", "unlabelled_large",
                          "unlabelled_small", "unlabelled_labels"}
    assert batch["labelled_large"].shape == (4, 2, S, S, 3)
    assert batch["labelled_large"].dtype == np.uint8
    assert batch["labelled_small"].shape == (4, 1, 4, 4, 3)
    assert batch["unlabelled_large"].shape == (6, 2, S, S, 3)
    # All views of an image are of that image.
    np.testing.assert_array_equal(_ids(batch["labelled_large"][:, 1], "labelled"),
                                  _ids(batch["labelled_small"][:, 0], "labelled"))
    assert batch["labels"].dtype == np.int32 and batch["unlabelled_labels"].dtype == np.int32
    ids = _ids(batch["labelled_large"][:, 0], "labelled")
    np.testing.assert_array_equal(batch["labels"], [_labelled_label(i) for i in ids])
    assert np.all(batch["unlabelled_labels"] == -1)
  # 20 labelled positions = 2 epochs of 10; 30 unlabelled = 2.5 epochs of 12.
  lab = np.concatenate([_ids(b["labelled_large"][:, 0], "labelled") for b in batches])
  unlab = np.concatenate([_ids(b["unlabelled_large"][:, 0], "unlabelled") for b in batches])
  np.testing.assert_array_equal(np.sort(lab[:10]), np.arange(10))
  np.testing.assert_array_equal(np.sort(lab[10:]), np.arange(10))
  np.testing.assert_array_equal(np.sort(unlab[:12]), np.arange(12))
  np.testing.assert_array_equal(np.sort(unlab[12:24]), np.arange(12))


def test_semi_supervised_deterministic_and_resumable(folders):
  first = _take(_semi(folders), 6)
  again = _take(_semi(folders), 6)
  resumed = _take(_semi(folders, start_step=4), 2)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[4:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other = _take(_semi(folders, seed=4), 6)
  assert not all(np.array_equal(a["unlabelled_large"], b["unlabelled_large"])
                 for a, b in zip(first, other))


def test_semi_supervised_host_shards_are_disjoint(folders):
  seen_lab, seen_unlab = [], []
  for p in range(2):
    batches = _take(_semi(folders, labelled_batch_size=4, unlabelled_batch_size=6,
                          process_index=p, process_count=2), 4)
    assert batches[0]["labelled_large"].shape == (2, 2, S, S, 3)
    assert batches[0]["unlabelled_large"].shape == (3, 2, S, S, 3)
    # One host epoch: 5 labelled and 6 unlabelled files.
    lab = np.concatenate([_ids(b["labelled_large"][:, 0], "labelled") for b in batches])[:5]
    unlab = np.concatenate([_ids(b["unlabelled_large"][:, 0], "unlabelled") for b in batches])[:6]
    assert len(set(lab.tolist())) == 5 and len(set(unlab.tolist())) == 6
    seen_lab.append(set(lab.tolist()))
    seen_unlab.append(set(unlab.tolist()))
  assert not seen_lab[0] & seen_lab[1] and seen_lab[0] | seen_lab[1] == set(range(10))
  assert not seen_unlab[0] & seen_unlab[1]
  assert seen_unlab[0] | seen_unlab[1] == set(range(NUM_UNLABELLED))


def test_labelled_folder_may_double_as_unlabelled_pool(folders):
  labelled, _ = folders
  batch = _take(image_folder.image_folder_semi_supervised(
      labelled, labelled, large_size=S, small_size=4, labelled_batch_size=2,
      unlabelled_batch_size=10, seed=0), 1)[0]
  assert sorted(_ids(batch["unlabelled_large"][:, 0], "labelled").tolist()) == list(range(10))
  assert np.all(batch["unlabelled_labels"] == -1)


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_covers_every_image_once(folders, process_count):
  labelled, _ = folders
  seen, counts = [], []
  for p in range(process_count):
    batches = _take(image_folder.image_folder_eval(
        labelled, image_size=S, batch_size=3 * process_count, process_index=p,
        process_count=process_count, class_names=CLASSES), 100)
    counts.append(len(batches))
    for batch in batches:
      assert batch["images"].shape == (3, S, S, 3) and batch["mask"].dtype == bool
      mask = batch["mask"]
      if not mask.any():
        assert np.all(batch["labels"] == -1) and np.all(batch["images"] == 0)
        continue
      ids = _ids(batch["images"][mask], "labelled")
      np.testing.assert_array_equal(batch["labels"][mask], [_labelled_label(i) for i in ids])
      assert np.all(batch["labels"][~mask] == -1) and np.all(batch["images"][~mask] == 0)
      seen.extend(ids.tolist())
  assert len(set(counts)) == 1  # same number of batches on every host
  assert sorted(seen) == list(range(10))


@pytest.mark.parametrize("kwargs,match", [
    (dict(labelled_batch_size=3, process_count=2), "labelled_batch_size must be divisible"),
    (dict(labelled_batch_size=12), "labelled_batch_size: the host-local batch of 12 exceeds"),
    (dict(process_index=1), r"process_index must lie in \[0, 1\)"),
    (dict(large_size=0), "large_size"),
    (dict(small_scale=(0.0, 0.5)), "small_scale"),
    (dict(seed=-2), "seed"),
    (dict(start_step=-1), "start_step"),
])
def test_bad_input_raises(folders, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _semi(folders, **kwargs)


# --- Data errors that name the file. ---

def _png_bytes(value, shape=(9, 11)):
  return tf.io.encode_png(tf.fill(list(shape) + [3], tf.constant(value, tf.uint8))).numpy()


def _pil_save(path, value, fmt, shape=(9, 11)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full(shape + (3,), value, np.uint8)).save(
      path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))


@pytest.fixture
def broken(tmp_path):
  """A labelled folder with one good image per class plus a corrupt and a truncated one."""
  root = tmp_path / "train"
  for i, name in enumerate(("bird", "cat")):
    _write_png(str(root / name / "ok.png"), 20 + 10 * i, (9, 11))
  (root / "bird" / "garbage.jpg").write_bytes(b"this is not a jpeg at all")
  jpeg = tf.io.encode_jpeg(tf.fill([32, 32, 3], tf.constant(90, tf.uint8))).numpy()
  (root / "cat" / "truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
  png = _png_bytes(70, (20, 20))
  (root / "cat" / "truncated.png").write_bytes(png[:-20])
  return str(root)


def test_corrupt_images_are_named_before_training(broken):
  with pytest.raises(ValueError) as e:
    image_folder.image_folder_semi_supervised(broken, broken, large_size=S, small_size=4,
                                              labelled_batch_size=1, unlabelled_batch_size=1,
                                              seed=0)
  message = str(e.value)
  assert "3 of 5 image files cannot be decoded" in message
  for name in ("garbage.jpg", "truncated.jpg", "truncated.png"):
    assert os.path.join(broken, "bird" if name == "garbage.jpg" else "cat", name) in message
  assert "ok.png" not in message


def test_skip_corrupt_drops_and_counts(broken):
  folder = image_folder.scan_labelled_folder(broken, skip_corrupt=True)
  assert [os.path.basename(p) for p in folder.paths] == ["ok.png", "ok.png"]
  assert folder.labels.tolist() == [0, 1] and folder.class_names == ("bird", "cat")
  assert sorted(os.path.basename(p) for p, _ in folder.skipped) == [
      "garbage.jpg", "truncated.jpg", "truncated.png"]
  assert all(reason for _, reason in folder.skipped)
  unlabelled = image_folder.scan_unlabelled_folder(broken, skip_corrupt=True)
  assert len(unlabelled.paths) == 2 and len(unlabelled.skipped) == 3
  batch = _take(image_folder.image_folder_semi_supervised(
      folder, unlabelled, large_size=S, small_size=4, labelled_batch_size=2,
      unlabelled_batch_size=2, seed=0), 1)[0]
  assert sorted(batch["labelled_large"][:, 0, 0, 0, 0].tolist()) == [20, 30]


def test_valid_jpeg_with_trailing_bytes_is_kept(tmp_path):
  # Some cameras append data after the JPEG end marker: the cheap test doubts it, the full
  # decode clears it, and TensorFlow decodes it fine.
  jpeg = tf.io.encode_jpeg(tf.fill([16, 16, 3], tf.constant(90, tf.uint8))).numpy()
  path = tmp_path / "u" / "trailer.jpg"
  path.parent.mkdir()
  path.write_bytes(jpeg + b"\x01" * 2000)
  checked = image_folder.check_images([str(path)])
  assert checked.paths == (str(path),) and not checked.skipped


def test_webp_and_tiff_are_decoded(tmp_path):
  root = tmp_path / "train"
  _pil_save(str(root / "a" / "x.webp"), 40, "WEBP")
  _pil_save(str(root / "a" / "y.tiff"), 60, "TIFF")
  _pil_save(str(root / "b" / "z.tif"), 80, "TIFF")
  _pil_save(str(root / "b" / "w.bmp"), 100, "BMP")
  folder = image_folder.scan_labelled_folder(str(root))
  assert [os.path.basename(p) for p in folder.paths] == ["x.webp", "y.tiff", "w.bmp", "z.tif"]
  assert folder.pillow.tolist() == [False, True, False, True]
  batches = _take(image_folder.image_folder_eval(folder, image_size=S, batch_size=4), 10)
  images = batches[0]["images"]
  np.testing.assert_array_equal(images[:, 0, 0, 0], [40, 60, 100, 80])
  assert (images == images[:, :1, :1]).all()  # constant images stay constant
  train = _take(image_folder.image_folder_semi_supervised(
      folder, str(root), large_size=S, small_size=4, labelled_batch_size=4,
      unlabelled_batch_size=4, seed=0), 1)[0]
  assert sorted(train["unlabelled_large"][:, 0, 0, 0, 0].tolist()) == [40, 60, 80, 100]


def test_unsupported_image_formats_are_refused_by_name(tmp_path):
  root = tmp_path / "u"
  _pil_save(str(root / "fine.png"), 10, "PNG")
  _pil_save(str(root / "odd.ppm"), 10, "PPM")
  (root / "photo.heic").write_bytes(b"\x00")
  (root / "notes.txt").write_text("not an image; ignored")
  with pytest.raises(ValueError, match=r"unsupported format.*odd\.ppm.*photo\.heic"):
    image_folder.list_images(str(root))


def test_eval_folder_uses_the_training_class_map(tmp_path):
  train, test = tmp_path / "train", tmp_path / "test"
  for name in ("bird", "cat", "dog"):
    _write_png(str(train / name / "a.png"), 10, (6, 6))
  # The test folder lacks "bird": sorted on its own, "cat" would get label 0 (training's bird).
  _write_png(str(test / "cat" / "c.png"), 111, (6, 6))
  _write_png(str(test / "dog" / "d.png"), 222, (6, 6))
  names = image_folder.scan_labelled_folder(str(train)).class_names
  batch = _take(image_folder.image_folder_eval(str(test), image_size=S, batch_size=2,
                                               class_names=names), 1)[0]
  assert dict(zip(batch["images"][:, 0, 0, 0].tolist(), batch["labels"].tolist())) == {
      111: 1, 222: 2}
  _write_png(str(test / "zebra" / "z.png"), 5, (6, 6))
  with pytest.raises(ValueError, match=r"\['zebra'\].*not in the training folder's class map"):
    image_folder.image_folder_eval(str(test), image_size=S, batch_size=2, class_names=names)
  with pytest.raises(ValueError, match="class_names is required"):
    image_folder.image_folder_eval(str(test), image_size=S, batch_size=2)


# ----- Bit depth, PNG CRCs, pixel cap (issue 21). -----

def _gradient16():
  """A 64 x 256 16-bit gradient over the whole range 0..65535."""
  return np.round(np.linspace(0, 65535, 64 * 256)).astype(np.uint16).reshape(64, 256)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_16bit_images_keep_their_range(tmp_path, fmt):
  path = tmp_path / f"g.{fmt.lower()}"
  Image.fromarray(_gradient16()).save(path, format=fmt)
  checked = image_folder.check_images([str(path)])
  assert checked.paths == (str(path),)
  # The decoder the pipeline uses for this file (Pillow for TIFF, TensorFlow for PNG).
  if checked.pillow[0]:
    rgb = image_folder.load_rgb(str(path))
  else:
    rgb = image_folder.pipelines.decode_full(tf.io.read_file(str(path))).numpy()
  assert rgb.dtype == np.uint8 and rgb.shape == (64, 256, 3)
  want = np.round(_gradient16() / 257.0)
  assert np.abs(rgb[..., 0].astype(int) - want).max() <= 1
  assert len(np.unique(rgb)) == 256
  assert (rgb == 255).mean() < 0.01


def test_float_images_are_scaled_and_out_of_range_ones_named(tmp_path):
  good = tmp_path / "good.tiff"
  Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(good)
  rgb = image_folder.load_rgb(str(good))
  np.testing.assert_array_equal(rgb[..., 1].ravel(), np.rint(np.linspace(0, 1, 64) * 255))
  bad = tmp_path / "bright.tiff"
  Image.fromarray(np.full((8, 8), 1.5, np.float32)).save(bad)
  nan = tmp_path / "nan.tiff"
  Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(nan)
  with pytest.raises(ValueError) as e:
    image_folder.check_images([str(good), str(bad), str(nan)])
  text = str(e.value)
  assert "2 of 3 image files" in text
  assert f"{bad}: ValueError: {bad}: a float image must hold values in [0, 1]" in text
  assert f"{nan}: ValueError: {nan}: 64 pixel values are not finite" in text


def _png_with_corrupt_idat(path):
  """A valid PNG with one byte inside its IDAT chunk changed (CRC no longer matches)."""
  data = bytearray(_png_bytes(77, (32, 32)))
  start = data.index(b"IDAT") + 4
  data[start + 5] ^= 0xFF
  path.write_bytes(bytes(data))


def test_png_with_corrupt_idat_is_named_at_the_scan(tmp_path):
  path = tmp_path / "bad.png"
  _png_with_corrupt_idat(path)
  with pytest.raises(ValueError, match=rf"{path}: PNG chunk 'IDAT' at byte \d+ fails its CRC"):
    image_folder.check_images([str(path)])
  checked = image_folder.check_images([str(path)], skip_corrupt=True)
  assert checked.paths == () and checked.skipped[0][0] == str(path)


def test_pixel_cap_refuses_before_decoding(tmp_path):
  path = tmp_path / "huge.png"
  # A 13000 x 13000 PNG whose pixels never need decoding to be refused: only the header is
  # valid (the scan refuses by size before reading the data).
  Image.new("L", (300, 200)).save(path)
  data = bytearray(path.read_bytes())
  data[16:24] = (13000).to_bytes(4, "big") + (13000).to_bytes(4, "big")
  data[29:33] = image_folder.zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=rf"{path}: 13000x13000 = 169,000,000 pixels exceed the "
                                       r"cap of 64,000,000 \(max_pixels\)"):
    image_folder.check_images([str(path)])
  small = tmp_path / "small.png"
  Image.new("RGB", (300, 200)).save(small)
  with pytest.raises(ValueError, match=r"300x200 = 60,000 pixels exceed the cap of 50,000"):
    image_folder.check_images([str(small)], max_pixels=50_000)
  with pytest.raises(ValueError, match=r"exceed the cap of 50,000"):
    image_folder.load_rgb(str(small), max_pixels=50_000)
