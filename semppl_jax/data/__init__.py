"""Input data for SemPPL: host-local numpy batches, label splits, tf.data pipelines.

* `fashion_mnist`: the embedded default dataset (IDX reader, tfds fallback).
* `splits`: seeded class-balanced label and validation splits (dataset-agnostic), committed
  as JSON under `splits/`.
* `batching`: resumable semi-supervised and evaluation batches from in-memory arrays.
* `imagenet`, `image_folder` (+ `pipelines`): tf.data pipelines for file-based data.
* `info`: static dataset metadata.

The numpy-only names are imported eagerly; the tf.data ones are resolved on first access, so
that `from semppl_jax.data import load_fashion_mnist` does not import TensorFlow.
"""

import importlib

from semppl_jax.data.batching import eval_batches
from semppl_jax.data.batching import iterate
from semppl_jax.data.batching import semi_supervised_batch
from semppl_jax.data.batching import SemiSupervisedBatches
from semppl_jax.data.fashion_mnist import fashion_mnist_semi_supervised
from semppl_jax.data.fashion_mnist import fashion_mnist_validation
from semppl_jax.data.fashion_mnist import load_fashion_mnist
from semppl_jax.data.fashion_mnist import write_fashion_mnist_split_files
from semppl_jax.data.info import dataset_info
from semppl_jax.data.info import DatasetInfo
from semppl_jax.data.splits import check_split_matches_labels
from semppl_jax.data.splits import load_label_split
from semppl_jax.data.splits import load_validation_split
from semppl_jax.data.splits import make_label_split
from semppl_jax.data.splits import make_validation_split
from semppl_jax.data.splits import train_indices_without
from semppl_jax.data.splits import validate_label_split

# Names that live in TensorFlow-importing modules: name -> module.
_LAZY = {
    "imagenet_semi_supervised": "semppl_jax.data.imagenet",
    "imagenet_eval": "semppl_jax.data.imagenet",
    "imagenet_knn_bank": "semppl_jax.data.imagenet",
    "check_images": "semppl_jax.data.image_folder",
    "ImageFolder": "semppl_jax.data.image_folder",
    "scan_labelled_folder": "semppl_jax.data.image_folder",
    "scan_unlabelled_folder": "semppl_jax.data.image_folder",
    "MultiCrop": "semppl_jax.data.pipelines",
    "image_folder_semi_supervised": "semppl_jax.data.image_folder",
    "image_folder_eval": "semppl_jax.data.image_folder",
    "list_image_folder": "semppl_jax.data.image_folder",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'semppl_jax.data' has no attribute {name!r}")


__all__ = [
    "DatasetInfo", "SemiSupervisedBatches", "check_split_matches_labels", "dataset_info",
    "eval_batches", "fashion_mnist_semi_supervised", "fashion_mnist_validation", "iterate",
    "load_fashion_mnist", "load_label_split", "load_validation_split", "make_label_split",
    "make_validation_split", "semi_supervised_batch", "train_indices_without",
    "validate_label_split", "write_fashion_mnist_split_files",
] + sorted(_LAZY)
