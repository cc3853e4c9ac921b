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
then gets the label of its ``--k`` nearest labelled images by cosine similarity, by a
``--vote=weighted`` (default) or ``--vote=majority`` vote (``semppl_jax.labelling``).

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
from typing import Dict, List, NamedTuple, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from semppl_jax import encoders  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import labelling  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import networks  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import parallel  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax.jaxline import summaries  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax import data as data_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from semppl_jax.labelling import Images, Labels  # noqa: E402  pylint: disable=g-import-not-at-top

VOTES = labelling.VOTES
CSV_COLUMNS = ("file", "predicted_class", "predicted_index", "vote_share",
               "nearest_labelled_file", "nearest_labelled_class", "nearest_similarity")


def write_csv(path: str, unlabelled: Images, labelled: Images, result: Labels,
              with_truth: bool = False) -> None:
  """One row per unlabelled image (columns: :data:`CSV_COLUMNS`, then ``true_class``); file and
  class names pass through ``labelling.csv_text``."""
  names = [labelling.csv_text(n) for n in unlabelled.class_names]
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS + (("true_class",) if with_truth else ()))
    for i, name in enumerate(unlabelled.names):
      p, n = int(result.predicted[i]), int(result.nearest[i])
      row = [labelling.csv_text(name), names[p], p, f"{result.vote_share[i]:.4f}",
             labelling.csv_text(labelled.names[n]), names[int(labelled.labels[n])],
             f"{result.nearest_similarity[i]:.4f}"]
      if with_truth:
        row.append(names[int(unlabelled.labels[i])])
      writer.writerow(row)


def read_csv(path: str) -> List[Dict[str, str]]:
  """The rows of a labels.csv as dicts."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


class Result(NamedTuple):
  """What :func:`run` computed and wrote."""
  csv_path: str
  png_path: str
  labelled_embeddings: np.ndarray
  unlabelled_embeddings: np.ndarray
  labelled: Images
  unlabelled: Images
  labels: Labels
  encoder: encoders.Encoder


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
  try:
    encoder = encoders.load_encoder(args.checkpoint, architecture=args.encoder,
                                    width_multiplier=args.width_multiplier, small_images=small)
  except ValueError as e:
    raise ValueError(f"--checkpoint: {e}") from e
  size = args.image_size or (28 if args.dataset else 64 if encoder.small_images else 224)
  if size < 32 and not encoder.small_images:
    raise ValueError(f"--image_size: {size} px is too small for the ImageNet stem (it "
                     "downsamples 32x); use >= 32 or an encoder with --small_images=true")
  if args.dataset:
    labelled, unlabelled = labelling.fashion_mnist_images(
        args.data_dir, args.label_percent, args.batch_size, summaries.FASHION_MNIST_CLASS_NAMES)
  else:
    labelled, unlabelled = labelling.folder_images(args.labelled_dir, args.unlabelled_dir, size,
                                                   args.batch_size)
  fn = encoders.embedder(encoder, mesh, size)
  bank, queries = labelling.embed(fn, labelled, mesh), labelling.embed(fn, unlabelled, mesh)
  result = labelling.knn_labels(queries, bank, labelled.labels, k=args.k,
                                num_classes=len(labelled.class_names), vote=args.vote,
                                temperature=args.temperature)
  os.makedirs(args.output_dir, exist_ok=True)
  csv_path = os.path.join(args.output_dir, "labels.csv")
  with_truth = bool(np.all(unlabelled.labels >= 0))
  write_csv(csv_path, unlabelled, labelled, result, with_truth=with_truth)
  png_path = os.path.join(args.output_dir, "examples_per_class.png")
  pictures = labelling.collect_images(unlabelled)
  figure = labelling.examples_figure(pictures, result, labelled.class_names,
                                     args.examples_per_class)
  summaries.write_file(png_path, summaries.figure_png(figure, dpi=90))
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
    message = str(e)  # The library names its arguments ('labelled_dir: ...'): they are flags.
    if message.split(":", 1)[0] in vars(args):
      message = "--" + message
    print(f"label.py: error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
