#!/usr/bin/env bash
# The demo: pre-trains SemPPL on Fashion-MNIST (10 % labels) on the CPU and prints
# online-probe, kNN and pseudo-label accuracy. Extra arguments go to the launcher.
source "$(dirname "$0")/setup_env.sh"
exec python experiments/launch.py --config=experiments/fashion_mnist.py "$@"
