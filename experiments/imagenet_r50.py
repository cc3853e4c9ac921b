"""SemPPL on ImageNet with a ResNet-50 1x: shared by imagenet_r50_1pct.py and _10pct.py.

Every field of the experiment config is written out here (nothing is inherited from the
Fashion-MNIST demo, whose values are tuned for 28 px images on a CPU) and listed in
:data:`PROVENANCE` / :func:`provenance` with the value it runs and where that value comes from:

* ``paper``: SemPPL (Bošnjak et al., ICLR 2023) states it;
* ``ReLICv2``: the ReLICv2 recipe SemPPL builds on (multi-crop views, loss weights);
* ``BYOL``: the BYOL recipe shared by that lineage (augmentations, heads, LARS, target EMA);
* ``our choice``: set by us, with the reason. The k = 1, 3 semantic positives and α = 0.2
  of docs/design.md §2 come from a third-party re-implementation because the paper's own
  values could not be read (§8); they are listed as ``our choice`` for that reason.

``tests/test_configs.py`` checks that the config and the table agree field by field.

In short: global batch 4096 of which 1/8 labelled, 4 large views of 224 px and 2 small views of
96 px, projector/predictor 4096 -> 256, queues of 16384 entries, k = 1, 3 semantic positives,
LARS with base learning rate 0.3 (x B/256), 10 warm-up epochs, target EMA from 0.996, 300
epochs. Data: tfds ``imagenet2012`` (all train images, unlabelled) and
``imagenet2012_subset/1pct`` or ``/10pct`` (labelled), prepared beforehand in ``data.data_dir``
(manual download, see the tfds catalogue).
"""
import collections
import os
import sys
from typing import Any, Tuple

from ml_collections import config_dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import launch_config  # pylint: disable=g-import-not-at-top

_TRAIN_IMAGES = 1_281_167
BATCH_SIZE = 4096
LABELLED_BATCH_SIZE = BATCH_SIZE // 8
EPOCHS = 300
STEPS_PER_EPOCH = _TRAIN_IMAGES // BATCH_SIZE

SOURCES = ("paper", "ReLICv2", "BYOL", "our choice")

# One row per config field: (dotted path in experiment_kwargs.config, value, source, why).
Field = collections.namedtuple("Field", "path value source note")

_NOT_READ = "the paper's value could not be read (docs/design.md §8)"
_FMNIST_CHOICE = ("chosen on Fashion-MNIST validation (BENCHMARKS.md, Semantic objective), "
                  "paper value unknown")


def provenance(label_percent: int) -> Tuple[Field, ...]:
  """The table of every experiment-config field for ``label_percent`` % labels."""
  steps = EPOCHS * STEPS_PER_EPOCH
  return (
      Field("objective", "semppl", "paper", "the method"),
      Field("training_steps", steps, "BYOL",
            f"{EPOCHS} epochs of {BATCH_SIZE} images (BYOL's shorter schedule); {_NOT_READ}"),
      Field("data.dataset", "imagenet", "paper", "ImageNet-1k"),
      Field("data.data_dir", "", "our choice", "'' = tfds' default data directory"),
      Field("data.label_percent", label_percent, "paper",
            "the 1 % / 10 % subsets of Chen et al. (2020), as tfds imagenet2012_subset"),
      Field("data.num_classes", 1000, "paper", "ImageNet-1k"),
      Field("data.image_size", 224, "BYOL", "224 px large views"),
      Field("data.labelled_batch_size", LABELLED_BATCH_SIZE, "our choice",
            "a fixed labelled share of 1/8 of the batch (docs/design.md §2); " + _NOT_READ),
      Field("data.unlabelled_batch_size", BATCH_SIZE - LABELLED_BATCH_SIZE, "our choice",
            "the rest of BYOL's 4096-image batch"),
      Field("data.seed", 0, "our choice", "data order"),
      Field("data.labelled_dir", "", "our choice", "tfds, not image folders"),
      Field("data.unlabelled_dir", "", "our choice", "tfds, not image folders"),
      Field("data.test_dir", "", "our choice", "tfds, not image folders"),
      Field("data.eval_split", "test", "our choice",
            "'test' = the ImageNet validation set (no held-out train split for ImageNet)"),
      Field("data.skip_corrupt_images", False, "our choice", "fail loudly on bad files"),
      Field("views.num_large", 4, "ReLICv2", "multi-crop: 4 large views"),
      Field("views.num_small", 2, "ReLICv2", "multi-crop: 2 small views"),
      Field("views.large_size", 224, "ReLICv2", "large views of 224 px"),
      Field("views.small_size", 96, "ReLICv2", "small views of 96 px"),
      Field("views.large_scale", (0.08, 1.0), "BYOL", "random resized crop scale"),
      Field("views.small_scale", (0.05, 0.14), "ReLICv2",
            "multi-crop small-view scale (the SwAV range ReLICv2 uses)"),
      Field("views.blur_probability", (1.0, 0.1), "BYOL", "the two BYOL presets"),
      Field("views.solarize_probability", (0.0, 0.2), "BYOL", "the two BYOL presets"),
      Field("views.blur_sigma_range", (0.1, 2.0), "BYOL", "Gaussian blur sigma"),
      Field("views.color_jitter_probability", 0.8, "BYOL", "colour jitter"),
      Field("views.grayscale_probability", 0.2, "BYOL", "grayscale"),
      Field("views.antialias", False, "BYOL",
            "host crops resized bicubic without antialiasing (~2.8x cheaper per image on the "
            "host; BENCHMARKS.md, Host input pipeline)"),
      Field("network.encoder", "resnet50", "paper", "ResNet-50 headline numbers"),
      Field("network.width_multiplier", 1, "paper", "1x"),
      Field("network.small_images", False, "paper", "the standard ImageNet stem"),
      Field("network.compute_dtype", "bfloat16", "our choice", "speed on TPU / GPU"),
      Field("network.remat", "block", "our choice",
            "activations of 64-128 images x 6 views per device exceed 16-32 GiB HBM without "
            "recomputation (BENCHMARKS.md, Train step)"),
      Field("network.projector_hidden_size", 4096, "BYOL", "projector MLP"),
      Field("network.projection_size", 256, "BYOL", "projector / predictor output"),
      Field("network.predictor_hidden_size", 4096, "BYOL", "predictor MLP"),
      Field("queue.size", 16384, "our choice",
            "32x the 512 labelled items per step (docs/design.md §2: 20-40x); " + _NOT_READ),
      Field("semppl.knn_k", 1, "our choice",
            "docs/design.md §8: default from a third-party re-implementation; " + _NOT_READ),
      Field("semppl.num_semantic_positives", 3, "our choice",
            "docs/design.md §8: default from a third-party re-implementation; " + _NOT_READ),
      Field("semppl.temperature", 0.2, "ReLICv2", "contrastive temperature; " + _NOT_READ),
      Field("semppl.contrastive_weight", 0.3, "ReLICv2",
            "c, contrastive weight; " + _NOT_READ),
      Field("semppl.semantic_weight", 5.0, "our choice", "α; " + _FMNIST_CHOICE),
      Field("semppl.invariance_weight", 5.0, "ReLICv2", "λ, invariance weight; " + _NOT_READ),
      Field("semppl.num_negatives", 0, "our choice", "0 = every other image of the batch"),
      Field("semppl.mask_same_class_negatives", False, "our choice",
            "docs/design.md §2 as written (ablation switch; see BENCHMARKS.md, Study)"),
      Field("semppl.semantic_ramp_steps", 0, "our choice",
            "no ramp of α (ablation switch; see BENCHMARKS.md, Study)"),
      Field("semppl.bn_stats_from_large_views_only", False, "our choice",
            "small views update BatchNorm statistics too (ablation switch)"),
      Field("semppl.precision", "auto", "our choice",
            "loss matmuls: full float32 on CPU, the backend's default on TPU / GPU (bf16 "
            "operands with the bfloat16 network); BENCHMARKS.md, Loss and kNN at scale"),
      Field("semppl.knn_approximate", False, "our choice",
            "exact kNN top-k (True: approx_max_k fused with the scoring matmul, TPU only)"),
      Field("semppl.knn_monitor_every", 100, "our choice",
            "relic only: its monitor kNN every log window, outside the step"),
      Field("queue.dtype", "float32", "our choice", "'bfloat16' halves the queues' memory"),
      Field("semppl.semantic_negatives", "augmentation", "our choice",
            "the semantic positive against the other images' target projections; "
            + _FMNIST_CHOICE),
      Field("semppl.semantic_invariance_weight", 0.0, "our choice",
            "λ_sem = 0: no semantic KL (it duplicated the augmentation KL); " + _FMNIST_CHOICE),
      Field("semppl.knn_query", "target", "our choice",
            "the labeller votes with target projections, the queues' own space; "
            + _FMNIST_CHOICE),
      Field("semppl.min_vote_agreement", 0.0, "our choice", "every vote gives a label"),
      Field("optimizer.base_learning_rate", 0.3, "BYOL", "LARS, x batch / 256"),
      Field("optimizer.weight_decay", 1e-6, "our choice",
            "docs/design.md §2 (BYOL uses 1.5e-6)"),
      Field("optimizer.momentum", 0.9, "BYOL", "LARS momentum"),
      Field("optimizer.trust_coefficient", 1e-3, "BYOL", "LARS trust coefficient"),
      Field("optimizer.warmup_steps", 10 * STEPS_PER_EPOCH, "BYOL", "10 warm-up epochs"),
      Field("target.base_decay", 0.996, "BYOL", "target EMA, cosine to 1"),
      Field("probe.learning_rate", 1e-3, "our choice", "monitoring probe only (Adam)"),
      Field("evaluation.batch_size", 1024, "our choice", "end-of-training evaluation"),
      Field("evaluation.knn_ks", (20, 200), "our choice", "weighted kNN monitors"),
      Field("evaluation.knn_temperature", 0.07, "our choice", "weighted kNN monitors"),
      Field("evaluation.max_examples", 0, "our choice", "the whole validation set"),
      Field("evaluation.every_steps", 0, "our choice",
            "no periodic evaluation (a pass over the bank costs minutes at this scale)"),
      Field("evaluation.subset", 10000, "our choice",
            "images per periodic evaluation, if turned on"),
      Field("summaries.images_every_steps", 0, "our choice", "no image summaries"),
      Field("summaries.num_images", 8, "our choice", "images per summary, if turned on"),
      Field("summaries.plots", True, "our choice", "PNG curves at the end of the run"),
      Field("log_every_steps", 100, "our choice", "console / TensorBoard"),
      Field("evaluate_at_end", True, "our choice", "kNN / probe report at the end"),
  )


def get_experiment_config(label_percent: int, training_steps: Any) -> config_dict.ConfigDict:
  """The experiment's own config (``experiment_kwargs.config``), written out in full."""
  return config_dict.ConfigDict(dict(
      objective="semppl",
      training_steps=training_steps,
      data=dict(
          dataset="imagenet", data_dir="", label_percent=label_percent, num_classes=1000,
          image_size=224, labelled_batch_size=LABELLED_BATCH_SIZE,
          unlabelled_batch_size=BATCH_SIZE - LABELLED_BATCH_SIZE, seed=0, labelled_dir="",
          unlabelled_dir="", test_dir="", eval_split="test", skip_corrupt_images=False),
      views=dict(
          num_large=4, num_small=2, large_size=224, small_size=96, large_scale=(0.08, 1.0),
          small_scale=(0.05, 0.14), blur_probability=(1.0, 0.1),
          solarize_probability=(0.0, 0.2), blur_sigma_range=(0.1, 2.0),
          color_jitter_probability=0.8, grayscale_probability=0.2, antialias=False),
      network=dict(
          encoder="resnet50", width_multiplier=1, small_images=False, compute_dtype="bfloat16",
          remat="block", projector_hidden_size=4096, projection_size=256,
          predictor_hidden_size=4096),
      queue=dict(size=16384, dtype="float32"),
      semppl=dict(
          knn_k=1, num_semantic_positives=3, temperature=0.2, contrastive_weight=0.3,
          semantic_weight=5.0, invariance_weight=5.0, num_negatives=0,
          mask_same_class_negatives=False, semantic_ramp_steps=0,
          bn_stats_from_large_views_only=False, precision="auto", knn_approximate=False,
          knn_monitor_every=100, semantic_negatives="augmentation",
          semantic_invariance_weight=0.0, knn_query="target", min_vote_agreement=0.0),
      optimizer=dict(
          base_learning_rate=0.3, weight_decay=1e-6, momentum=0.9, trust_coefficient=1e-3,
          warmup_steps=10 * STEPS_PER_EPOCH),
      target=dict(base_decay=0.996),
      probe=dict(learning_rate=1e-3),
      evaluation=dict(batch_size=1024, knn_ks=(20, 200), knn_temperature=0.07,
                      max_examples=0, every_steps=0, subset=10000),
      summaries=dict(images_every_steps=0, num_images=8, plots=True),
      log_every_steps=100,
      evaluate_at_end=True,
  ))


def get_config(label_percent: int):
  """The jaxline launch config for SemPPL ResNet-50 1x with `label_percent` % labels."""
  steps = config_dict.FieldReference(EPOCHS * STEPS_PER_EPOCH)
  return launch_config.launch_config(
      experiment_class="pretrain", training_steps=steps,
      checkpoint_dir=f"runs/imagenet_r50_{label_percent}pct",
      experiment_config=get_experiment_config(label_percent, steps),
      log_interval=100, save_interval=2000, max_checkpoints_to_keep=3)
