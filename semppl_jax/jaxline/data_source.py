"""Experiment glue: a config's ``data`` section as host-local training and evaluation batches.

Part of the jaxline layer (it reads config); the library functions it calls live in
``semppl_jax.data``. Each process reads only its own share of every batch.
"""
from typing import Any, Dict, NamedTuple, Tuple

import jax
from absl import logging
from ml_collections import config_dict
import numpy as np

from semppl_jax import data as data_lib
from semppl_jax import knn

EVAL_SPLITS = ("test", "validation")


class Views(NamedTuple):
  """The crops a host pipeline cuts from each full image (ImageNet and image folders)."""
  num_large: int
  large_size: int
  large_scale: Tuple[float, float]
  num_small: int = 0
  small_size: int = 1
  small_scale: Tuple[float, float] = (0.08, 1.0)
  antialias: bool = False  # Smooth host crops before shrinking (pipelines.MultiCrop).


class DataSource:
  """Host-local training batches by step and evaluation batches by split, for one config.

  ``train_batch(step)`` returns this host's share of global step ``step``'s batch: for
  Fashion-MNIST whole images (``labelled_images``, ``unlabelled_images``; cropped on device),
  for ImageNet and image folders views cropped from the full image on the host
  (``labelled_large``, ``labelled_small``, ``unlabelled_large``, ``unlabelled_small``), plus
  ``labels`` and ``unlabelled_labels`` (hidden truth, monitoring only; -1 if unknown).
  ``eval_batches(split)`` yields padded batches (``images``, ``labels``, ``mask``) of the
  evaluation split (``'test'``; ``data.eval_split='validation'`` swaps in held-out training
  images) or of the kNN bank (``'bank'``: the labelled training images the run was given).
  """

  def __init__(self, data_config: config_dict.ConfigDict, eval_config: config_dict.ConfigDict,
               views: Views):
    d = self._config = data_config
    self._views = views
    self._eval_batch_size = eval_config.batch_size
    self._process = dict(process_index=jax.process_index(), process_count=jax.process_count())
    self._iterator, self._next_step, self._batches = None, None, None
    eval_split = d.get("eval_split", "test")
    if eval_split not in EVAL_SPLITS:
      raise ValueError(f"config.data.eval_split: got {eval_split!r}, allowed: 'test', "
                       "'validation'.")
    if eval_split == "validation" and d.dataset != "fashion_mnist":
      raise ValueError("config.data.eval_split: 'validation' is available for "
                       f"data.dataset='fashion_mnist' only, got {d.dataset!r}.")
    if d.dataset == "fashion_mnist":
      self._init_fashion_mnist(eval_split, eval_config.max_examples)
    elif d.dataset == "image_folder":
      skip = bool(d.get("skip_corrupt_images", False))
      self._labelled = data_lib.scan_labelled_folder(d.labelled_dir, skip_corrupt=skip)
      self._unlabelled = data_lib.scan_unlabelled_folder(d.unlabelled_dir, skip_corrupt=skip)
      self._test_folder = data_lib.scan_labelled_folder(
          d.test_dir, class_names=self._labelled.class_names, skip_corrupt=skip)
      skipped = self._labelled.skipped + self._unlabelled.skipped + self._test_folder.skipped
      if len(self._labelled.class_names) != d.num_classes:
        raise ValueError(f"config.data.num_classes: {d.num_classes}, but data.labelled_dir has "
                         f"{len(self._labelled.class_names)} class folders "
                         f"{list(self._labelled.class_names)}.")
      for path, reason in skipped:
        logging.warning("skipped corrupt image %s: %s", path, reason)
      if skipped:
        print(f"[data] skipped {len(skipped)} corrupt image(s) (listed in the log)", flush=True)

  def _init_fashion_mnist(self, eval_split: str, max_examples: int) -> None:
    d = self._config
    train_images, train_labels = data_lib.load_fashion_mnist("train", d.data_dir)
    labelled = data_lib.load_label_split("fashion_mnist", d.label_percent, labels=train_labels)
    self._bank = (train_images[labelled], train_labels[labelled])
    unlabelled = np.arange(len(train_labels))
    if eval_split == "validation":
      held_out = data_lib.load_validation_split("fashion_mnist", train_labels)
      self._test = (train_images[held_out], train_labels[held_out])
      unlabelled = data_lib.train_indices_without(len(train_labels), held_out)
    else:
      self._test = data_lib.load_fashion_mnist("test", d.data_dir)
    self._eval_bank = self._bank
    if max_examples:  # Quick runs and tests: evaluate on the first examples only.
      cut = lambda pair: tuple(x[:max_examples] for x in pair)
      self._test, self._eval_bank = cut(self._test), cut(self._bank)
    for (_, labels), what in ((self._bank, "labelled"), (self._test, eval_split)):
      knn.check_labels(labels, d.num_classes, allow_empty=False,
                       name=f"labels of the {what} images (config.data.num_classes)")
    self._batches = data_lib.SemiSupervisedBatches(
        labelled_images=self._bank[0], labelled_labels=self._bank[1],
        unlabelled_images=train_images[unlabelled], unlabelled_labels=train_labels[unlabelled],
        labelled_batch_size=d.labelled_batch_size,
        unlabelled_batch_size=d.unlabelled_batch_size, seed=d.seed, **self._process)

  def _train_dataset(self, start_step: int):
    d, v = self._config, self._views
    kwargs = dict(labelled_batch_size=d.labelled_batch_size,
                  unlabelled_batch_size=d.unlabelled_batch_size, seed=d.seed,
                  start_step=start_step, num_large=v.num_large, large_size=v.large_size,
                  large_scale=tuple(v.large_scale), num_small=v.num_small,
                  small_size=v.small_size, small_scale=tuple(v.small_scale),
                  antialias=v.antialias, **self._process)
    if d.dataset == "imagenet":
      return data_lib.imagenet_semi_supervised(d.label_percent, data_dir=d.data_dir or None,
                                               **kwargs)
    return data_lib.image_folder_semi_supervised(self._labelled, self._unlabelled, **kwargs)

  def train_batch(self, step: int) -> Dict[str, np.ndarray]:
    """This host's share of the batch of global step ``step`` (see the class docstring)."""
    if self._batches is not None:
      return self._batches(step)  # A pure function of (seed, step): exact resume.
    if self._iterator is None or step != self._next_step:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._iterator = iter(tfds.as_numpy(self._train_dataset(step)))
    batch = next(self._iterator)
    self._next_step = step + 1
    knn.check_labels(batch["labels"], self._config.num_classes, allow_empty=False,
                     name="labels of the labelled images (config.data.num_classes)")
    return batch

  def eval_batches(self, split: str) -> Any:
    """Padded evaluation batches of ``'test'`` (the evaluation split) or ``'bank'``."""
    d = self._config
    kwargs = dict(batch_size=self._eval_batch_size, **self._process)
    if d.dataset == "fashion_mnist":
      images, labels = self._test if split == "test" else self._eval_bank
      return data_lib.eval_batches(images, labels, **kwargs)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if d.dataset == "imagenet":
      if split == "test":
        ds = data_lib.imagenet_eval(image_size=d.image_size, data_dir=d.data_dir or None,
                                    split="validation", **kwargs)
      else:
        ds = data_lib.imagenet_knn_bank(d.label_percent, image_size=d.image_size,
                                        data_dir=d.data_dir or None, **kwargs)
    else:
      folder = self._test_folder if split == "test" else self._labelled
      ds = data_lib.image_folder_eval(folder, image_size=d.image_size, **kwargs)
    return tfds.as_numpy(ds)
