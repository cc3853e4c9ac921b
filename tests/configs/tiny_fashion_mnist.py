"""A tiny Fashion-MNIST SemPPL config for end-to-end tests: tiny ResNet, 16/8 px views, a few
steps, evaluation on the first 500 test images. Batches are multiples of 8 (fake devices)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import fashion_mnist  # pylint: disable=g-import-not-at-top


def get_config():
  config = fashion_mnist.get_config()
  c = config.experiment_kwargs.config
  config.training_steps = 4
  config.save_checkpoint_interval = 1
  config.log_train_data_interval = 1
  config.log_tensors_interval = 1
  config.checkpoint_dir = os.environ.get("SEMPPL_TEST_RUN_DIR", "/tmp/semppl_tiny")
  c.data.label_percent = 1
  c.data.labelled_batch_size = 8
  c.data.unlabelled_batch_size = 8
  c.views.num_large = 2
  c.views.num_small = 1
  c.views.large_size = 16
  c.views.small_size = 8
  c.network.projector_hidden_size = 32
  c.network.projection_size = 16
  c.network.predictor_hidden_size = 32
  c.queue.size = 64
  c.optimizer.warmup_steps = 1
  c.evaluation.batch_size = 256
  c.evaluation.knn_ks = (5,)
  c.evaluation.max_examples = 512
  # Periodic evaluation, image summaries and end-of-run plots off (tests/test_summaries.py
  # turns them on).
  c.evaluation.every_steps = 0
  c.evaluation.subset = 256
  c.summaries.images_every_steps = 0
  c.summaries.num_images = 4
  c.summaries.plots = False
  c.log_every_steps = 1
  return config
