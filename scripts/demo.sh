#!/usr/bin/env bash
# The demo: pre-trains SemPPL on Fashion-MNIST (10 % labels) on the CPU and prints
# online-probe, kNN and pseudo-label accuracy. Extra arguments go to the launcher, e.g.
#   bash scripts/demo.sh --config.training_steps=20                 # a short run
#   bash scripts/demo.sh --config=experiments/fashion_mnist.py:smoke  # ~2 minutes, end to end
source "$(dirname "$0")/setup_env.sh"
config=(--config=experiments/fashion_mnist.py)
for arg in "$@"; do
  case "$arg" in --config=*|-config=*) config=() ;; esac  # The caller names the config.
done
exec python experiments/launch.py ${config[@]+"${config[@]}"} "$@"
