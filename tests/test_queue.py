"""Tests for semppl_jax.queue: ring semantics, block layout, sharded enqueue without gathers."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semppl_jax import queue as queue_lib

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def reference_enqueue(emb, lab, position, items, item_labels, num_shards):
  """Plain-loop numpy reference of the block ring buffer."""
  emb, lab = emb.copy(), lab.copy()
  size, batch = emb.shape[1], items.shape[1]
  block, per_block = size // num_shards, batch // num_shards
  for shard in range(num_shards):
    for j in range(per_block):
      slot = shard * block + (position + j) % block
      emb[:, slot] = items[:, shard * per_block + j]
      lab[:, slot] = item_labels[shard * per_block + j]
  return emb, lab, (position + per_block) % block


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def queue_shardings(mesh):
  slots = NamedSharding(mesh, P(None, "data"))
  return queue_lib.Queue(slots, slots, NamedSharding(mesh, P()))


def test_init():
  q = queue_lib.init(3, 16, 5)
  assert q.embeddings.shape == (3, 16, 5) and q.embeddings.dtype == jnp.float32
  assert q.labels.shape == (3, 16) and q.labels.dtype == jnp.int32
  assert q.position.shape == () and q.position.dtype == jnp.int32
  np.testing.assert_array_equal(q.labels, -1)
  np.testing.assert_array_equal(q.embeddings, 0)
  assert int(q.position) == 0
  assert queue_lib.init(1, 4, 2, dtype=jnp.bfloat16).embeddings.dtype == jnp.bfloat16
  assert float(queue_lib.fill_fraction(q)) == 0.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_queues=0, size=4, dim=2), "num_queues"),
    (dict(num_queues=1, size=0, dim=2), "size"),
    (dict(num_queues=1, size=4, dim=-1), "dim"),
])
def test_init_bad_input(kwargs, name):
  with pytest.raises(ValueError, match=name):
    queue_lib.init(**kwargs)


@pytest.mark.parametrize("num_shards, batch", [(1, 5), (2, 6), (4, 4)])
def test_enqueue_ring_semantics(num_shards, batch):
  """Several enqueues, wrapping around the blocks, match the loop reference step by step."""
  num_queues, size, dim = 2, 16, 3
  rng = np.random.default_rng(num_shards)
  q = queue_lib.init(num_queues, size, dim)
  emb = np.zeros((num_queues, size, dim), np.float32)
  lab = np.full((num_queues, size), -1, np.int32)
  position = 0
  enqueue = jax.jit(lambda q, e, l: queue_lib.enqueue(q, e, l, num_shards=num_shards))
  for step in range(7):
    items = rng.normal(size=(num_queues, batch, dim)).astype(np.float32)
    item_labels = rng.integers(0, 10, size=batch).astype(np.int32)
    q = enqueue(q, items, item_labels)
    emb, lab, position = reference_enqueue(emb, lab, position, items, item_labels, num_shards)
    np.testing.assert_array_equal(q.embeddings, emb)
    np.testing.assert_array_equal(q.labels, lab)
    assert int(q.position) == position
    np.testing.assert_allclose(float(queue_lib.fill_fraction(q)), np.mean(lab >= 0))
  assert float(queue_lib.fill_fraction(q)) == 1.0


def test_enqueue_overwrites_oldest():
  q = queue_lib.init(1, 4, 1)
  for value in range(6):
    q = queue_lib.enqueue(q, jnp.full((1, 1, 1), float(value)), jnp.array([value]))
  # Slots hold 4, 5, 2, 3: the two oldest items (0, 1) were overwritten.
  np.testing.assert_array_equal(q.labels[0], [4, 5, 2, 3])
  np.testing.assert_array_equal(q.embeddings[0, :, 0], [4, 5, 2, 3])
  assert int(q.position) == 2


def test_sharded_enqueue_matches_unsharded_and_stays_local(mesh):
  num_queues, size, dim, batch = 2, 32, 4, 16
  rng = np.random.default_rng(0)
  shardings = queue_shardings(mesh)
  items_sharding = NamedSharding(mesh, P(None, "data"))
  labels_sharding = NamedSharding(mesh, P("data"))
  enqueue = lambda q, e, l: queue_lib.enqueue(q, e, l, num_shards=8)
  jitted = jax.jit(enqueue)

  plain = queue_lib.init(num_queues, size, dim)
  eager = jax.device_put(plain, shardings)
  under_jit = eager
  for _ in range(3):  # 3 * 2 items per block of 4 slots: wraps around.
    items = rng.normal(size=(num_queues, batch, dim)).astype(np.float32)
    item_labels = rng.integers(0, 5, size=batch).astype(np.int32)
    plain = enqueue(plain, items, item_labels)
    items_g = jax.device_put(items, items_sharding)
    labels_g = jax.device_put(item_labels, labels_sharding)
    with jax.set_mesh(mesh):
      eager = enqueue(eager, items_g, labels_g)
      under_jit = jitted(under_jit, items_g, labels_g)
    for got in (eager, under_jit):
      for a, b in zip(got, plain):
        np.testing.assert_array_equal(a, b)
      assert got.embeddings.sharding.spec == P(None, "data")
      assert got.labels.sharding.spec == P(None, "data")

  # Each device holds one block of Q / 8 slots.
  shard0 = under_jit.labels.addressable_shards[0]
  assert shard0.data.shape == (num_queues, size // 8)

  # The compiled sharded enqueue moves no data between devices.
  with jax.set_mesh(mesh):
    hlo = jitted.lower(under_jit, items_g, labels_g).compile().as_text()
  assert not [op for op in COLLECTIVES if op in hlo]



def test_enqueue_write_flag(mesh):
  """write=False: the queue comes back unchanged (position included), bit for bit, sharded or
  not; write=True: the plain enqueue."""
  rng = np.random.default_rng(1)
  q = queue_lib.enqueue(queue_lib.init(2, 32, 4), rng.normal(size=(2, 8, 4)).astype(np.float32),
                        np.arange(8, dtype=np.int32), num_shards=8)
  items = rng.normal(size=(2, 16, 4)).astype(np.float32)
  item_labels = rng.integers(0, 5, size=16).astype(np.int32)
  fn = jax.jit(lambda q, e, l, w: queue_lib.enqueue(q, e, l, num_shards=8, write=w))
  plain = queue_lib.enqueue(q, items, item_labels, num_shards=8)
  placed = jax.device_put(q, queue_shardings(mesh))
  for queue in (q, placed):
    with jax.set_mesh(mesh) if queue is placed else contextlib.nullcontext():
      kept, written = fn(queue, items, item_labels, False), fn(queue, items, item_labels, True)
    for a, b in zip(kept, q):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(written, plain):
      np.testing.assert_array_equal(a, b)
  assert int(plain.position) != int(q.position)
  with pytest.raises(ValueError, match="write must be a scalar bool"):
    queue_lib.enqueue(q, items, item_labels, num_shards=8, write=jnp.ones(2, bool))

def test_enqueue_num_shards_differs_from_mesh(mesh):
  """num_shards != data-axis size falls back to the plain computation, same layout."""
  q = queue_lib.init(1, 8, 2)
  items = np.arange(8, dtype=np.float32).reshape(1, 4, 2)
  labels = np.array([0, 1, 2, 3], np.int32)
  expected = queue_lib.enqueue(q, items, labels, num_shards=2)
  with jax.set_mesh(mesh):
    got = queue_lib.enqueue(q, items, labels, num_shards=2)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(expected.labels[0], [0, 1, -1, -1, 2, 3, -1, -1])


@pytest.mark.parametrize("size, items_shape, labels_shape, num_shards, match", [
    (10, (2, 4, 3), (4,), 4, "queue size Q=10 must be a multiple of num_shards=4"),
    (12, (2, 3, 3), (3,), 2, "batch b=3 must be a multiple of num_shards=2"),
    (8, (2, 12, 3), (12,), 4, "must not exceed"),
    (12, (2, 14, 3), (14,), 1, "must not exceed"),
    (12, (3, 4, 3), (4,), 1, "embeddings must have shape"),
    (12, (2, 4, 5), (4,), 1, "embeddings must have shape"),
    (12, (2, 4, 3), (5,), 1, "labels must have shape"),
    (12, (2, 4, 3), (4,), 0, "num_shards must be a positive integer"),
])
def test_enqueue_bad_input(size, items_shape, labels_shape, num_shards, match):
  q = queue_lib.init(2, size, 3)
  with pytest.raises(ValueError, match=match):
    queue_lib.enqueue(q, np.zeros(items_shape, np.float32), np.zeros(labels_shape, np.int32),
                      num_shards=num_shards)
