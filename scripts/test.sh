#!/usr/bin/env bash
# The test suite: sets up .venv and the dataset, then runs pytest on 2 workers.
# --dist loadfile keeps each test module on one worker, so a module-scoped fixture (the real
# launches of test_multiprocess, test_faults, test_eval_experiment, ...) runs once, not once per
# worker that happens to receive one of its tests.
source "$(dirname "$0")/setup_env.sh"
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=30 -q "${@:-tests}"
