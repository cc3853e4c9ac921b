"""Labels a folder of unlabelled images by kNN over the embeddings of a few labelled ones.

    # Your images, with an encoder from a pre-training run (its run directory):
    python experiments/label.py --checkpoint=runs/fashion_mnist \
        --labelled_dir=my_data/labelled --unlabelled_dir=my_data/unlabelled --image_size=28
    # ... or with a released checkpoint (ImageNet, 224 px):
    python experiments/label.py --checkpoint=res50x1_10pct.pkl \
        --labelled_dir=my_data/labelled --unlabelled_dir=my_data/unlabelled
    # The embedded data: the run's labelled Fashion-MNIST subset labels the test split.
    python experiments/label.py --checkpoint=runs/fashion_mnist --dataset=fashion_mnist

Every image is embedded by the encoder in inference mode (the whole image, centre-cropped to a
square and resized to ``--image_size``; pooled embedding, l2-normalised). Each unlabelled image
then gets the label of its ``--k`` nearest labelled images by cosine similarity:

* ``--vote=weighted`` (default): the class with the largest sum of ``exp(cos / temperature)``
  over the neighbours (the weighted kNN of the evaluations); ``vote_share`` is that class's part
  of the sum;
* ``--vote=majority``: the most frequent class among the neighbours, ties to the class whose
  neighbours are more similar (the SemPPL pseudo-labeller, ``knn.knn_vote``); ``vote_share``
  is its share of the neighbours.

Writes ``<output_dir>/labels.csv`` (one row per unlabelled file: ``file, predicted_class,
predicted_index, vote_share, nearest_labelled_file, nearest_labelled_class,
nearest_similarity``, plus ``true_class`` for Fashion-MNIST) and
``<output_dir>/examples_per_class.png`` (per predicted class, the images with the highest vote
share). The encoder's architecture is read from the checkpoint (override with ``--encoder``,
``--width_multiplier``, ``--small_images``).
"""
import argparse
import csv
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import haiku as hk  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top

from semppl_jax import checkpointing  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import encoder_sources  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import evaluation  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import knn  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import networks  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import parallel  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax.jaxline import summaries  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax.data import image_folder  # noqa: E402  pylint: disable=g-import-not-at-top

VOTES = ("weighted", "majority")
CSV_COLUMNS = ("file", "predicted_class", "predicted_index", "vote_share",
               "nearest_labelled_file", "nearest_labelled_class", "nearest_similarity")


class Encoder(NamedTuple):
  """An encoder's weights and the network they belong to."""
  params: Dict
  state: Dict
  architecture: str
  width_multiplier: int
  small_images: bool
  source: str  # What was loaded, for messages.


class Images(NamedTuple):
  """A set of images to embed: names, int32 labels [N] (-1 unknown), class names, batches."""
  names: Tuple[str, ...]
  labels: np.ndarray
  class_names: Tuple[str, ...]
  batches: object  # A callable () -> iterable of {'images', 'labels', 'mask'} batches.


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
# The encoder.
# ----------------------------------------------------------------------------------------------

_SCOPES: Dict[str, str] = {}


def _scope_of(name: str) -> str:
  """The top-level scope of ``networks.make_encoder(name)`` (cached)."""
  if name not in _SCOPES:
    params_shape = jax.eval_shape(
        hk.transform_with_state(lambda x: networks.make_encoder(name, small_images=True)(
            x, is_training=True)).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))[0]
    _SCOPES[name] = next(iter(params_shape)).split("/", 1)[0]
  return _SCOPES[name]


def load_encoder(path: str, *, architecture: Optional[str] = None,
                 width_multiplier: Optional[int] = None,
                 small_images: Optional[bool] = None) -> Encoder:
  """The encoder of a pre-training run (its directory, or ``.../checkpoints``) or of a release
  ``.pkl``, checked name by name and shape by shape against our network.

  Unset ``architecture`` / ``width_multiplier`` / ``small_images`` are inferred: the first
  combination (widths 1, 2, 4; ImageNet stem first) whose parameter tree matches.

  Raises:
    ValueError (``checkpointing.CheckpointError``): no checkpoint there, or no combination fits
      (listing the differences to the closest one).
  """
  if not os.path.exists(path) and "://" not in path:
    raise ValueError(f"--checkpoint: {path!r} does not exist (a pre-training run directory or a "
                     "release .pkl file)")
  if os.path.isfile(path):
    ckpt = checkpointing.load_released_checkpoint_full(path)
    params, state, source = ckpt.params, ckpt.state, f"release checkpoint {path}"
  else:
    run = os.path.join(path, "checkpoints")
    params, state, step = encoder_sources.load_pretrain_encoder(
        run if os.path.isdir(run) else path)
    source = f"pre-training checkpoint {path} (step {step})"
  scope = next(iter(params)).split("/", 1)[0]
  names = [architecture] if architecture else [
      n for n in networks.ENCODER_NAMES if _scope_of(n) == scope]
  if not names:
    raise checkpointing.CheckpointError(
        f"--checkpoint: cannot tell the architecture of encoder scope {scope!r}; pass "
        f"--encoder (one of {', '.join(networks.ENCODER_NAMES)})")
  widths = [width_multiplier] if width_multiplier else [1, 2, 4]
  stems = [small_images] if small_images is not None else [False, True]
  best = None
  for name in names:
    for width in widths:
      for small in stems:
        expected = checkpointing.expected_tree(name, width, small_images=small)
        diffs = checkpointing.verify_checkpoint_tree(params, state, *expected)
        if not diffs:
          return Encoder(params, state, name, width, small, source)
        if best is None or len(diffs) < len(best[1]):
          best = ((name, width, small), diffs)
  (name, width, small), diffs = best
  raise checkpointing.CheckpointError(
      f"--checkpoint: the encoder of {source} does not match {name} x{width} "
      f"(small_images={small}) nor any other candidate; {len(diffs)} difference(s), e.g.\n  "
      + "\n  ".join(diffs[:10]))


def make_embedder(architecture: str, width_multiplier: int, small_images: bool,
                  image_size: int, mesh):
  """Jitted ``(params, state, images [b, H, W, C]) -> l2-normalised embeddings [b, F]``
  (inference mode; the whole image resized to ``image_size``), sharded along the batch. Takes
  the weights as arguments, so new weights (e.g. during training) reuse the compilation."""
  model = hk.transform_with_state(lambda x: networks.make_encoder(
      architecture, width_multiplier=width_multiplier, small_images=small_images)(
          x, is_training=False))

  def embed(params, state, images):
    embeddings, _ = model.apply(params, state, None, evaluation.eval_view(images, image_size))
    return losses.l2_normalize(embeddings.astype(jnp.float32))

  replicated = parallel.replicated_sharding(mesh)
  data = parallel.data_sharding(mesh)
  return jax.jit(embed, in_shardings=(replicated, replicated, data), out_shardings=data)


def embed_fn(encoder: Encoder, image_size: int, mesh):
  """``images -> embeddings`` of one :class:`Encoder` (see :func:`make_embedder`)."""
  fn = make_embedder(encoder.architecture, encoder.width_multiplier, encoder.small_images,
                     image_size, mesh)
  params, state = jax.device_put((encoder.params, encoder.state),
                                 parallel.replicated_sharding(mesh))
  return lambda images: fn(params, state, images)


def embed(fn, images: Images, mesh) -> np.ndarray:
  """float32 [N, F] embeddings of ``images`` in order (padding removed)."""
  (out,), _, mask = evaluation.embed_batches(fn, images.batches(), mesh)
  out, mask = parallel.global_to_host_local((out, mask))
  return np.asarray(out[np.asarray(mask, bool)], np.float32)


# ----------------------------------------------------------------------------------------------
# The images.
# ----------------------------------------------------------------------------------------------

def _check_labelled_layout(directory: str) -> None:
  """Refuses loose images next to the class folders (they would be silently left out)."""
  if not os.path.isdir(directory):
    raise ValueError(f"--labelled_dir: {directory!r} is not a folder")
  loose = sorted(f for f in os.listdir(directory)
                 if os.path.isfile(os.path.join(directory, f))
                 and os.path.splitext(f)[1].lower() in image_folder.IMAGE_EXTENSIONS)
  if loose:
    raise ValueError(f"--labelled_dir: {directory!r} holds {len(loose)} image(s) outside class "
                     f"sub-folders (e.g. {loose[0]!r}); put every labelled image in "
                     "<labelled_dir>/<class name>/")


def folder_images(labelled_dir: str, unlabelled_dir: str, image_size: int,
                  batch_size: int) -> Tuple[Images, Images]:
  """The labelled and unlabelled image folders, checked (every file decodable)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _check_labelled_layout(labelled_dir)
  try:
    labelled = data_lib.scan_labelled_folder(labelled_dir)
  except ValueError as e:
    raise ValueError(f"--labelled_dir: {e}") from e
  if len(labelled.class_names) < 2:
    raise ValueError(f"--labelled_dir: {labelled_dir!r} has {len(labelled.class_names)} class "
                     f"folder(s) {list(labelled.class_names)}; labelling needs at least two "
                     "classes, one sub-folder each")
  try:
    unlabelled = data_lib.scan_unlabelled_folder(unlabelled_dir)
  except ValueError as e:
    raise ValueError(f"--unlabelled_dir: {e}") from e

  def batches(folder):
    return lambda: tfds.as_numpy(data_lib.image_folder_eval(
        folder, image_size=image_size, batch_size=batch_size))

  rel = lambda root, paths: tuple(os.path.relpath(p, root) for p in paths)
  return (Images(rel(labelled_dir, labelled.paths), labelled.labels, labelled.class_names,
                 batches(labelled)),
          Images(rel(unlabelled_dir, unlabelled.paths), unlabelled.labels,
                 labelled.class_names, batches(unlabelled)))


def fashion_mnist_images(data_dir: str, label_percent: int,
                         batch_size: int) -> Tuple[Images, Images]:
  """The committed labelled subset of Fashion-MNIST train, and the test split (with its true
  labels, used only for the ``true_class`` column and the printed accuracy)."""
  train_images, train_labels = data_lib.load_fashion_mnist("train", data_dir)
  chosen = data_lib.load_label_split("fashion_mnist", label_percent, labels=train_labels)
  test_images, test_labels = data_lib.load_fashion_mnist("test", data_dir)
  names = summaries.FASHION_MNIST_CLASS_NAMES
  make = lambda images, labels: lambda: data_lib.eval_batches(images, labels,
                                                              batch_size=batch_size)
  return (Images(tuple(f"fashion_mnist/train/{i:05d}" for i in chosen), train_labels[chosen],
                 names, make(train_images[chosen], train_labels[chosen])),
          Images(tuple(f"fashion_mnist/test/{i:05d}" for i in range(len(test_labels))),
                 test_labels, names, make(test_images, test_labels)))


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
    raise ValueError(f"--vote: got {vote!r}, allowed: {', '.join(VOTES)}")
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


# ----------------------------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------------------------

# First characters a spreadsheet reads as a formula (or that hide one): OWASP's CSV injection.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str) -> str:
  """A text cell safe to open in a spreadsheet: a cell starting with ``= + - @``, tab or CR
  gets a leading ``'`` (OWASP's CSV-injection advice), so a file or class named
  ``=HYPERLINK(...)`` is shown, not evaluated."""
  return "'" + value if value.startswith(_FORMULA_START) else value


def write_csv(path: str, unlabelled: Images, labelled: Images, result: Labels,
              with_truth: bool = False) -> None:
  """One row per unlabelled image (columns: :data:`CSV_COLUMNS`, then ``true_class``); file and
  class names pass through :func:`csv_text`."""
  names = [csv_text(n) for n in unlabelled.class_names]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS + (("true_class",) if with_truth else ()))
    for i, name in enumerate(unlabelled.names):
      p, n = int(result.predicted[i]), int(result.nearest[i])
      row = [csv_text(name), names[p], p, f"{result.vote_share[i]:.4f}",
             csv_text(labelled.names[n]),
             names[int(labelled.labels[n])], f"{result.nearest_similarity[i]:.4f}"]
      if with_truth:
        row.append(names[int(unlabelled.labels[i])])
      writer.writerow(row)


def read_csv(path: str) -> List[Dict[str, str]]:
  """The rows of a labels.csv as dicts."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def examples_figure(images: np.ndarray, result: Labels, class_names: Sequence[str],
                    per_class: int = 8):
  """Per predicted class (rows), the ``per_class`` images with the highest vote share.

  Args:
    images: [U, H, W, C] the unlabelled images as embedded (uint8 or float in [0, 1]).
    result: their :class:`Labels`.
    class_names: the C class names.
    per_class: images per row.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pictures = summaries.to_uint8(images)
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


def collect_images(images: Images, image_size: int) -> np.ndarray:
  """uint8 / float [N, S, S, 3] of ``images`` as the encoder saw them (for the figure)."""
  out = []
  for batch in images.batches():
    x = np.asarray(evaluation.preprocess(jnp.asarray(batch["images"])))
    out.append(x[np.asarray(batch["mask"], bool)])
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------

class Result(NamedTuple):
  """What :func:`run` computed and wrote."""
  csv_path: str
  png_path: str
  labelled_embeddings: np.ndarray
  unlabelled_embeddings: np.ndarray
  labelled: Images
  unlabelled: Images
  labels: Labels
  encoder: Encoder


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="label.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True,
                      help="pre-training run directory (its checkpoints/) or a release .pkl")
  parser.add_argument("--labelled_dir", help="folder of class sub-folders of labelled images")
  parser.add_argument("--unlabelled_dir", help="folder of images to label (any nesting)")
  parser.add_argument("--dataset", choices=("fashion_mnist",),
                      help="instead of the folders: label the Fashion-MNIST test split")
  parser.add_argument("--data_dir", default=data_lib.fashion_mnist.DEFAULT_DATA_DIR,
                      help="Fashion-MNIST IDX folder (tfds is used when absent)")
  parser.add_argument("--label_percent", type=int, default=10, choices=(1, 10),
                      help="Fashion-MNIST: which committed labelled subset")
  parser.add_argument("--output_dir", default="labels", help="where labels.csv and the PNG go")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing labels.csv / PNG in --output_dir")
  parser.add_argument("--image_size", type=int, default=0,
                      help="side the images are resized to (0: 28 for Fashion-MNIST, 64 for "
                      "small-image encoders, else 224)")
  parser.add_argument("--k", type=int, default=20, help="neighbours per vote")
  parser.add_argument("--vote", choices=VOTES, default="weighted")
  parser.add_argument("--temperature", type=float, default=0.07, help="weighted vote's τ")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--examples_per_class", type=int, default=8)
  parser.add_argument("--encoder", choices=networks.ENCODER_NAMES, default=None,
                      help="architecture (default: inferred from the checkpoint)")
  parser.add_argument("--width_multiplier", type=int, default=None)
  parser.add_argument("--small_images", choices=("true", "false"), default=None,
                      help="the 3x3 small-image stem (default: inferred)")
  return parser.parse_args(list(argv))


def run(args: argparse.Namespace) -> Result:
  """Embeds, labels, writes the CSV and the PNG; prints a summary. Raises ValueError with the
  flag's name on bad input."""
  folders = args.labelled_dir is not None or args.unlabelled_dir is not None
  if folders == (args.dataset is not None):
    raise ValueError("pass either --labelled_dir and --unlabelled_dir, or --dataset")
  if folders and not (args.labelled_dir and args.unlabelled_dir):
    raise ValueError("--labelled_dir and --unlabelled_dir go together; pass both")
  for name in ("k", "batch_size", "examples_per_class"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
  if not args.temperature > 0:
    raise ValueError(f"--temperature: must be > 0, got {args.temperature}")
  for name in ("labels.csv", "examples_per_class.png"):
    existing = os.path.join(args.output_dir, name)
    if os.path.exists(existing) and not getattr(args, "overwrite", False):
      raise ValueError(f"--output_dir: {existing} exists; pass --overwrite to replace it")
  mesh = parallel.make_mesh()
  if args.batch_size % mesh.shape["data"]:
    raise ValueError(f"--batch_size: {args.batch_size} is not a multiple of the "
                     f"{mesh.shape['data']} devices")
  small = None if args.small_images is None else args.small_images == "true"
  encoder = load_encoder(args.checkpoint, architecture=args.encoder,
                         width_multiplier=args.width_multiplier, small_images=small)
  size = args.image_size or (28 if args.dataset else 64 if encoder.small_images else 224)
  if size < 32 and not encoder.small_images:
    raise ValueError(f"--image_size: {size} px is too small for the ImageNet stem (it "
                     "downsamples 32x); use >= 32 or an encoder with --small_images=true")
  if args.dataset:
    labelled, unlabelled = fashion_mnist_images(args.data_dir, args.label_percent,
                                                args.batch_size)
  else:
    labelled, unlabelled = folder_images(args.labelled_dir, args.unlabelled_dir, size,
                                         args.batch_size)
  fn = embed_fn(encoder, size, mesh)
  bank, queries = embed(fn, labelled, mesh), embed(fn, unlabelled, mesh)
  result = knn_labels(queries, bank, labelled.labels, k=args.k,
                      num_classes=len(labelled.class_names), vote=args.vote,
                      temperature=args.temperature)
  os.makedirs(args.output_dir, exist_ok=True)
  csv_path = os.path.join(args.output_dir, "labels.csv")
  with_truth = bool(np.all(unlabelled.labels >= 0))
  write_csv(csv_path, unlabelled, labelled, result, with_truth=with_truth)
  png_path = os.path.join(args.output_dir, "examples_per_class.png")
  pictures = collect_images(unlabelled, size)
  summaries.write_file(png_path, summaries.figure_png(
      examples_figure(pictures, result, labelled.class_names, args.examples_per_class), dpi=90))
  counts = np.bincount(result.predicted, minlength=len(labelled.class_names))
  print(f"{encoder.source}: {encoder.architecture} x{encoder.width_multiplier} "
        f"(small_images={encoder.small_images}), {size} px")
  print(f"{len(bank)} labelled images in {len(labelled.class_names)} classes -> "
        f"{len(queries)} unlabelled images labelled by {args.vote} {min(args.k, len(bank))}-NN")
  print("predicted per class: " + ", ".join(
      f"{n} {c}" for c, n in zip(labelled.class_names, counts)))
  if with_truth:
    print(f"accuracy against the known labels: "
          f"{100 * np.mean(result.predicted == unlabelled.labels):.2f}%")
  print(f"wrote {csv_path} and {png_path}")
  return Result(csv_path, png_path, bank, queries, labelled, unlabelled, result, encoder)


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  try:
    run(args)
  except ValueError as e:  # CheckpointError is a ValueError.
    print(f"label.py: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
