"""The tiny Fashion-MNIST config of the end-to-end tests: ``experiments/fashion_mnist.py``'s
``get_config('tiny')`` (tiny ResNet, 16/8 px views, 4 steps, evaluation on the first 512 test
images), writing to ``$SEMPPL_TEST_RUN_DIR``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import fashion_mnist  # pylint: disable=g-import-not-at-top


def get_config():
  config = fashion_mnist.get_config("tiny")
  config.checkpoint_dir = os.environ.get("SEMPPL_TEST_RUN_DIR", "/tmp/semppl_tiny")
  return config
