"""Tests for semppl_jax.semantic_positives against a plain numpy / Python-int reference;
sharded == unsharded bit for bit."""
import re

import jax
import jax.numpy as jnp
from knn_testlib import assert_identical, queue_sharding, sharded_vs_unsharded
import numpy as np
import pytest
import scipy.stats
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semppl_jax import compiled_cost
from semppl_jax import queue as queue_lib
from semppl_jax import semantic_positives as sp

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


@pytest.fixture(scope="module")
def sampling_queue():
  """Two queues; entry q of queue l is [l, q, +-0.0] so a draw identifies its slot."""
  rng = np.random.default_rng(5)
  size = 64
  labels = rng.integers(-1, NUM_CLASSES, size=(2, size)).astype(np.int32)
  labels[1][labels[1] == 3] = -1  # Class 3 has no entry in queue 1.
  # Signed zeros: the sharded gather of embeddings must keep every bit.
  signed_zero = np.where(np.arange(size) % 2 == 0, -0.0, 0.0)
  emb = np.stack([np.stack([np.full(size, l), np.arange(size), signed_zero], axis=1)
                  for l in range(2)]).astype(np.float32)
  return queue_lib.Queue(jnp.asarray(emb), jnp.asarray(labels), jnp.zeros((), jnp.int32))


def ref_sample_slots(key, labels, queue_labels, num_positives):
  """Slot drawn for (l, n, i): the r-th entry labelled labels[i] in slot order, -1 if none.

  r = floor(u * total / 2^32) with u = jax.random.bits(key, (L, N, B), uint32), in Python ints.
  """
  num_queues = queue_labels.shape[0]
  bits = np.asarray(jax.random.bits(key, (num_queues, num_positives, len(labels)), jnp.uint32))
  out = np.full(bits.shape, -1)
  for l in range(num_queues):
    for i, y in enumerate(labels):
      matches = np.flatnonzero(queue_labels[l] == y) if y >= 0 else []
      for n in range(num_positives):
        if len(matches):
          out[l, n, i] = matches[(int(bits[l, n, i]) * len(matches)) >> 32]
  return out


@pytest.mark.slow
def test_sample_semantic_positives(mesh, sampling_queue):
  labels = np.array([0, 1, 2, 3, -1, 7, 0, 2], np.int32)
  num_positives = 4
  fn = lambda key, y, q: sp.sample_semantic_positives(key, y, q, num_positives)
  shardings = (None, None, queue_sharding(mesh))
  plain, plain_jit = sharded_vs_unsharded(mesh, fn, (jax.random.key(0), labels, sampling_queue),
                                          shardings)
  assert_identical(plain, plain_jit)  # No float arithmetic on the entries: exact everywhere.
  # A raw uint32 key works too (under jit only, to keep the test short).
  raw_key = jax.random.PRNGKey(0)
  raw_plain = jax.jit(fn)(raw_key, labels, sampling_queue)
  with jax.set_mesh(mesh):
    raw_sharded = jax.jit(fn)(raw_key, labels, jax.device_put(sampling_queue, shardings[2]))
  assert_identical(raw_plain, raw_sharded)

  emb, valid = map(np.asarray, plain)
  assert emb.shape == (2, num_positives, 8, 3) and plain[0].dtype == jnp.float32
  assert valid.shape == (2, num_positives, 8) and valid.dtype == np.bool_
  queue_labels = np.asarray(sampling_queue.labels)
  queue_emb = np.asarray(sampling_queue.embeddings)
  expected_slots = ref_sample_slots(jax.random.key(0), labels, queue_labels, num_positives)
  for l in range(2):
    for i, y in enumerate(labels):
      has_match = y >= 0 and bool((queue_labels[l] == y).any())
      np.testing.assert_array_equal(valid[l, :, i], has_match)
      for n in range(num_positives):
        if has_match:
          queue_index, slot = int(emb[l, n, i, 0]), int(emb[l, n, i, 1])
          assert queue_index == l and queue_labels[l, slot] == y  # Never an empty slot.
          assert slot == expected_slots[l, n, i]
          assert emb[l, n, i].tobytes() == queue_emb[l, slot].tobytes()
        else:
          assert expected_slots[l, n, i] == -1
          assert emb[l, n, i].tobytes() == np.zeros(3, np.float32).tobytes()
  assert not valid[1, :, 3].any() and not valid[:, :, 4].any() and not valid[:, :, 5].any()

  other, _ = fn(jax.random.key(1), labels, sampling_queue)
  assert not np.array_equal(other, emb)


def test_sample_semantic_positives_uniform(mesh):
  """Chi-square per class over 3 x 2048 x 2 draws on a queue with 3-8 entries per class."""
  size, batch, num_positives = 64, 2048, 2
  rng = np.random.default_rng(10)
  labels = np.full((1, size), -1, np.int32)
  per_class = {0: 3, 1: 5, 2: 8}
  free = rng.permutation(size)
  members = {}
  for y, m in per_class.items():
    members[y], free = np.sort(free[:m]), free[m:]  # Spread over several shards.
    labels[0, members[y]] = y
  emb = np.stack([np.arange(size), np.zeros(size)], axis=1)[None].astype(np.float32)
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(labels), jnp.zeros((), jnp.int32))
  targets = np.tile(np.array([0, 1, 2, 3], np.int32), batch // 4)  # Class 3 has no entry.
  fn = jax.jit(lambda key, y, q: sp.sample_semantic_positives(key, y, q, num_positives))
  emb_out, valid = fn(jax.random.key(7), targets, q)
  with jax.set_mesh(mesh):
    assert_identical((emb_out, valid),
                     fn(jax.random.key(7), targets, jax.device_put(q, queue_sharding(mesh))))
  picks = np.asarray(emb_out[0, :, :, 0]).astype(int)  # [N, B] chosen slots.
  valid = np.asarray(valid[0])
  np.testing.assert_array_equal(valid, np.broadcast_to(targets != 3, valid.shape))
  for y, slots in members.items():
    chosen = picks[:, targets == y]
    assert set(np.unique(chosen)) <= set(slots.tolist())
    counts = np.array([(chosen == s).sum() for s in slots])
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, (y, counts)
  # Draws of different n for the same image are independent: they coincide ~1/8 of the time.
  class_2 = picks[:, targets == 2]
  assert 0.07 < np.mean(class_2[0] == class_2[1]) < 0.19


@pytest.mark.slow
def test_sample_semantic_positives_huge_labels(mesh):
  """Labels too large to pack with the slot into int32 take the pair sort; same draws."""
  size = 64
  rng = np.random.default_rng(11)
  # 50M packs with 8 slots per shard (limit ~2.7e8) but not with 64 unsharded (~3.4e7).
  values = np.array([-1, -7, 5, 50_000_000, 2 ** 31 - 1], np.int32)
  labels = rng.choice(values, size=(1, size)).astype(np.int32)
  emb = np.stack([np.arange(size), np.zeros(size)], axis=1)[None].astype(np.float32)
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(labels), jnp.zeros((), jnp.int32))
  targets = np.array([5, 50_000_000, 2 ** 31 - 1, -7, -1, 6], np.int32)
  fn = lambda key, y, q: sp.sample_semantic_positives(key, y, q, 3)
  plain, _ = sharded_vs_unsharded(mesh, fn, (jax.random.key(2), targets, q),
                                  (None, None, queue_sharding(mesh)))
  expected = ref_sample_slots(jax.random.key(2), targets, labels, 3)
  np.testing.assert_array_equal(np.where(plain[1], plain[0][..., 0], -1), expected)
  assert (expected[0, :, :3] >= 0).all() and (expected[0, :, 3:] == -1).all()


def test_stable_label_sort_both_paths():
  labels = np.array([[3, -1, 3, 0, -5, 2, 0, 3], [1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
  big = labels.copy()
  big[big == 3] = 2 ** 31 - 1  # Cannot be packed: the pair sort runs.
  for lab in (labels, big):
    got_sorted, got_order = jax.jit(sp._stable_label_sort)(lab)
    clipped = np.maximum(lab, -1)  # Every negative label is "empty": one group, slot order.
    order = np.argsort(clipped, axis=1, kind="stable")
    np.testing.assert_array_equal(got_order, order)
    np.testing.assert_array_equal(got_sorted, np.take_along_axis(clipped, order, 1))


def test_draw_ranks_large_counts():
  """floor(u * total / 2^32) exactly (Python ints), also for totals near 2^31."""
  total = np.array([[1, 2, 3, 1000, 65537, 2 ** 31 - 1, 0, 123456789]], np.int32)
  key = jax.random.key(3)
  ranks = np.asarray(jax.jit(sp._draw_ranks, static_argnums=2)(key, total, 64))
  bits = np.asarray(jax.random.bits(key, (1, 64, total.shape[1]), jnp.uint32))
  expected = np.array([[[(int(u) * int(t)) >> 32 for u, t in zip(row, total[0])]
                        for row in bits[0]]])
  np.testing.assert_array_equal(ranks, expected)
  assert (ranks[0, :, :6] < total[0, :6]).all() and (ranks >= 0).all()
  assert len(np.unique(ranks[0, :, 5])) == 64  # Large totals use the high bits too.


# ----------------------------------------------------------------------------- memory


def test_sharded_path_never_holds_a_queue_sized_buffer(mesh):
  """Compiled per-device program of the sampler: no buffer with a Q-sized axis."""
  batch, size, dim = 64, 16384, 16
  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, s))
  sample = jax.jit(lambda key, y, q: sp.sample_semantic_positives(key, y, q, 2))
  q_spec = queue_lib.Queue(spec((2, size, dim), jnp.float32, P(None, "data")),
                           spec((2, size), jnp.int32, P(None, "data")),
                           spec((), jnp.int32, P()))
  with jax.set_mesh(mesh):
    compiled_sample = sample.lower(jax.random.key(0), spec((batch,), jnp.int32, P()),
                                   q_spec).compile()
  assert not re.search(rf"\[[0-9,]*\b{size}\b", compiled_sample.as_text())


def test_sharded_sampler_sends_each_device_only_its_rows(mesh):
  """Compiled per-device program: the [L, N, B, D] draws arrive by one reduce-scatter of the
  device's own B / n rows (no all-reduce of the whole block); the result is sharded along B.
  With B not a multiple of the devices the whole block is all-reduced (replicated result)."""
  n = len(jax.devices())
  size, dim, num_positives, num_queues = 64 * n, 16, 3, 2
  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, s))
  sample = jax.jit(lambda key, y, q: sp.sample_semantic_positives(key, y, q, num_positives))
  q_spec = queue_lib.Queue(spec((num_queues, size, dim), jnp.float32, P(None, "data")),
                           spec((num_queues, size), jnp.int32, P(None, "data")),
                           spec((), jnp.int32, P()))
  for batch, scattered in ((4 * n, True), (4 * n + 1, False)):
    with jax.set_mesh(mesh):
      lowered = sample.lower(jax.random.key(0), spec((batch,), jnp.int32, P()), q_spec)
      compiled = lowered.compile()
    cost = compiled_cost.program_cost(compiled)
    out_sharding = compiled.output_shardings[0]
    full = num_queues * num_positives * batch * dim * 4
    if scattered:
      assert cost.count("reduce-scatter") == 1
      assert cost.largest("reduce-scatter") == full // n
      assert cost.largest("all-reduce") < full // n
      assert out_sharding.spec == P(None, None, "data")
    else:
      assert cost.count("reduce-scatter") == 0
      assert cost.largest("all-reduce") == full


# ----------------------------------------------------------------------------- bad input


def test_bad_input():
  q = queue_lib.init(2, 16, 6)
  with pytest.raises(ValueError, match="num_positives"):
    sp.sample_semantic_positives(jax.random.key(0), np.zeros(3, np.int32), q, 0)
  with pytest.raises(ValueError, match="labels must have shape"):
    sp.sample_semantic_positives(jax.random.key(0), np.zeros((3, 1), np.int32), q, 1)
