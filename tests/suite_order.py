"""The order in which the test suite's workers receive the test files (tests/conftest.py).

``scripts/test.sh`` runs pytest on 2 workers with ``--dist loadfile --no-loadscope-reorder``:
whole files, handed out in collection order, each to the next worker that runs short of work. A
worker that receives a heavy file near the end keeps running long after the other one has
finished, so the heaviest files go first and the small ones last.
"""
from typing import Dict, List, Sequence

# Heaviest first, from the per-test durations of full runs on 2 cores and single-file runs
# (test_multiprocess ~600 s and test_faults ~290 s on a loaded machine, whose e2e launches are
# real runs; the in-process files compile many distinct steps). Every other file follows them.
HEAVY_FILES_FIRST = (
    "tests/test_multiprocess.py",
    "tests/test_train.py",
    "tests/test_faults.py",
    "tests/test_networks.py",
    "tests/jaxline/test_experiment.py",
    "tests/test_bench.py",
    "tests/test_data_parallel.py",
    "tests/test_study.py",
    "tests/test_knn.py",
    "tests/jaxline/test_summaries.py",
    "tests/jaxline/test_eval_experiment.py",
    "tests/test_launch_cli.py",
    "tests/test_semantic_positives.py",
    "tests/jaxline/test_host_stall.py",
    "tests/test_colabs.py",
    "tests/jaxline/test_ablations.py",
    "tests/test_losses.py",
    "tests/test_label.py",
    "tests/test_readme.py",  # One test, but tens of seconds: not the last file.
)


def heavy_files_first(nodeids: Sequence[str]) -> List[str]:
  """``nodeids`` ('tests/x.py::test_y[...]') reordered file by file: the files of
  HEAVY_FILES_FIRST in its order, then the others by decreasing number of tests (the order
  xdist would give them), ties in their original order; each file's tests keep theirs."""
  path = lambda nodeid: nodeid.split("::", 1)[0]
  counts: Dict[str, int] = {}
  for nodeid in nodeids:
    counts[path(nodeid)] = counts.get(path(nodeid), 0) + 1
  rank = {p: i for i, p in enumerate(HEAVY_FILES_FIRST)}
  return sorted(nodeids, key=lambda n: (rank.get(path(n), len(rank)), -counts[path(n)]))
