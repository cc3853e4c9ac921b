"""Loads each hostile release "checkpoint" of the test corpus and reports what it cost.

Usage:
  .venv/bin/python experiments/bench_hostile_files.py [--scale=1.0]

The corpus (experiments/hostile_files.py) holds the attacks the release loader must
refuse: declared lengths far beyond the file (a 12-byte file declaring a 6 GiB bytearray),
nesting 2,000 to 1,000,000 deep, a million-field namedtuple, a 50 MB key, terminal escapes in
a global's name ... Each file is loaded with ``checkpointing.load_released_checkpoint`` in a
fresh subprocess, which prints the result, the wall time, the tracemalloc peak of the load and
the process's peak RSS (its baseline, after importing the loader, is printed first).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, resource, sys, time, tracemalloc
from semppl_jax import checkpointing
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
try:
  checkpointing.load_released_checkpoint(sys.argv[1])
  result, message = "accepted", ""
except checkpointing.CheckpointError as e:
  result, message = "refused", str(e)
except BaseException as e:
  result, message = f"ESCAPED {type(e).__name__}", str(e)[:300]
seconds = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"result": result, "seconds": seconds, "tracemalloc_peak": peak,
                  "baseline_rss_kib": baseline, "message_len": len(message),
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=float, default=1.0,
                      help="size factor of the corpus (1.0: the sizes in the names)")
  args = parser.parse_args()
  sys.path.insert(0, ROOT)
  from experiments import hostile_files  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  print(f"{'file':42s} {'size':>12s} {'result':>9s} {'wall':>8s} {'tracemalloc':>12s} "
        f"{'peak RSS':>10s} {'msg len':>8s}")
  with tempfile.TemporaryDirectory() as tmp:
    for name, data in hostile_files.corpus(args.scale).items():
      path = os.path.join(tmp, "hostile.pkl")
      with open(path, "wb") as f:
        f.write(data)
      out = subprocess.run([sys.executable, "-c", _CHILD, path], env=env, capture_output=True,
                           text=True, check=False)
      if out.returncode != 0:
        print(f"{name:42s} {len(data):>12,} CRASHED rc={out.returncode} {out.stderr[-300:]}")
        continue
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{name:42s} {len(data):>12,} {r['result']:>9s} {r['seconds']:>7.3f}s "
            f"{r['tracemalloc_peak'] / 1e6:>9.1f} MB {r['peak_rss_kib'] / 1024:>7.0f} MB "
            f"{r['message_len']:>8,}")
  print(f"(peak RSS includes the ~{r['baseline_rss_kib'] / 1024:.0f} MB of the interpreter with "
        "the loader imported, measured before each load)")


if __name__ == "__main__":
  main()
