"""Expected SemPPL pre-training throughput on an accelerator slice, estimated from FLOPs.

    python experiments/pod/throughput.py --split=1pct --accelerator=v4-32 --mfu=0.35
    python experiments/pod/throughput.py --split=10pct --accelerator=v5e-64

Model (a paper-and-pencil estimate; measure the real rate from the launcher's "steps/s"):

* ResNet-50 forward at 224 px ≈ 4.1 G multiply-accumulates (MACs) per image, the usual
  "4.1 GFLOPs" figure; one MAC is 2 FLOPs, the unit of the chips' peak ratings, so 8.2 GFLOP.
* Convolution cost scales with the pixel count: a view of s px costs (s / 224)^2 of that.
* The online network sees every view (num_large large + num_small small) forward and backward:
  x3 its forward cost (backward ≈ 2x forward).
* The target network sees only the large views, forward only (no gradient).
* Projector / predictor MLPs (2048 -> 4096 -> 256 -> 4096 -> 256 per view, ~11.5 M MACs) and
  the kNN over a 16384-entry queue are < 0.2 % of the total and are left out.
* Achieved rate = chips x peak bf16 FLOP/s x MFU (model FLOP utilisation, assumed).
* Work per chip = the step's FLOPs / chips. The compiled step meets that (BENCHMARKS.md, "Data
  parallelism": per-device FLOPs 1.000 / 0.500 / 0.250 / 0.125 of one device's on 1 / 2 / 4 / 8
  devices at one global batch). Before that fix every chip did the whole global batch's work, so
  a slice ran no faster than one chip and these estimates were `chips` times too optimistic.

The views, batch size and step count are read from the launch config, so a changed config gives
a changed estimate.
"""
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import imagenet_r50  # pylint: disable=g-import-not-at-top

RESNET50_MACS_224 = 4.1e9
IMAGENET_TRAIN_IMAGES = 1_281_167
# Peak dense bf16 FLOP/s per chip (Cloud TPU documentation) and chips per slice.
ACCELERATORS = {
    "v4-32": dict(chips=16, peak=275e12),    # 4 hosts x 4 chips (32 TensorCores)
    "v4-64": dict(chips=32, peak=275e12),
    "v5e-64": dict(chips=64, peak=197e12),   # 16 hosts x 4 chips
    "a100x32": dict(chips=32, peak=312e12),  # 4 nodes x 8 A100 (dense bf16)
}

# Not --config: jaxline's launcher defines that flag, and both may share a process (tests).
_CONFIG = flags.DEFINE_enum("split", "1pct", ["1pct", "10pct"], "ImageNet label split.")
_ACCELERATOR = flags.DEFINE_enum("accelerator", "v4-32", list(ACCELERATORS), "The slice.")
_MFU = flags.DEFINE_float("mfu", 0.35, "Assumed model FLOP utilisation in (0, 1].")


def flops_per_image(num_large: int, large_size: int, num_small: int, small_size: int) -> float:
  """Training FLOPs of one image (all its views) for one SemPPL step, as modelled above."""
  forward = lambda size: 2 * RESNET50_MACS_224 * (size / 224) ** 2
  online = 3 * (num_large * forward(large_size) + num_small * forward(small_size))
  target = num_large * forward(large_size)
  return online + target


def estimate(config, chips: int, peak: float, mfu: float) -> dict:
  """Per-step FLOPs, steps/s, images/s and wall-clock of a launch config on ``chips`` chips."""
  c = config.experiment_kwargs.config
  batch = c.data.labelled_batch_size + c.data.unlabelled_batch_size
  v = c.views
  per_image = flops_per_image(v.num_large, v.large_size, v.num_small, v.small_size)
  step_flops = batch * per_image
  steps_per_s = chips * peak * mfu / step_flops
  return dict(batch=batch, per_image_gflop=per_image / 1e9, step_tflop=step_flops / 1e12,
              steps_per_s=steps_per_s, images_per_s=steps_per_s * batch,
              epoch_min=IMAGENET_TRAIN_IMAGES / batch / steps_per_s / 60,
              total_h=config.training_steps / steps_per_s / 3600,
              images_per_chip=batch / chips)


def main(argv):
  del argv
  if not 0 < _MFU.value <= 1:
    raise app.UsageError(f"--mfu must be in (0, 1], got {_MFU.value}")
  config = imagenet_r50.get_config(label_percent=int(_CONFIG.value[:-3]))
  accelerator = ACCELERATORS[_ACCELERATOR.value]
  e = estimate(config, accelerator["chips"], accelerator["peak"], _MFU.value)
  print(f"imagenet_r50_{_CONFIG.value} on {_ACCELERATOR.value} ({accelerator['chips']} chips x "
        f"{accelerator['peak'] / 1e12:.0f} TFLOP/s bf16, MFU {_MFU.value:.0%}):")
  print(f"  {e['per_image_gflop']:.1f} GFLOP per image, {e['step_tflop']:.0f} TFLOP per step of "
        f"{e['batch']} images ({e['images_per_chip']:.0f} per chip)")
  print(f"  {e['steps_per_s']:.2f} steps/s = {e['images_per_s']:,.0f} images/s; one epoch "
        f"{e['epoch_min']:.1f} min; {config.training_steps} steps {e['total_h']:.1f} h")


if __name__ == "__main__":
  app.run(main)
