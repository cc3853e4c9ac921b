#!/usr/bin/env bash
# Lint: sets up .venv (which pins ruff), then runs ruff with the rules in pyproject.toml.
# There is deliberately no formatter (see the comment in pyproject.toml): `ruff format` would
# rewrite nearly every file and break the Google-style 4-space continuation indent.
source "$(dirname "$0")/setup_env.sh"
exec ruff check "${@:-.}"
