"""Evaluation of the Fashion-MNIST demo's encoder: fine-tune, linear or kNN (10 % labels).

Reads the encoder of the pre-training demo (`runs/fashion_mnist/checkpoints`, written by
`python experiments/launch.py --config=experiments/fashion_mnist.py`), then:

    python experiments/launch.py --config=experiments/eval_fashion_mnist.py       # fine_tune
    python experiments/launch.py --config=experiments/eval_fashion_mnist.py \
        --config.experiment_kwargs.config.protocol=linear
    python experiments/launch.py --config=experiments/eval_fashion_mnist.py \
        --config.experiment_kwargs.config.protocol=knn       # no training steps

Each protocol writes to its own `runs/fashion_mnist_eval_<protocol>` (a restarted run resumes;
a finished one only re-evaluates). Other variants:

    --config.experiment_kwargs.config.data.label_percent=1        # must match the pre-training
    --config.experiment_kwargs.config.checkpoint.source=none      # random-init baseline
    --config.experiment_kwargs.config.checkpoint.path=runs/fmnist_long/checkpoints

Comparing encoders fairly (issue #10): one fixed fine-tune schedule favours some encoders and
damages others (the old 0.05 / 2.0 schedule fine-tuned a supervised encoder to below random
initialisation). Compare encoders only through `experiments/study.py`, which runs the same small
grid of (encoder, head) base learning rates for every encoder, picks the point with the best
top-1 on the validation split (`data.eval_split=validation`: 5,000 held-out training images)
and reports that point's test top-1. For one encoder by hand, run each grid point with
`--config.experiment_kwargs.config.data.eval_split=validation` and
`--config.experiment_kwargs.config.optimizer.{encoder,head}_base_learning_rate=...`, then the
chosen point once on the test split. The defaults below are one point of that grid.

Runtime on 2 shared CPU cores (one CPU device, jax 0.10.2, x86-64), wall clock including
start-up and the evaluation on all 10k test images: fine_tune ≈ 40-50 s, linear ≈ 20 s,
knn ≈ 15 s (fine_tune and linear: 300 steps of 128 labelled images).

Measured top-1 on the test split (10 % labels, these defaults, random_seed 0):

    encoder                                   fine_tune  linear  knn k=20  knn k=200
    random init (checkpoint.source=none)        74.6 %   48.4 %   65.2 %    55.2 %
    demo pre-training stopped at 200 steps      75.9 %   55.4 %   67.2 %    57.9 %

(The 200-step encoder's kNN numbers equal the pre-training run's own end-of-training kNN
evaluation.) The full 1000-step demo encoder was not measured here (its numbers belong in
BENCHMARKS.md). The linear head on the frozen tiny encoder's raw features is poorly
conditioned, so linear sits below kNN here.
"""
import os
import sys

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import launch_config  # pylint: disable=g-import-not-at-top


def get_experiment_config(training_steps, protocol):
  """The experiment's own config (``experiment_kwargs.config``)."""
  return config_dict.ConfigDict(dict(
      protocol=protocol,                 # 'fine_tune' | 'linear' | 'knn'
      training_steps=training_steps,     # ignored by 'knn' (which may set 0)
      checkpoint=dict(
          source="pretrain",             # 'pretrain' | 'release' | 'none'
          path="runs/fashion_mnist/checkpoints",
          encoder_prefix="",             # release only: '' = detect the encoder scope
      ),
      data=dict(
          dataset="fashion_mnist",
          data_dir="/usr/share/datasets/fashion-mnist",
          label_percent=10,
          num_classes=10,
          image_size=28,
          batch_size=128,                # labelled images per step (global)
          seed=0,
          labelled_dir="",               # image_folder only
          test_dir="",                   # image_folder only
          eval_split="test",             # 'validation': held-out train images (fashion_mnist)
          skip_corrupt_images=False,     # image_folder: drop (and log) unreadable files
      ),
      network=dict(
          encoder="tiny_resnet",
          width_multiplier=1,
          small_images=True,
          compute_dtype="float32",
      ),
      augmentation=dict(
          crop_size=28,                  # training crops; evaluation resizes to this too
          crop_scale=(0.5, 1.0),
          flip=True,
      ),
      optimizer=dict(
          # Learning rates for a batch of 256 (scaled by batch_size / 256), cosine to 0.
          encoder_base_learning_rate=0.05,   # fine_tune only
          head_base_learning_rate=2.0,
          momentum=0.9,
          nesterov=True,
          weight_decay=1e-5,
          warmup_steps=0,
      ),
      evaluation=dict(
          batch_size=1000,
          max_examples=0,                # 0 = the whole test split
          knn_ks=(20, 200),
          knn_temperature=0.07,
      ),
      log_every_steps=25,
  ))


def get_config():
  """The jaxline launch config."""
  steps = config_dict.FieldReference(300)
  protocol = config_dict.FieldReference("fine_tune")
  # One directory per protocol: jaxline resumes from whatever it finds there, and a checkpoint of
  # another protocol (or of the pre-training) has a different train state.
  return launch_config.launch_config(
      experiment_class="eval", training_steps=steps,
      checkpoint_dir="runs/fashion_mnist_eval_" + protocol,
      experiment_config=get_experiment_config(steps, protocol), log_interval=25,
      save_interval=100)
