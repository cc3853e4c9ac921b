"""Tests for experiment_config.check_memory_fits: sizes that cannot fit are refused."""
import pytest

from semppl_jax.jaxline import experiment_config
from tests.configs import tiny_fashion_mnist


def _config(field=None, value=None):
  config = tiny_fashion_mnist.get_config().experiment_kwargs.config
  if field:
    node = config
    *parents, last = field.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.parametrize("field,value,part", [
    ("queue.size", 10**12, "queue"),
    ("network.projection_size", 10**9, "parameters"),
    ("semppl.num_semantic_positives", 10**8, "logits"),
])
def test_sizes_that_cannot_fit_are_refused_with_the_estimate(field, value, part):
  config = _config(field, value)
  with pytest.raises(ValueError, match=rf"config.{field}: this config needs at least [0-9.,e+]+ "
                                       rf"GiB per device \(.*{part} [0-9.,e+]+ GiB \({field}\)"
                                       r".* more than the"):
    experiment_config.validate_pretrain_config(config, num_devices=8)


def test_the_shipped_tiny_config_fits_and_the_bound_is_the_device_memory():
  config = _config()
  experiment_config.validate_pretrain_config(config, num_devices=8)
  needed = sum(experiment_config.memory_estimate(config, 8).values())
  experiment_config.check_memory_fits(config, num_devices=8, device_memory_bytes=needed)
  with pytest.raises(ValueError, match=r"more than the .* GiB of device memory on each of 8"):
    experiment_config.check_memory_fits(config, num_devices=8, device_memory_bytes=needed - 1)
