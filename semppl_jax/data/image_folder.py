"""tf.data pipelines for user data: a folder of class sub-folders plus a folder of unlabelled
images is enough to pre-train.

Layout: `labelled_dir/<class name>/**/<image>` (class index = position of the class folder
name in sorted order) and `unlabelled_dir/**/<image>` (any nesting, no labels). To follow the
paper, where the unlabelled pool is the whole training set, point `unlabelled_dir` at a folder
that also holds the labelled images (it may be `labelled_dir` itself: its files are then used
without labels). An evaluation folder is labelled with the *training* folder's class map.

Formats: JPEG, PNG, GIF (first frame), BMP and WebP are decoded by TensorFlow; TIFF (and any
file whose content Pillow identifies as another format) by Pillow inside the pipeline. Files
with another image extension that Pillow knows (`.ppm`, `.ico`, `.heic`, ...) are refused by
name, never skipped silently; files that are not images by extension (`.txt`, `.json`) and
hidden entries are ignored.

Before any pipeline is built every image is checked (`check_images`): Pillow reads its header,
images above a pixel cap (`max_pixels`, default 64 MP) are refused before anything is decoded,
PNG chunk CRCs are verified (a damaged IDAT fails here, not at the first batch), and a cheap
end-of-file test catches truncated files (confirmed by a full decode only when the test is in
doubt); `full_decode=True` decodes every file. Bad files are reported by path, or dropped and
counted with `skip_corrupt=True`; so a broken file never surfaces as an anonymous TensorFlow
error in the middle of training (and again on resume). JPEG has no checksums: garbage inside
the entropy-coded data decodes (libjpeg warns "Corrupt JPEG data") and is not detected.

Bit depth: 16-bit images keep their range (TensorFlow scales 16-bit PNG to 8 bits; Pillow's
16-bit and 32-bit integer modes are scaled by 255 / 65535 here, not clipped at 255), and float
images (Pillow mode F, e.g. float TIFF) must hold values in [0, 1], scaled by 255; values out
of range are refused by name at the scan.

Files are listed and sorted in Python (so every host sees the same order), each host takes a
contiguous shard of each list, and the rest is as for ImageNet (see `pipelines.py`).
"""

from __future__ import annotations

import concurrent.futures
import os
import struct
from typing import NamedTuple, Sequence
import zlib

import numpy as np
from PIL import Image
import tensorflow as tf

from semppl_jax import checks
from semppl_jax.data import pipelines

# Extensions decoded by TensorFlow, and those decoded by Pillow.
TF_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp")
PILLOW_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = TF_EXTENSIONS + PILLOW_EXTENSIONS
# Image extensions that Pillow may not register (plugins) but that are clearly images.
_OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".svg", ".raw", ".cr2", ".nef",
                           ".dng", ".arw", ".jp2", ".j2k", ".psd", ".tga", ".ico", ".ppm",
                           ".pgm", ".pbm", ".pnm")
# Pillow's format names that tf.io.decode_image reads (MPO: camera multi-picture JPEG).
_TF_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP"})
# Bytes read from the end of a file for the truncation test.
_TAIL_BYTES = 1024
_PNG_END = b"IEND\xaeB`\x82"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Default pixel cap (width x height) of one image: refused before decoding above it.
MAX_PIXELS = 64_000_000
# Pillow modes holding integers wider than 8 bits (16-bit data: scaled by 255 / 65535).
_WIDE_INT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class ImageCheck(NamedTuple):
  """Result of `check_images`.

  Attributes:
    paths: the readable images, in input order.
    pillow: bool `[len(paths)]`, True where the pipeline must decode with Pillow (formats
      TensorFlow cannot read, e.g. TIFF).
    skipped: `(path, reason)` of every file dropped with `skip_corrupt=True`.
  """
  paths: tuple[str, ...]
  pillow: np.ndarray
  skipped: tuple[tuple[str, str], ...]


class ImageFolder(NamedTuple):
  """A checked listing of an image folder (`scan_labelled_folder`, `scan_unlabelled_folder`).

  Attributes:
    paths: image paths (labelled: sorted within each class, classes in order).
    labels: int32 `[N]` class indices (-1 for an unlabelled folder).
    class_names: the class map (index = position); () for an unlabelled folder.
    pillow: bool `[N]`, True where the pipeline decodes with Pillow.
    skipped: `(path, reason)` of corrupt files dropped with `skip_corrupt=True` (log them).
  """
  paths: tuple[str, ...]
  labels: np.ndarray
  class_names: tuple[str, ...]
  pillow: np.ndarray
  skipped: tuple[tuple[str, str], ...]


def _refused_extensions() -> frozenset[str]:
  known = set(Image.registered_extensions()) | set(_OTHER_IMAGE_EXTENSIONS)
  return frozenset(known - set(IMAGE_EXTENSIONS))


def list_images(directory: str) -> list[str]:
  """Sorted paths of all image files under `directory` (recursive, hidden entries skipped).

  Raises:
    ValueError: naming `directory` if it is not a folder or holds no image, or naming every
      file with an image extension that is not supported (see the module docstring).
  """
  if not os.path.isdir(directory):
    raise ValueError(f"directory {directory!r} is not a folder")
  refused_ext = _refused_extensions()
  paths, refused = [], []
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for f in files:
      if f.startswith("."):
        continue
      ext = os.path.splitext(f)[1].lower()
      if ext in IMAGE_EXTENSIONS:
        paths.append(os.path.join(root, f))
      elif ext in refused_ext:
        refused.append(os.path.join(root, f))
  if refused:
    raise ValueError(f"directory {directory!r} holds {len(refused)} image file(s) of an "
                     f"unsupported format (supported extensions: {IMAGE_EXTENSIONS}); convert "
                     f"or remove: {sorted(refused)}")
  if not paths:
    raise ValueError(f"directory {directory!r} holds no image files (expected extensions "
                     f"{IMAGE_EXTENSIONS})")
  return sorted(paths)


def _class_folders(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    raise ValueError(f"directory {directory!r} is not a folder")
  found = sorted(d for d in os.listdir(directory)
                 if not d.startswith(".") and os.path.isdir(os.path.join(directory, d)))
  if not found:
    raise ValueError(f"directory {directory!r} has no class sub-folders; expected "
                     f"<directory>/<class name>/<images>")
  return found


def list_image_folder(directory: str, class_names: Sequence[str] | None = None
                      ) -> tuple[list[str], np.ndarray, list[str]]:
  """Lists a labelled folder of class sub-folders (no image check; see `scan_labelled_folder`).

  Args:
    directory: folder with one sub-folder per class.
    class_names: the class map to use (for an evaluation folder: the *training* folder's);
      default: the sorted sub-folder names. A sub-folder absent from it is refused.

  Returns:
    paths (sorted within each class, classes in order), int32 labels `[N]`, class names.

  Raises:
    ValueError: naming `directory` or `class_names` when the folder has no class sub-folders,
      an empty class folder, or sub-folders missing from `class_names` (listed by name).
  """
  found = _class_folders(directory)
  if class_names is None:
    class_names = found
  class_names = list(class_names)
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f"class_names lacks the sub-folders {unknown} of {directory!r}: these "
                     f"classes are not in the training folder's class map {class_names}")
  index = {name: i for i, name in enumerate(class_names)}
  paths, labels = [], []
  for name in found:
    class_paths = list_images(os.path.join(directory, name))
    paths.extend(class_paths)
    labels.extend([index[name]] * len(class_paths))
  return paths, np.asarray(labels, np.int32), class_names


def _pixel_problem(width: int, height: int, max_pixels: int) -> str | None:
  if width * height > max_pixels:
    return (f"{width}x{height} = {width * height:,} pixels exceed the cap of {max_pixels:,} "
            "(max_pixels); refused before decoding")
  return None


def _png_crc_problem(path: str) -> str | None:
  """Verifies the CRC of every PNG chunk (reads the file once; no decompression)."""
  with open(path, "rb") as f:
    data = f.read()
  if not data.startswith(_PNG_SIGNATURE):
    return "not a PNG signature"
  pos = len(_PNG_SIGNATURE)
  while pos + 12 <= len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    end = pos + 8 + length
    if end + 4 > len(data):
      return f"PNG chunk at byte {pos} runs past the end of the file (truncated)"
    kind = data[pos + 4:pos + 8]
    (crc,) = struct.unpack(">I", data[end:end + 4])
    if zlib.crc32(data[pos + 4:end]) != crc:
      return f"PNG chunk {kind.decode('latin-1')!r} at byte {pos} fails its CRC (corrupt data)"
    if kind == b"IEND":
      return None
    pos = end + 4
  return "PNG without an IEND chunk (truncated)"


def _problem(path: str, full_decode: bool, max_pixels: int = MAX_PIXELS
             ) -> tuple[str | None, bool]:
  """(why `path` cannot be used or None, whether Pillow must decode it)."""
  try:
    with Image.open(path) as image:
      fmt = image.format
      width, height = image.size
      too_big = _pixel_problem(width, height, max_pixels)
      if too_big:
        return too_big, False
      if fmt not in _TF_FORMATS:
        # Formats Pillow decodes in the pipeline get the full test here: it is what runs.
        _to_rgb(image, path)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    # PIL.UnidentifiedImageError and truncation errors are OSErrors.
    return f"{type(e).__name__}: {e}", False
  if width < 1 or height < 1:
    return f"empty image ({width}x{height})", False
  if fmt == "PNG":
    crc = _png_crc_problem(path)
    if crc:
      return crc, False
  if fmt in _TF_FORMATS and (full_decode or _looks_truncated(path, fmt)):
    # Valid files may carry bytes after their end marker, so a doubtful file is decoded in
    # full, by the decoder the pipeline uses (Pillow is more lenient than TensorFlow).
    try:
      pipelines.decode_full(tf.io.read_file(path))
    except tf.errors.OpError as e:
      return f"TensorFlow cannot decode it ({e.message.splitlines()[0]})", False
  return None, fmt not in _TF_FORMATS


def _looks_truncated(path: str, fmt: str) -> bool:
  """Cheap end-of-file test: the format's end marker or declared size is missing."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(12)
    f.seek(max(0, size - _TAIL_BYTES))
    tail = f.read()
  if fmt in ("JPEG", "MPO"):
    return b"\xff\xd9" not in tail
  if fmt == "PNG":
    return _PNG_END not in tail
  if fmt == "GIF":
    return not tail.rstrip(b"\x00").endswith(b";")
  if fmt == "WEBP":  # RIFF: the chunk size + 8 is the file size.
    return int.from_bytes(head[4:8], "little") + 8 > size
  if fmt == "BMP":  # bfSize: the declared file size.
    return int.from_bytes(head[2:6], "little") > size
  return False


def check_images(paths: Sequence[str], *, skip_corrupt: bool = False,
                 full_decode: bool = False, num_threads: int = 16,
                 max_pixels: int = MAX_PIXELS) -> ImageCheck:
  """The validation pass: finds every image file that the pipeline could not decode.

  Per file: Pillow identifies the format and reads the header; an image of more than
  `max_pixels` pixels is refused before decoding; PNG chunk CRCs are verified; JPEG, PNG, GIF,
  WebP and BMP files get a cheap end-of-file test for truncation (a full TensorFlow decode
  confirms a suspicious one); formats decoded by Pillow in the pipeline (TIFF) are decoded
  fully, and their values checked (float images must lie in [0, 1], wide integers in
  [0, 65535]). `full_decode` decodes every file fully (slow; catches a damaged stream that
  TensorFlow refuses but the cheap tests miss; JPEG entropy-data garbage still decodes).

  Args:
    paths: image files.
    skip_corrupt: drop bad files and return them in `skipped` instead of raising.
    full_decode: decode every image fully.
    num_threads: files checked concurrently (the pass is dominated by file reads).
    max_pixels: largest width x height accepted (default :data:`MAX_PIXELS`, 64 MP).

  Returns:
    an `ImageCheck` (good paths in input order, Pillow flags, skipped files with reasons).

  Raises:
    ValueError: without `skip_corrupt`, naming every bad file and why.
  """
  checks.check_int("num_threads", num_threads, 1)
  checks.check_int("max_pixels", max_pixels, 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    results = list(pool.map(lambda p: _problem(p, full_decode, max_pixels), paths))
  bad = tuple((p, why) for p, (why, _) in zip(paths, results) if why is not None)
  if bad and not skip_corrupt:
    listing = "\n".join(f"  {p}: {why}" for p, why in bad)
    raise ValueError(f"{len(bad)} of {len(paths)} image files cannot be decoded (fix or "
                     f"remove them, or pass skip_corrupt=True to drop them):\n{listing}")
  good = [(p, pillow) for p, (why, pillow) in zip(paths, results) if why is None]
  return ImageCheck(tuple(p for p, _ in good), np.asarray([f for _, f in good], bool), bad)


def scan_labelled_folder(directory: str, *, class_names: Sequence[str] | None = None,
                         skip_corrupt: bool = False, full_decode: bool = False,
                         num_threads: int = 16, max_pixels: int = MAX_PIXELS) -> ImageFolder:
  """Lists and checks a labelled folder of class sub-folders.

  Args:
    directory: folder with one sub-folder per class.
    class_names: the class map; for an evaluation folder pass the *training* folder's
      (`scan_labelled_folder(train_dir).class_names`); default: sorted sub-folder names.
    skip_corrupt, full_decode, num_threads, max_pixels: as for `check_images`.

  Returns:
    an `ImageFolder`; `skipped` lists dropped files (with `skip_corrupt`).

  Raises:
    ValueError: naming unknown class folders, unsupported or (without `skip_corrupt`)
      corrupt files, or a folder left without images.
  """
  paths, labels, names = list_image_folder(directory, class_names)
  checked = check_images(paths, skip_corrupt=skip_corrupt, full_decode=full_decode,
                         num_threads=num_threads, max_pixels=max_pixels)
  if not checked.paths:
    raise ValueError(f"directory {directory!r} has no decodable image left after dropping "
                     f"{len(checked.skipped)} corrupt files")
  good = set(checked.paths)
  keep = np.asarray([p in good for p in paths], bool)
  return ImageFolder(checked.paths, labels[keep], tuple(names), checked.pillow, checked.skipped)


def scan_unlabelled_folder(directory: str, *, skip_corrupt: bool = False,
                           full_decode: bool = False, num_threads: int = 16,
                           max_pixels: int = MAX_PIXELS) -> ImageFolder:
  """Lists and checks a folder of unlabelled images (recursive); labels are all -1.

  Raises:
    ValueError: as `scan_labelled_folder`.
  """
  checked = check_images(list_images(directory), skip_corrupt=skip_corrupt,
                         full_decode=full_decode, num_threads=num_threads,
                         max_pixels=max_pixels)
  if not checked.paths:
    raise ValueError(f"directory {directory!r} has no decodable image left after dropping "
                     f"{len(checked.skipped)} corrupt files")
  return ImageFolder(checked.paths, np.full(len(checked.paths), -1, np.int32), (),
                     checked.pillow, checked.skipped)


def _to_rgb(image: Image.Image, path: str) -> np.ndarray:
  """uint8 `[H, W, 3]` of an opened Pillow image, with its value range kept.

  8-bit modes go through `convert('RGB')`. 16-bit / 32-bit integer modes (16-bit TIFF or PNG)
  are scaled by 255 / 65535 (values must lie in [0, 65535]); float mode F by 255 (values must
  lie in [0, 1]). Pillow's own conversion would clip both at 255 (a 0..65535 gradient became
  two values).

  Raises:
    ValueError: values out of range or not finite, naming `path`.
  """
  mode = image.mode
  if mode in _WIDE_INT_MODES or mode == "F":
    values = np.asarray(image)
    if mode == "F":
      lo, hi, scale, what = 0.0, 1.0, 255.0, "a float image must hold values in [0, 1]"
      finite = np.isfinite(values)
      if not finite.all():
        raise ValueError(f"{path}: {values.size - int(finite.sum()):,} pixel values are not "
                         "finite (NaN or inf)")
    else:
      lo, hi, scale, what = 0, 65535, 255.0 / 65535.0, ("a 16-bit image must hold values in "
                                                         "[0, 65535]")
    vmin, vmax = values.min(), values.max()
    if vmin < lo or vmax > hi:
      raise ValueError(f"{path}: {what} (Pillow mode {mode}), found [{vmin}, {vmax}]")
    gray = np.rint(values.astype(np.float64) * scale).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  return np.asarray(image.convert("RGB"), np.uint8)


def load_rgb(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Decodes an image file with Pillow: uint8 `[H, W, 3]` (first frame; any mode -> RGB,
  16-bit and float images scaled as `_to_rgb` says).

  Raises:
    ValueError: naming the file when Pillow cannot decode it, its values are out of range, or
      it has more than `max_pixels` pixels (checked before decoding).
  """
  path = path.decode() if isinstance(path, bytes) else str(path)
  try:
    with Image.open(path) as image:
      too_big = _pixel_problem(*image.size, max_pixels)
      if too_big:
        raise ValueError(too_big)
      return _to_rgb(image, path)
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


def _pillow_decode(path: tf.Tensor) -> tf.Tensor:
  image = tf.numpy_function(load_rgb, [path], tf.uint8, stateful=False)
  image.set_shape([None, None, 3])
  return image


def _decode(source) -> tf.Tensor:
  """(path, pillow flag) -> the full decoded image, uint8 `[H, W, 3]`."""
  path, pillow = source
  return tf.cond(pillow, lambda: _pillow_decode(path),
                 lambda: pipelines.decode_full(tf.io.read_file(path)))


def image_folder_semi_supervised(labelled_dir: str | ImageFolder,
                                 unlabelled_dir: str | ImageFolder, *,
                                 labelled_batch_size: int, unlabelled_batch_size: int,
                                 seed: int, process_index: int = 0, process_count: int = 1,
                                 start_step: int = 0, shuffle_buffer: int | None = None,
                                 num_large: int = 4, large_size: int = 224,
                                 large_scale: tuple[float, float] = (0.08, 1.0),
                                 num_small: int = 2, small_size: int = 96,
                                 small_scale: tuple[float, float] = (0.08, 1.0),
                                 aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
                                 max_attempts: int = 10,
                                 antialias: bool = False) -> tf.data.Dataset:
  """Endless semi-supervised batches of multi-crop views from image folders, for this host.

  The same code path as `imagenet.imagenet_semi_supervised`: every view is a random-resized
  crop of the full decoded image.

  Args:
    labelled_dir: folder of class sub-folders, or its `scan_labelled_folder` result (scan
      first to choose `skip_corrupt` and to log `skipped`; a path is scanned here and any
      corrupt file raises).
    unlabelled_dir: folder of images (recursive; labels ignored) or its
      `scan_unlabelled_folder` result.
    labelled_batch_size, unlabelled_batch_size: global batch sizes (divisible by
      `process_count`, and per host at most the host's share of the files).
    seed: data-order and crop seed.
    process_index, process_count: this host and the number of hosts (disjoint file shards).
    start_step: global step to start from (exact resume: same images, same crops).
    shuffle_buffer: per-stream shuffle buffer; None = the whole shard (a full shuffle).
    num_large, large_size, large_scale, num_small, small_size, small_scale,
      aspect_ratio_range, max_attempts, antialias: the views, as for
      `imagenet_semi_supervised`.

  Returns:
    tf.data.Dataset of dicts `labelled_large` uint8 `[b_l, L, Hl, Hl, 3]`, `labelled_small`
    uint8 `[b_l, S, Hs, Hs, 3]`, `labels` int32 `[b_l]`, `unlabelled_large` uint8
    `[b_u, L, Hl, Hl, 3]`, `unlabelled_small` uint8 `[b_u, S, Hs, Hs, 3]`,
    `unlabelled_labels` int32 `[b_u]` (all -1: unknown).

  Raises:
    ValueError: naming a bad argument, folder or file.
  """
  crops = pipelines.MultiCrop(num_large, large_size, large_scale, num_small, small_size,
                              small_scale, aspect_ratio_range, max_attempts,
                              antialias).check()
  checks.check_int("seed", seed, 0)
  checks.check_int("start_step", start_step, 0)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   labelled_batch_size=labelled_batch_size,
                                   unlabelled_batch_size=unlabelled_batch_size)
  labelled = (labelled_dir if isinstance(labelled_dir, ImageFolder)
              else scan_labelled_folder(labelled_dir))
  unlabelled = (unlabelled_dir if isinstance(unlabelled_dir, ImageFolder)
                else scan_unlabelled_folder(unlabelled_dir))
  lab_records, num_labelled = _host_records(labelled, process_index, process_count)
  unlab_records, num_unlabelled = _host_records(
      unlabelled._replace(labels=np.full(len(unlabelled.paths), -1, np.int32)),
      process_index, process_count)
  if shuffle_buffer is None:
    shuffle_buffer = max(num_labelled, num_unlabelled)
  checks.check_int("shuffle_buffer", shuffle_buffer, 1)
  return pipelines.semi_supervised_dataset(
      lab_records, num_labelled, unlab_records, num_unlabelled, decode_fn=_decode,
      crops=crops, labelled_batch_size=host["labelled_batch_size"],
      unlabelled_batch_size=host["unlabelled_batch_size"], seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer, process_index=process_index)


def image_folder_eval(directory: str | ImageFolder, *, image_size: int, batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      class_names: Sequence[str] | None = None,
                      central_fraction: float = 1.0) -> tf.data.Dataset:
  """Fixed-shape evaluation batches of a labelled image folder, every image exactly once.

  Args:
    directory: folder of class sub-folders, or a `scan_labelled_folder` result made with the
      training folder's class map.
    image_size: side S of the centred crop.
    batch_size: global batch size (divisible by `process_count`).
    process_index, process_count: this host and the number of hosts.
    class_names: the *training* folder's class map (`ImageFolder.class_names`); required
      when `directory` is a path, so that a test folder's "cat" gets training's label for
      "cat". Sub-folders not in it are refused by name.
    central_fraction: share of the shorter side kept.

  Returns:
    finite tf.data.Dataset of dicts `images` uint8 `[b, S, S, 3]`, `labels` int32 `[b]` (-1 on
    padding), `mask` bool `[b]` (False on padding); every host yields the same number of
    batches.

  Raises:
    ValueError: naming a bad argument, folder, class folder or file.
  """
  pipelines.check_image_args(image_size, central_fraction)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   batch_size=batch_size)
  if isinstance(directory, ImageFolder):
    folder = directory
  else:
    if class_names is None:
      raise ValueError(f"class_names is required for the evaluation folder {directory!r}: "
                       f"pass the training folder's class map (scan_labelled_folder("
                       f"train_dir).class_names), or labels would follow this folder's own "
                       f"sorted sub-folders")
    folder = scan_labelled_folder(directory, class_names=class_names)
  records, num_host = _host_records(folder, process_index, process_count, allow_empty=True)

  def preprocess(source):
    path, pillow = source
    return tf.cond(
        pillow,
        lambda: pipelines.center_crop_resize(_pillow_decode(path), image_size,
                                             central_fraction),
        lambda: pipelines.decode_center_crop(tf.io.read_file(path), image_size,
                                             central_fraction))

  return pipelines.eval_dataset(records, num_host, len(folder.paths), preprocess_fn=preprocess,
                                image_size=image_size, batch_size=host["batch_size"],
                                process_count=process_count)


def _host_records(folder: ImageFolder, process_index: int, process_count: int,
                  allow_empty: bool = False) -> tuple[tf.data.Dataset, int]:
  """This host's contiguous shard as a dataset of `((path, pillow flag), int32 label)`."""
  n = len(folder.paths)
  start, end = pipelines.even_shard_bounds(n, process_index, process_count)
  if end == start and not allow_empty:
    raise ValueError(f"process_count={process_count} hosts exceed the {n} files; "
                     f"expected at least one file per host")
  count = end - start
  records = tf.data.Dataset.from_tensor_slices((
      (tf.constant(list(folder.paths[start:end]), tf.string, shape=[count]),
       tf.constant(folder.pillow[start:end], tf.bool, shape=[count])),
      tf.constant(folder.labels[start:end], tf.int32, shape=[count])))
  return records, count
