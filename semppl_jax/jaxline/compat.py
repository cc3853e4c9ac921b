"""Lets jaxline 0.0.8 run on current JAX (0.10.x).

jaxline 0.0.8 calls ``jax.tree_map``, ``jax.device_put_sharded`` and ``jax.device_put_replicated``,
all removed from JAX. ``install()`` puts equivalent functions back on the ``jax`` module. It has an
effect on the process, so it is called explicitly by whatever launches jaxline (the launcher, the
tests), never at import time.
"""
from typing import Any, Sequence

import jax
import numpy as np


def _device_put_sharded(shards: Sequence[Any], devices: Sequence[jax.Device]) -> Any:
  """Stacks ``shards`` (one pytree per device) into arrays sharded over ``devices``."""
  if len(shards) != len(devices):
    raise ValueError(f"device_put_sharded needs one shard per device: got {len(shards)} shards "
                     f"for {len(devices)} devices.")
  mesh = jax.sharding.Mesh(np.array(devices), ("i",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("i"))

  def stack(*xs):
    arrays = [jax.device_put(np.asarray(x)[None], d) for x, d in zip(xs, devices)]
    shape = (len(devices),) + np.shape(xs[0])
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

  return jax.tree_util.tree_map(stack, *shards)


def _device_put_replicated(x: Any, devices: Sequence[jax.Device]) -> Any:
  """Replicates ``x`` with a new leading axis of size ``len(devices)``, one row per device."""
  return _device_put_sharded([x] * len(devices), devices)


def install() -> None:
  """Restores the removed JAX names jaxline 0.0.8 uses (idempotent)."""
  if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree_util.tree_map
  if not hasattr(jax, "device_put_sharded"):
    jax.device_put_sharded = _device_put_sharded
  if not hasattr(jax, "device_put_replicated"):
    jax.device_put_replicated = _device_put_replicated
