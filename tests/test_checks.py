"""semppl_jax.checks: the shared argument checks."""
import numpy as np
import pytest

from semppl_jax import checks


def test_check_int_accepts_python_and_numpy_ints_at_or_above_the_minimum():
  assert checks.check_int("n", 3, 1) == 3
  assert checks.check_int("n", np.int64(0), 0) == 0 and type(checks.check_int("n", np.int8(2), 0)) is int


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3", None])
def test_check_int_names_the_argument_and_the_bound(value):
  with pytest.raises(ValueError, match=rf"^batch_size must be an int >= 1, got {value!r}$"):
    checks.check_int("batch_size", value, 1)
