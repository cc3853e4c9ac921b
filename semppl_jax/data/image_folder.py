"""tf.data pipelines for user data: a folder of class sub-folders plus a folder of unlabelled
images is enough to pre-train.

Layout: `labelled_dir/<class name>/**/<image>` (class index = position of the class folder
name in sorted order) and `unlabelled_dir/**/<image>` (any nesting, no labels). Images are JPEG,
PNG, GIF (first frame) or BMP files, recognised by extension. To follow the paper, where the
unlabelled pool is the whole training set, point `unlabelled_dir` at a folder that also holds
the labelled images (it may be `labelled_dir` itself: its files are then used without labels).

Files are listed and sorted in Python (so every host sees the same order), each host takes a
contiguous shard of each list, and the rest is as for ImageNet (see `pipelines.py`).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from semppl_jax.data import pipelines

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


def list_images(directory: str) -> list[str]:
  """Sorted paths of all image files under `directory` (recursive, hidden entries skipped).

  Raises:
    ValueError: naming `directory` if it is not a folder or holds no image.
  """
  if not os.path.isdir(directory):
    raise ValueError(f"directory {directory!r} is not a folder")
  paths = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    paths.extend(os.path.join(root, f) for f in files
                 if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(f"directory {directory!r} holds no image files (expected extensions "
                     f"{IMAGE_EXTENSIONS})")
  return sorted(paths)


def list_image_folder(directory: str, class_names: list[str] | None = None
                      ) -> tuple[list[str], np.ndarray, list[str]]:
  """Lists a labelled folder of class sub-folders.

  Args:
    directory: folder with one sub-folder per class.
    class_names: the class order to use (e.g. the training folder's, for an evaluation
      folder); default: the sorted sub-folder names.

  Returns:
    paths (sorted within each class, classes in order), int32 labels `[N]`, class names.

  Raises:
    ValueError: naming `directory` or `class_names` when the folder has no class sub-folders,
      an empty class folder, or a sub-folder missing from `class_names`.
  """
  if not os.path.isdir(directory):
    raise ValueError(f"directory {directory!r} is not a folder")
  found = sorted(d for d in os.listdir(directory)
                 if not d.startswith(".") and os.path.isdir(os.path.join(directory, d)))
  if not found:
    raise ValueError(f"directory {directory!r} has no class sub-folders; expected "
                     f"<directory>/<class name>/<images>")
  if class_names is None:
    class_names = found
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f"class_names lacks the sub-folders {unknown} of {directory!r}")
  index = {name: i for i, name in enumerate(class_names)}
  paths, labels = [], []
  for name in found:
    class_paths = list_images(os.path.join(directory, name))
    paths.extend(class_paths)
    labels.extend([index[name]] * len(class_paths))
  return paths, np.asarray(labels, np.int32), list(class_names)


def image_folder_semi_supervised(labelled_dir: str, unlabelled_dir: str, *, image_size: int,
                                 labelled_batch_size: int, unlabelled_batch_size: int,
                                 seed: int, process_index: int = 0, process_count: int = 1,
                                 start_step: int = 0, central_fraction: float = 1.0,
                                 shuffle_buffer: int | None = None) -> tf.data.Dataset:
  """Endless semi-supervised batches from image folders, for this host.

  Args:
    labelled_dir: folder of class sub-folders.
    unlabelled_dir: folder of images (searched recursively; labels ignored).
    image_size: side S of the centred square crop.
    labelled_batch_size, unlabelled_batch_size: global batch sizes (divisible by
      `process_count`, and per host at most the host's share of the files).
    seed: data-order seed.
    process_index, process_count: this host and the number of hosts (disjoint file shards).
    start_step: global step to start from (exact resume).
    central_fraction: share of the shorter side kept by the crop.
    shuffle_buffer: per-stream shuffle buffer; None = the whole shard (a full shuffle).

  Returns:
    tf.data.Dataset of dicts `labelled_images` uint8 `[b_l, S, S, 3]`, `labels` int32
    `[b_l]`, `unlabelled_images` uint8 `[b_u, S, S, 3]`, `unlabelled_labels` int32 `[b_u]`
    (all -1: unknown).

  Raises:
    ValueError: naming a bad argument or folder.
  """
  pipelines.check_image_args(image_size, central_fraction, seed, start_step)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   labelled_batch_size=labelled_batch_size,
                                   unlabelled_batch_size=unlabelled_batch_size)
  paths, labels, _ = list_image_folder(labelled_dir)
  unlabelled_paths = list_images(unlabelled_dir)
  labelled, num_labelled = _host_records(paths, labels, process_index, process_count)
  unlabelled, num_unlabelled = _host_records(
      unlabelled_paths, np.full(len(unlabelled_paths), -1, np.int32), process_index,
      process_count)
  if shuffle_buffer is None:
    shuffle_buffer = max(num_labelled, num_unlabelled)
  pipelines.check_int("shuffle_buffer", shuffle_buffer, 1)
  return pipelines.semi_supervised_dataset(
      labelled, num_labelled, unlabelled, num_unlabelled, read_fn=tf.io.read_file,
      image_size=image_size, central_fraction=central_fraction,
      labelled_batch_size=host["labelled_batch_size"],
      unlabelled_batch_size=host["unlabelled_batch_size"], seed=seed, start_step=start_step,
      shuffle_buffer=shuffle_buffer)


def image_folder_eval(directory: str, *, image_size: int, batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      class_names: list[str] | None = None,
                      central_fraction: float = 1.0) -> tf.data.Dataset:
  """Fixed-shape evaluation batches of a labelled image folder, every image exactly once.

  Args:
    directory: folder of class sub-folders.
    image_size: side S of the centred crop.
    batch_size: global batch size (divisible by `process_count`).
    process_index, process_count: this host and the number of hosts.
    class_names: class order of the training folder (default: sorted sub-folders here).
    central_fraction: share of the shorter side kept.

  Returns:
    finite tf.data.Dataset of dicts `images` uint8 `[b, S, S, 3]`, `labels` int32 `[b]` (-1 on
    padding), `mask` bool `[b]` (False on padding); every host yields the same number of
    batches.

  Raises:
    ValueError: naming a bad argument or folder.
  """
  pipelines.check_image_args(image_size, central_fraction)
  host = pipelines.check_host_args(process_index=process_index, process_count=process_count,
                                   batch_size=batch_size)
  paths, labels, _ = list_image_folder(directory, class_names)
  records, num_host = _host_records(paths, labels, process_index, process_count,
                                    allow_empty=True)
  return pipelines.eval_dataset(records, num_host, len(paths), read_fn=tf.io.read_file,
                                image_size=image_size, central_fraction=central_fraction,
                                batch_size=host["batch_size"], process_count=process_count)


def _host_records(paths: list[str], labels: np.ndarray, process_index: int,
                  process_count: int, allow_empty: bool = False
                  ) -> tuple[tf.data.Dataset, int]:
  """This host's contiguous shard as a dataset of `(path, int32 label)`."""
  start, end = pipelines.even_shard_bounds(len(paths), process_index, process_count)
  if end == start and not allow_empty:
    raise ValueError(f"process_count={process_count} hosts exceed the {len(paths)} files; "
                     f"expected at least one file per host")
  records = tf.data.Dataset.from_tensor_slices(
      (tf.constant(paths[start:end], tf.string, shape=[end - start]),
       tf.constant(labels[start:end], tf.int32, shape=[end - start])))
  return records, end - start
