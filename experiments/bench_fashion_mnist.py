"""Three-way comparison on Fashion-MNIST with 10 % labels, same budget for each run:

* SemPPL (the demo config),
* SemPPL with the semantic term off (``objective=relic``),
* a supervised-only baseline on the same labelled 10 % (``objective=supervised``).

Each run goes through the launcher with the demo config and the same number of steps, batch
and augmentations, in its own checkpoint directory; the script prints a markdown table of the
end-of-training evaluation (online-probe, weighted kNN and queue-kNN top-1 on the test split,
pseudo-label accuracy) and the wall-clock time of each run.

    python experiments/bench_fashion_mnist.py --steps=1000 --out=runs/bench_fmnist

Runs are sequential, so each one has the machine to itself.
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTIVES = ("semppl", "relic", "supervised")
METRICS = (
    ("online-probe top-1 (test)", "probe top-1"),
    ("weighted kNN top-1 (test, k=20, labelled train bank)", "kNN k=20"),
    ("weighted kNN top-1 (test, k=200, labelled train bank)", "kNN k=200"),
    ("queue-kNN top-1 (test; the pseudo-labeller)", "queue-kNN top-1"),
    ("pseudo-label accuracy (unlabelled train, last steps)", "pseudo-label acc."),
)


def run(objective, steps, out_dir, extra):
  run_dir = os.path.join(out_dir, objective)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "launch.py"),
         f"--config={os.path.join(ROOT, 'experiments', 'fashion_mnist.py')}",
         f"--config.training_steps={steps}", f"--config.checkpoint_dir={run_dir}",
         f"--config.experiment_kwargs.config.objective={objective}", *extra]
  start = time.time()
  out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  seconds = time.time() - start
  with open(os.path.join(out_dir, f"{objective}.log"), "w") as f:
    f.write(out.stdout + out.stderr)
  if out.returncode:
    raise RuntimeError(f"{objective} failed:\n{out.stderr[-3000:]}")
  values = dict(re.findall(r"\[eval\]\s+(.+?): ([\d.]+)%", out.stdout))
  return values, seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_fmnist"))
  parser.add_argument("--objectives", default=",".join(OBJECTIVES))
  parser.add_argument("extra", nargs="*", help="further --config.… overrides for every run")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for objective in args.objectives.split(","):
    values, seconds = run(objective, args.steps, args.out, args.extra)
    rows.append((objective, values, seconds))
    print(f"{objective}: done in {seconds / 60:.1f} min", flush=True)
  header = ["objective"] + [short for _, short in METRICS] + ["wall-clock"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for objective, values, seconds in rows:
    cells = [values.get(long, "–") for long, _ in METRICS]
    cells = [c if c == "–" else f"{float(c):.2f} %" for c in cells]
    print(f"| {objective} | " + " | ".join(cells) + f" | {seconds / 60:.1f} min |")


if __name__ == "__main__":
  main()
