#!/usr/bin/env bash
# SemPPL ImageNet pre-training on a Cloud TPU VM slice (v4-32, v5e-64, ...): every worker runs
# the same launcher command; `--distributed_auto` lets jax discover the slice's hosts.
#
#   experiments/pod/tpu_pretrain.sh TPU_NAME ZONE {1pct|10pct} gs://BUCKET [extra launcher flags]
#
# e.g. experiments/pod/tpu_pretrain.sh semppl-v4 us-central2-b 1pct gs://my-bucket
#
# Expects, prepared once:
#   * the slice, e.g. a v4-32 (for a v5e-64: --accelerator-type=v5litepod-64
#     --version=v2-alpha-tpuv5-lite):
#       gcloud compute tpus tpu-vm create TPU_NAME --zone=ZONE --accelerator-type=v4-32 \
#           --version=tpu-ubuntu2204-base
#   * tfds `imagenet2012` and `imagenet2012_subset` built into gs://BUCKET/tensorflow_datasets
#     (tfds reads the bucket directly; build once with `tfds build ... --data_dir=gs://...`);
#   * a bucket in the slice's region, writable by the TPU VM's service account.
# Checkpoints and TensorBoard events go to gs://BUCKET/runs/imagenet_r50_<split>; rerunning this
# script after a preemption resumes from the newest checkpoint there.
# The global batch (4096 images x 6 views) is 256 images per chip on a v4-32 and 64 on a v5e-64;
# per-chip memory was not measured: if the first step runs out of HBM, use a larger slice.
# Expected speed: python experiments/pod/throughput.py --accelerator=v4-32 (FLOP estimate).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE {1pct|10pct} gs://BUCKET [extra launcher flags]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 SPLIT=$3 BUCKET=${4%/}
shift 4
case "${SPLIT}" in
  1pct|10pct) ;;
  *) echo "split must be 1pct or 10pct, got ${SPLIT}" >&2; exit 2;;
esac
REPO=$(cd "$(dirname "$0")/../.." && pwd)

# 1. The checkout on every worker (same code everywhere; no git access needed on the VMs).
gcloud compute tpus tpu-vm scp --recurse "${REPO}" "${TPU_NAME}:~/semppl_jax_src" \
    --zone="${ZONE}" --worker=all
# 2. Python 3.11 venv with the pinned requirements and the TPU build of jax (libtpu).
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  set -e
  sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
  rm -rf ~/semppl_jax && mv ~/semppl_jax_src ~/semppl_jax && cd ~/semppl_jax
  python3.11 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
# 3. Train: the same command on all workers, in the background so an ssh drop does not kill it.
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="
  cd ~/semppl_jax && nohup .venv/bin/python experiments/launch.py \
    --config=experiments/imagenet_r50_${SPLIT}.py --distributed_auto \
    --config.experiment_kwargs.config.data.data_dir=${BUCKET}/tensorflow_datasets \
    --config.checkpoint_dir=${BUCKET}/runs/imagenet_r50_${SPLIT} $* \
    > ~/semppl_${SPLIT}.log 2>&1 &"
echo "Started. Progress (printed by worker 0):"
echo "  gcloud compute tpus tpu-vm ssh ${TPU_NAME} --zone=${ZONE} --worker=0 \\"
echo "      --command='tail -f ~/semppl_${SPLIT}.log'"
echo "  tensorboard --logdir=${BUCKET}/runs/imagenet_r50_${SPLIT}"
