"""The one error type of :mod:`semppl_jax.checkpointing` (its own module: no import cycles)."""


class CheckpointError(ValueError):
  """A checkpoint file is missing, malformed, unsafe, or does not match what was expected."""
