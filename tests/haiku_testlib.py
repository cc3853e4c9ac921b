"""Test helper shared by test_colabs and test_label: random values for Haiku shape trees."""
import jax
import numpy as np


def random_like(shapes, seed):
  """Random values for a Haiku (params, state) shape tree: He-scaled weights, unit BN scales
  and variances, zero offsets / means / counters (finite activations in inference mode)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    module, name = path[-2].key, path[-1].key
    if np.issubdtype(s.dtype, np.integer):
      return np.zeros(s.shape, s.dtype)
    if name == "w":
      return (rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))).astype(s.dtype)
    if name == "scale" or module.endswith("var_ema"):
      return np.ones(s.shape, s.dtype)
    return np.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)
