#!/usr/bin/env bash
# The test suite: sets up .venv and the dataset, then runs pytest on 2 workers.
#
#   bash scripts/test.sh                        # everything (CI and the README run this)
#   bash scripts/test.sh --fast                 # all but the `e2e` and `slow` tests (about 3 min)
#   bash scripts/test.sh tests/test_train.py    # one file (other arguments go to pytest)
#
# The markers are declared in pyproject.toml ([tool.pytest.ini_options]). --dist loadfile keeps
# each test module on one worker, so a module-scoped fixture (the real launches of
# test_multiprocess, test_faults, test_eval_experiment, ...) runs once, not once per worker that
# happens to receive one of its tests. --no-loadscope-reorder keeps the order tests/conftest.py
# gives the files (the heaviest first, so that both workers finish together) instead of xdist's
# (most tests first, which left the few-test but slow e2e files for the end).
source "$(dirname "$0")/setup_env.sh"
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    args+=(-m "not e2e and not slow")
  else
    args+=("$arg")
  fi
done
# Test paths default to pyproject.toml's testpaths (tests/).
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder \
    --durations=30 -q "${args[@]}"
