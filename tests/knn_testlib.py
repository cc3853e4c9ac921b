"""Helpers of the kNN and semantic-positive tests: shardings of queues and entries, and the
sharded == unsharded (bit for bit) comparison both modules promise."""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from semppl_jax import queue as queue_lib


def slots_sharding(mesh, ndim):
  """Sharded along the slot axis: axis 0 of [Q] / [Q, D], axis 1 of [L, Q] / [L, Q, D]."""
  return NamedSharding(mesh, P("data") if ndim <= 2 else P(None, "data"))


def queue_sharding(mesh):
  slots = NamedSharding(mesh, P(None, "data"))
  return queue_lib.Queue(slots, slots, NamedSharding(mesh, P()))


def sharded_vs_unsharded(mesh, fn, args, shardings):
  """Runs fn unsharded and inside jax.set_mesh (args placed), each eagerly and under jax.jit.

  Asserts the sharded results equal the unsharded ones of the same mode bit for bit (eager vs
  jit may round differently: XLA fuses differently) and returns the unsharded (eager, jitted).
  """
  plain, plain_jit = fn(*args), jax.jit(fn)(*args)
  placed = [a if s is None else jax.device_put(a, s) for a, s in zip(args, shardings)]
  with jax.set_mesh(mesh):
    eager = fn(*placed)
    jitted = jax.jit(fn)(*placed)
  assert_identical(plain, eager)
  assert_identical(plain_jit, jitted)
  return plain, plain_jit


def assert_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()  # Bit patterns (-0.0 != 0.0).
