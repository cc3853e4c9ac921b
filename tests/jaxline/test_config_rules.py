"""Tests for semppl_jax.jaxline.config_rules: every rule names the field, the value and what is allowed."""
import math

from ml_collections import config_dict
import pytest

from semppl_jax.jaxline import config_rules as rules


def _config(**data):
  return config_dict.ConfigDict({"data": data})


def test_get_walks_dotted_paths_and_names_the_missing_part():
  assert rules.get(_config(batch_size=8), "data.batch_size") == 8
  with pytest.raises(ValueError, match=r"^config.data.seed: is missing."):
    rules.get(_config(batch_size=8), "data.seed")
  with pytest.raises(ValueError, match=r"^config.optimizer: is missing."):
    rules.get(_config(), "optimizer.momentum")


def test_require_fields_lists_every_missing_field():
  with pytest.raises(ValueError, match=r"missing the field\(s\) data.a, other.b; see x.py"):
    rules.require_fields(_config(c=1), ["data.a", "data.c", "other.b"], "x.py")


@pytest.mark.parametrize("value, ok", [(3, True), (0, False), (11, False), (2.0, False),
                                       (True, False)])
def test_integer_bounds_and_type(value, ok):
  config = _config(x=value)
  if ok:
    assert rules.integer(config, "data.x", low=1, high=10) == value
  else:
    with pytest.raises(ValueError, match=r"^config.data.x: must be"):
      rules.integer(config, "data.x", low=1, high=10)


@pytest.mark.parametrize("value, message", [
    (math.nan, "must be a finite number, got nan"),
    (math.inf, "must be a finite number, got inf"),
    ("0.1", "must be a finite number, got '0.1'"),
    (0.0, r"must be in \(0.0, 1.0\), got 0.0"),
    (1.0, r"must be in \(0.0, 1.0\), got 1.0"),
])
def test_number_is_finite_and_in_the_open_interval(value, message):
  with pytest.raises(ValueError, match=message):
    rules.number(_config(x=value), "data.x", 0.0, 1.0, low_open=True, high_open=True)
  assert rules.number(_config(x=0.5), "data.x", 0.0, 1.0, low_open=True, high_open=True) == 0.5


def test_interval_one_of_boolean_and_int_tuple():
  assert rules.interval(_config(x=(0.2, 1.0)), "data.x", 0.0, 1.0, low_open=True) == (0.2, 1.0)
  for bad in ((0.0, 1.0), (0.5, 0.2), (0.1, 1.5), 0.3):
    with pytest.raises(ValueError, match=r"^config.data.x: must be"):
      rules.interval(_config(x=bad), "data.x", 0.0, 1.0, low_open=True)
  with pytest.raises(ValueError, match="got 'c', allowed: 'a', 'b'"):
    rules.one_of(_config(x="c"), "data.x", ("a", "b"))
  with pytest.raises(ValueError, match="must be True or False, got 1"):
    rules.boolean(_config(x=1), "data.x")
  assert rules.int_tuple(_config(x=(1, 5)), "data.x") == (1, 5)
  for bad in ((), (1, 0), (1.5,), 3):
    with pytest.raises(ValueError, match="must be a non-empty tuple of ints >= 1"):
      rules.int_tuple(_config(x=bad), "data.x")


def test_batch_divisible_over_devices_and_processes():
  assert rules.batch_divisible(_config(b=24), "data.b", num_devices=8, num_processes=3) == 24
  with pytest.raises(ValueError, match=r"config.data.b: 16 is not divisible .* use a multiple "
                     "of 24"):
    rules.batch_divisible(_config(b=16), "data.b", num_devices=8, num_processes=3)
  with pytest.raises(ValueError, match=r"config.data.b: must be in \[1, inf\], got 0"):
    rules.batch_divisible(_config(b=0), "data.b", num_devices=8, num_processes=1)
