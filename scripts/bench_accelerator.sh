#!/usr/bin/env bash
# Numbers for the day an accelerator is available: the train-step benchmark
# (experiments/bench_step.py: demo and ResNet-50 shapes for semppl / relic / supervised, plus the
# paper's per-device batch on a GPU / TPU) and a short ImageNet-shape training run of the real
# experiment (tfds mock data unless IMAGENET_DIR names a tfds data_dir with ImageNet).
#
#   bash scripts/bench_accelerator.sh                # whatever jax finds (GPU, TPU or CPU)
#   bash scripts/bench_accelerator.sh --tiny         # tiny shapes: seconds on a CPU (tested)
#   OUT=runs/h100 bash scripts/bench_accelerator.sh --steps 10   # extra flags: bench_step.py
#
# Writes $OUT/bench_step.md (the table BENCHMARKS.md quotes) and $OUT/bench_step.json.
source "$(dirname "$0")/setup_env.sh"
tiny=()
train_steps="${TRAIN_STEPS:-20}"
extra=()
for arg in "$@"; do
  if [ "$arg" = "--tiny" ]; then
    tiny=(--tiny --steps 1 --warmup 1)
    train_steps="${TRAIN_STEPS:-3}"
  else
    extra+=("$arg")
  fi
done
backend=$(python -c "import jax; print(jax.default_backend())" 2>/dev/null)
OUT="${OUT:-runs/bench_accelerator/${backend}-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
echo "[bench_accelerator] backend=$backend -> $OUT"
python experiments/bench_step.py "${tiny[@]}" --train-steps "$train_steps" \
    --imagenet-dir "${IMAGENET_DIR:-}" --run-dir "$OUT/run" \
    --out "$OUT/bench_step.md" --json "$OUT/bench_step.json" "${extra[@]}"
