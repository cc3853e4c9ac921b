"""Labelling images by kNN over the embeddings of a few labelled ones (``experiments/label.py``,
the notebooks).

Image sets (:class:`Images`: a folder of class sub-folders, a folder of unlabelled images, or the
committed Fashion-MNIST label split and test split) are embedded with
``semppl_jax.encoders`` and each unlabelled image gets the label of its ``k`` nearest labelled
images (:func:`knn_labels`):

* ``vote='weighted'``: the class with the largest sum of ``exp(cos / temperature)`` over the
  neighbours (the weighted kNN of the evaluations); ``vote_share`` is that class's part of the
  sum;
* ``vote='majority'``: the most frequent class among the neighbours, ties to the class whose
  neighbours are more similar (the SemPPL pseudo-labeller, ``knn.knn_vote``); ``vote_share`` is
  its share of the neighbours.

Errors are ``ValueError("<argument>: ...")`` naming the argument at fault.
"""
import os
from typing import Callable, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from semppl_jax import encoders
from semppl_jax import evaluation
from semppl_jax import knn
from semppl_jax import data as data_lib
from semppl_jax.data import image_folder

VOTES = ("weighted", "majority")


class Images(NamedTuple):
  """A set of images to embed: names, int32 labels [N] (-1 unknown), class names, batches."""
  names: Tuple[str, ...]
  labels: np.ndarray
  class_names: Tuple[str, ...]
  batches: Callable  # () -> iterable of {'images', 'labels', 'mask'} evaluation batches.


class Labels(NamedTuple):
  """The result of :func:`knn_labels` for U unlabelled images and M labelled ones.

  Attributes:
    predicted: int32 [U], the predicted class.
    vote_share: float32 [U], the predicted class's share of the vote.
    nearest: int32 [U], index of the nearest labelled image.
    nearest_similarity: float32 [U], its cosine similarity.
  """
  predicted: np.ndarray
  vote_share: np.ndarray
  nearest: np.ndarray
  nearest_similarity: np.ndarray


# ----------------------------------------------------------------------------------------------
# The images.
# ----------------------------------------------------------------------------------------------

def _check_labelled_layout(directory: str) -> None:
  """Refuses loose images next to the class folders (they would be silently left out)."""
  if not os.path.isdir(directory):
    raise ValueError(f"labelled_dir: {directory!r} is not a folder")
  loose = sorted(f for f in os.listdir(directory)
                 if os.path.isfile(os.path.join(directory, f))
                 and os.path.splitext(f)[1].lower() in image_folder.IMAGE_EXTENSIONS)
  if loose:
    raise ValueError(f"labelled_dir: {directory!r} holds {len(loose)} image(s) outside class "
                     f"sub-folders (e.g. {loose[0]!r}); put every labelled image in "
                     "<labelled_dir>/<class name>/")


def folder_images(labelled_dir: str, unlabelled_dir: str, image_size: int,
                  batch_size: int) -> Tuple[Images, Images]:
  """The labelled (class sub-folders) and unlabelled image folders, checked (every file
  decodable); images centre-cropped to a square and resized to ``image_size``."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _check_labelled_layout(labelled_dir)
  try:
    labelled = data_lib.scan_labelled_folder(labelled_dir)
  except ValueError as e:
    raise ValueError(f"labelled_dir: {e}") from e
  if len(labelled.class_names) < 2:
    raise ValueError(f"labelled_dir: {labelled_dir!r} has {len(labelled.class_names)} class "
                     f"folder(s) {list(labelled.class_names)}; labelling needs at least two "
                     "classes, one sub-folder each")
  try:
    unlabelled = data_lib.scan_unlabelled_folder(unlabelled_dir)
  except ValueError as e:
    raise ValueError(f"unlabelled_dir: {e}") from e

  def batches(folder):
    return lambda: tfds.as_numpy(data_lib.image_folder_eval(
        folder, image_size=image_size, batch_size=batch_size))

  rel = lambda root, paths: tuple(os.path.relpath(p, root) for p in paths)
  return (Images(rel(labelled_dir, labelled.paths), labelled.labels, labelled.class_names,
                 batches(labelled)),
          Images(rel(unlabelled_dir, unlabelled.paths), unlabelled.labels,
                 labelled.class_names, batches(unlabelled)))


def fashion_mnist_images(data_dir: str, label_percent: int, batch_size: int,
                         class_names: Sequence[str]) -> Tuple[Images, Images]:
  """The committed labelled subset of Fashion-MNIST train, and the test split (with its true
  labels, for a ``true_class`` column and an accuracy)."""
  train_images, train_labels = data_lib.load_fashion_mnist("train", data_dir)
  chosen = data_lib.load_label_split("fashion_mnist", label_percent, labels=train_labels)
  test_images, test_labels = data_lib.load_fashion_mnist("test", data_dir)
  names = tuple(class_names)
  make = lambda images, labels: lambda: data_lib.eval_batches(images, labels,
                                                              batch_size=batch_size)
  return (Images(tuple(f"fashion_mnist/train/{i:05d}" for i in chosen), train_labels[chosen],
                 names, make(train_images[chosen], train_labels[chosen])),
          Images(tuple(f"fashion_mnist/test/{i:05d}" for i in range(len(test_labels))),
                 test_labels, names, make(test_images, test_labels)))


def embed(fn: Callable[[jax.Array], jax.Array], images: Images, mesh) -> np.ndarray:
  """float32 [N, F] embeddings of ``images`` in order (``encoders.embed_to_host``)."""
  return encoders.embed_to_host(fn, images.batches(), mesh)


def collect_images(images: Images) -> np.ndarray:
  """float32 [N, S, S, 3] in [0, 1]: ``images`` as the batches hold them (for pictures)."""
  out = []
  for batch in images.batches():
    x = np.asarray(evaluation.preprocess(jnp.asarray(batch["images"])))
    out.append(x[np.asarray(batch["mask"], bool)])
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# kNN.
# ----------------------------------------------------------------------------------------------

def knn_labels(queries: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, *, k: int,
               num_classes: int, vote: str = "weighted", temperature: float = 0.07,
               chunk: int = 1024) -> Labels:
  """kNN labels of l2-normalised ``queries [U, F]`` from ``bank [M, F]`` with ``bank_labels``.

  ``k`` is capped at M. See the module docstring for the two votes.
  """
  if vote not in VOTES:
    raise ValueError(f"vote: got {vote!r}, allowed: {', '.join(VOTES)}")
  k = min(k, len(bank))
  out = []
  bank_j, labels_j = jnp.asarray(bank), jnp.asarray(bank_labels, jnp.int32)
  for start in range(0, len(queries), chunk):
    q = jnp.asarray(queries[start:start + chunk])
    top = knn.top_k_entries(q, bank_j, labels_j, k=k)
    if vote == "weighted":
      scores = knn.weighted_knn_scores(q, bank_j, labels_j, k=k, num_classes=num_classes,
                                       temperature=temperature)
      predicted = jnp.argmax(scores, -1)
      share = jnp.max(scores, -1) / jnp.maximum(jnp.sum(scores, -1), 1e-30)
    else:
      predicted = knn.knn_vote(q, bank_j, labels_j, k=k, num_classes=num_classes)
      share = jnp.mean(top.labels == predicted[:, None], axis=-1)
    out.append(jax.device_get((predicted, share, top.indices[:, 0], top.scores[:, 0])))
  predicted, share, nearest, similarity = (np.concatenate(x) for x in zip(*out))
  return Labels(predicted.astype(np.int32), share.astype(np.float32), nearest.astype(np.int32),
                similarity.astype(np.float32))


def examples_figure(images: np.ndarray, result: Labels, class_names: Sequence[str],
                    per_class: int = 8):
  """Per predicted class (rows), the ``per_class`` images with the highest vote share.

  Args:
    images: [U, H, W, 3] the unlabelled images as embedded (uint8, or float in [0, 1]).
    result: their :class:`Labels`.
    class_names: the C class names.
    per_class: images per row.

  Returns:
    A matplotlib figure.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pictures = np.asarray(images)
  if pictures.dtype != np.uint8:
    pictures = np.clip(np.round(pictures * 255.0), 0, 255).astype(np.uint8)
  num_classes = len(class_names)
  fig, axes = plt.subplots(num_classes, per_class, squeeze=False,
                           figsize=(1.2 * per_class + 1.5, 1.25 * num_classes))
  for c in range(num_classes):
    members = np.flatnonzero(result.predicted == c)
    members = members[np.argsort(-result.vote_share[members], kind="stable")][:per_class]
    axes[c, 0].set_ylabel(f"{class_names[c]}\n({np.sum(result.predicted == c)})", fontsize=8,
                          rotation=0, ha="right", va="center")
    for j in range(per_class):
      ax = axes[c, j]
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_visible(False)
      if j < len(members):
        ax.imshow(pictures[members[j]])
        ax.set_title(f"{result.vote_share[members[j]]:.2f}", fontsize=7)
  fig.suptitle("predicted class (number of images): highest vote shares", fontsize=9)
  fig.tight_layout()
  return fig


# First characters a spreadsheet reads as a formula (or that hide one): OWASP's CSV injection.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
  """A text cell safe to open in a spreadsheet: a cell starting with ``= + - @``, tab or CR
  gets a leading ``'`` (OWASP's CSV-injection advice), so a file or class named
  ``=HYPERLINK(...)`` is shown, not evaluated."""
  return "'" + value if value.startswith(_FORMULA_START) else value
