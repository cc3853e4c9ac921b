#!/usr/bin/env bash
# Lint: sets up .venv (which pins ruff), then runs ruff with the rules in pyproject.toml.
# `ruff format` is the formatter (same file); CI checks lint only.
source "$(dirname "$0")/setup_env.sh"
exec ruff check "${@:-.}"
