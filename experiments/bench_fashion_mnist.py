"""Three-way comparison on Fashion-MNIST with 10 % labels, same budget for each run:

* SemPPL (the demo config),
* SemPPL with the semantic term off (``objective=relic``),
* a supervised-only baseline on the same labelled 10 % (``objective=supervised``).

Each run goes through the launcher with the demo config and the same number of steps, batch
and augmentations, in its own checkpoint directory; the script prints a markdown table of the
end-of-training evaluation (online-probe, weighted kNN and queue-kNN top-1 on the test split,
pseudo-label accuracy) and the wall-clock time of each run.

    python experiments/bench_fashion_mnist.py --steps=1000 --out=runs/bench_fmnist

Then each run's encoder is evaluated under the three protocols of
``experiments/eval_fashion_mnist.py`` (fine-tune, linear, kNN; ``--eval_only`` re-evaluates
existing runs without pre-training again). Runs are sequential, so each one has the machine to
itself.
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


PROTOCOL_METRICS = (("fine_tune", "fine_tune_top1"), ("linear", "linear_top1"),
                    ("knn", "knn_top1_k20"), ("knn", "knn_top1_k200"))


def evaluate(objective, out_dir):
  """Top-1 of every protocol on the encoder of run ``objective`` (percent, as strings)."""
  results = {}
  for protocol in ("fine_tune", "linear", "knn"):
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "launch.py"),
           f"--config={os.path.join(ROOT, 'experiments', 'eval_fashion_mnist.py')}",
           f"--config.experiment_kwargs.config.protocol={protocol}",
           f"--config.experiment_kwargs.config.checkpoint.path="
           f"{os.path.join(out_dir, objective, 'checkpoints')}",
           f"--config.checkpoint_dir={os.path.join(out_dir, f'{objective}_eval_{protocol}')}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    with open(os.path.join(out_dir, f"{objective}_eval_{protocol}.log"), "w") as f:
      f.write(out.stdout + out.stderr)
    if out.returncode:
      raise RuntimeError(f"{objective} / {protocol} failed:\n{out.stderr[-3000:]}")
    # Lines look like "[eval knn]   kNN top-1 (k=20, τ=0.07, labelled train bank) (test, ...): 75.90%".
    for line in out.stdout.splitlines():
      match = re.match(r"\[eval \w+\]\s+(fine-tune|linear|kNN) top-1 (?:\(k=(\d+))?.*: ([\d.]+)%$",
                       line)
      if match:
        kind, k, value = match.groups()
        name = {"fine-tune": "fine_tune_top1", "linear": "linear_top1"}.get(kind, f"knn_top1_k{k}")
        results[name] = value
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_fmnist"))
  parser.add_argument("--objectives", default=",".join(OBJECTIVES))
  parser.add_argument("--eval_only", action="store_true",
                      help="skip pre-training; evaluate the runs already in --out")
  parser.add_argument("extra", nargs="*", help="further --config.… overrides for every run")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  objectives = args.objectives.split(",")
  if not args.eval_only:
    rows = []
    for objective in objectives:
      values, seconds = run(objective, args.steps, args.out, args.extra)
      rows.append((objective, values, seconds))
      print(f"{objective}: done in {seconds / 60:.1f} min", flush=True)
    header = ["objective"] + [short for _, short in METRICS] + ["wall-clock"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for objective, values, seconds in rows:
      cells = [values.get(long, "–") for long, _ in METRICS]
      cells = [c if c == "–" else f"{float(c):.2f} %" for c in cells]
      print(f"| {objective} | " + " | ".join(cells) + f" | {seconds / 60:.1f} min |", flush=True)
  header = ["encoder from"] + [metric for _, metric in PROTOCOL_METRICS]
  print("\n| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for objective in objectives:
    results = evaluate(objective, args.out)
    cells = [f"{float(results[m]):.2f} %" if m in results else "–" for _, m in PROTOCOL_METRICS]
    print(f"| {objective} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
