"""Break-even labeller accuracy of the semantic term (BENCHMARKS.md, "Semantic objective").

    python experiments/break_even.py --out=runs/study/screen --png=docs/study/semantic/break_even.png

Reads the study results of the noisy-oracle variants ``q<NN><suffix>`` (and ``o<suffix>`` as
q = 1) and plots their validation kNN k=20 top-1 minus ReLIC-only's (same seeds, mean) against
the labeller accuracy q, with the real kNN labeller's measured accuracies marked.
"""
import argparse
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import study  # noqa: E402  pylint: disable=g-import-not-at-top


def gains(results, suffix: str, metric: str = "knn_k20", split: str = "validation"):
  """({q: gain in points over ReLIC-only}, {label: kNN labeller accuracy of real runs})."""
  relic = {r["spec"]["seed"]: r["reported"][split][metric] for r in results
           if r["spec"]["objective"] == "relic" and not r["spec"].get("tag")}
  out, labellers = {}, {}
  for r in results:
    tag, seed = r["spec"].get("tag", ""), r["spec"]["seed"]
    m = re.fullmatch(rf"q(\d+){re.escape(suffix)}", tag)
    q = int(m.group(1)) / 100 if m else (1.0 if tag == f"o{suffix}" else None)
    if q is not None and seed in relic:
      out.setdefault(q, []).append(100 * (r["reported"][split][metric] - relic[seed]))
    if tag.startswith("k") and "pseudo_label_accuracy" in r["reported"][split]:
      labellers.setdefault(tag, []).append(r["reported"][split]["pseudo_label_accuracy"])
  return ({q: sum(v) / len(v) for q, v in sorted(out.items())},
          {k: sum(v) / len(v) for k, v in labellers.items()})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/study/screen")
  parser.add_argument("--suffix", default="B5i0", help="the variant the q sweep used")
  parser.add_argument("--png", default="docs/study/semantic/break_even.png")
  args = parser.parse_args(argv)
  points, labellers = gains(study.load_results(args.out), args.suffix)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.plot(list(points), list(points.values()), marker="o", label=f"noisy oracle ({args.suffix})")
  ax.axhline(0.0, color="gray", lw=1)
  for i, (tag, acc) in enumerate(sorted(labellers.items())):
    ax.axvline(acc, ls="--", lw=1, color=f"C{i + 1}", label=f"kNN labeller of {tag}: {acc:.0%}")
  ax.set(xlabel="labeller accuracy q (wrong labels uniform over the other classes)",
         ylabel="kNN k=20 top-1 − ReLIC-only (points, validation)",
         title="Semantic term: gain over ReLIC-only against labeller accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
  fig.savefig(args.png, dpi=110)
  for q, g in points.items():
    print(f"q={q:.2f}: {g:+.2f} points")
  print(args.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
