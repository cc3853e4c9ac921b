"""Pseudo-label accuracy during pre-training, labeller variants side by side (issue #18).

    python experiments/labeller_curves.py --png=docs/study/semantic/labeller_curves.png \\
        --run "B, α=5, prediction query=runs/study/screen/runs/p1_semppl_kB5i0_s0" \\
        --run "B, α=5, target query=runs/study/labeller/runs/p1_semppl_kB5i0T_s0"

Each ``--run LABEL=RUN_DIR`` names a study run directory (``experiments/study.py`` writes
``curves.json`` there: one row per evaluation of the pre-training run). Plotted: the training
monitor ``train_pseudo_label_accuracy`` (the kNN labeller's accuracy on the unlabelled training
views, averaged over the last logging window; hidden labels are read by this monitor only),
and the same vote applied to the held-out images (``queue_knn_top1``) dashed.
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

TRAIN_METRIC = "train_pseudo_label_accuracy"
HELD_OUT_METRIC = "queue_knn_top1"


def parse_run(text: str) -> Tuple[str, str]:
  """``'LABEL=DIR'`` -> ``(label, dir)``; the last ``=`` splits (labels may hold '=')."""
  label, sep, path = text.rpartition("=")
  if not sep or not label or not path:
    raise ValueError(f"--run: expected LABEL=RUN_DIR, got {text!r}")
  return label, path


def read_curve(run_dir: str, metric: str) -> Tuple[List[int], List[float]]:
  """Steps and values of ``metric`` from ``run_dir/curves.json`` (rows without it skipped)."""
  path = os.path.join(run_dir, "curves.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no curves.json (is {run_dir!r} a finished study run?)")
  with open(path) as f:
    rows = json.load(f)
  points = [(int(r["step"]), float(r[metric])) for r in rows if metric in r]
  return [s for s, _ in points], [v for _, v in points]


def summary(runs: Sequence[Tuple[str, str]]) -> Dict[str, Tuple[float, float]]:
  """``{label: (final training accuracy, final held-out accuracy)}``."""
  out = {}
  for label, run_dir in runs:
    out[label] = tuple(read_curve(run_dir, m)[1][-1] for m in (TRAIN_METRIC, HELD_OUT_METRIC))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", action="append", default=[], metavar="LABEL=RUN_DIR",
                      required=True)
  parser.add_argument("--png", default="docs/study/semantic/labeller_curves.png")
  parser.add_argument("--title", default="kNN pseudo-labeller accuracy during pre-training")
  args = parser.parse_args(argv)
  runs = [parse_run(r) for r in args.run]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, (label, run_dir) in enumerate(runs):
    steps, train = read_curve(run_dir, TRAIN_METRIC)
    ax.plot(steps, train, marker="o", color=f"C{i}", label=label)
    steps, held_out = read_curve(run_dir, HELD_OUT_METRIC)
    ax.plot(steps, held_out, ls="--", color=f"C{i}", alpha=0.6)
  ax.set(xlabel="pre-training step", ylabel="pseudo-labels correct",
         title=f"{args.title}\nsolid: unlabelled training views, dashed: held-out queue-kNN")
  ax.title.set_fontsize(9)
  ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
  fig.savefig(args.png, dpi=110)
  for label, (train, held_out) in summary(runs).items():
    print(f"{label}: {train:.1%} training, {held_out:.1%} held out")
  print(args.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
