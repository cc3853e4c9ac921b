#!/usr/bin/env bash
# The test suite: sets up .venv and the dataset, then runs pytest on 2 workers.
source "$(dirname "$0")/setup_env.sh"
exec python -m pytest -n "${PYTEST_WORKERS:-2}" -q "${@:-tests}"
