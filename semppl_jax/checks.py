"""Argument checks shared by the library's public functions (numpy only: importing this never
pulls in jax or TensorFlow). Each raises ``ValueError`` naming the argument at fault."""
import numpy as np


def check_int(name: str, value, minimum: int) -> int:
  """``value`` as an int; ValueError naming ``name`` unless it is a Python / numpy int (not a
  bool) >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)
