"""SemPPL on ImageNet with a ResNet-50 1x: shared by imagenet_r50_1pct.py and _10pct.py.

Paper-scale defaults (DESIGN.md §2): global batch 4096 of which 1/8 labelled, 4 large views of
224 px and 2 small views of 96 px, projector/predictor 4096 -> 256, queues of 16384 entries,
k = 1, 3 semantic positives, LARS with base learning rate 0.3 (x B/256), 10 warm-up epochs,
target EMA from 0.996, 300 epochs. Data: tfds `imagenet2012` (all train images, unlabelled) and
`imagenet2012_subset/1pct` or `/10pct` (labelled), prepared beforehand in `data.data_dir`
(manual download, see the tfds catalogue).
"""
from ml_collections import config_dict

from experiments import fashion_mnist
from experiments import launch_config

_TRAIN_IMAGES = 1_281_167


def get_config(label_percent: int):
  """The jaxline launch config for SemPPL ResNet-50 1x with `label_percent` % labels."""
  batch_size, epochs = 4096, 300
  steps_per_epoch = _TRAIN_IMAGES // batch_size
  steps = config_dict.FieldReference(epochs * steps_per_epoch)

  c = fashion_mnist.get_experiment_config(steps)
  c.data.update(dict(
      dataset="imagenet", data_dir="", label_percent=label_percent, num_classes=1000,
      image_size=224, labelled_batch_size=batch_size // 8,
      unlabelled_batch_size=batch_size - batch_size // 8))
  c.views.update(dict(num_large=4, num_small=2, large_size=224, small_size=96,
                      large_scale=(0.08, 1.0), small_scale=(0.05, 0.14),
                      blur_probability=(1.0, 0.1), solarize_probability=(0.0, 0.2),
                      blur_sigma_range=(0.1, 2.0)))  # BYOL's presets at ImageNet scale.
  c.network.update(dict(encoder="resnet50", width_multiplier=1, small_images=False,
                        compute_dtype="bfloat16", projector_hidden_size=4096,
                        projection_size=256, predictor_hidden_size=4096))
  c.queue.size = 16384
  c.optimizer.update(dict(base_learning_rate=0.3, weight_decay=1e-6,
                          warmup_steps=10 * steps_per_epoch))
  c.target.base_decay = 0.996
  c.probe.learning_rate = 1e-3
  c.evaluation.update(dict(batch_size=1024, knn_ks=(20, 200), knn_temperature=0.07,
                           max_examples=0))
  c.log_every_steps = 100
  return launch_config.launch_config(
      experiment_class="pretrain", training_steps=steps,
      checkpoint_dir=f"runs/imagenet_r50_{label_percent}pct", experiment_config=c,
      log_interval=100, save_interval=2000, max_checkpoints_to_keep=3)
