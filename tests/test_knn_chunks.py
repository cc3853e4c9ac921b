"""The exact local top-k's chunked scoring and its k = 1 reduction (semppl_jax.knn, issue #20).

Every chunk size returns what one top-k over all slots returns, bit for bit, sharded or not;
k = 1 (a single max reduction, no sort) returns what the top-k path returns for the first
neighbour; both match plain numpy references on small-integer data (exact dot products, many
ties, so the lowest-slot tie rule is exercised).
"""
import jax
import jax.numpy as jnp
from knn_testlib import assert_identical, queue_sharding, sharded_vs_unsharded, slots_sharding
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from test_knn import NUM_CLASSES, integer_data, ref_pseudo_labels, ref_top_k

from semppl_jax import knn
from semppl_jax import queue as queue_lib


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def _top_k_args(mesh, seed, size=64):
  queries, keys, labels = integer_data(seed, batch=12, size=size)
  rep = NamedSharding(mesh, P())
  return (queries, keys, labels), (rep, slots_sharding(mesh, 2), slots_sharding(mesh, 1))


@pytest.mark.parametrize("k,chunk", [(1, 1), (1, 4), (3, 2), (12, 4)])
def test_chunked_top_k_is_the_one_block_top_k(mesh, k, chunk):
  """64 slots (8 per device): chunks of ``chunk`` slots == one block == the numpy reference,
  sharded == unsharded; embeddings included."""
  args, shardings = _top_k_args(mesh, seed=k * 10 + chunk)
  chunked = lambda q, e, l: knn.top_k_entries(q, e, l, k=k, return_embeddings=True,
                                              chunk_size=chunk)
  plain, plain_jit = sharded_vs_unsharded(mesh, chunked, args, shardings)
  one_block = jax.jit(lambda q, e, l: knn.top_k_entries(q, e, l, k=k, return_embeddings=True,
                                                        chunk_size=64))(*args)
  assert_identical(plain_jit, one_block)
  queries, keys, labels = args
  ref_s, ref_l, ref_i = ref_top_k(queries, keys, labels, k)
  for got in (plain, plain_jit):
    np.testing.assert_array_equal(np.asarray(got.scores), ref_s)
    np.testing.assert_array_equal(np.asarray(got.labels), ref_l)
    np.testing.assert_array_equal(np.asarray(got.indices), ref_i)
    want = np.where(ref_i[..., None] >= 0, keys[np.maximum(ref_i, 0)], 0)
    np.testing.assert_array_equal(np.asarray(got.embeddings), want)


def test_k1_reduction_returns_the_top_k_paths_first_neighbour():
  """k = 1 (max reduction) against the first column of k = 2 (lax.top_k), on data with many
  ties, empty chunks, an all-empty queue and all-equal scores."""
  queries, keys, labels = integer_data(3, batch=16, size=96, empty_share=0.5)
  labels[:32] = -1  # The first chunks of 16 hold no eligible entry.
  cases = [(queries, keys, labels),
           (queries, keys, np.full_like(labels, -1)),
           (queries, np.ones_like(keys), labels)]  # Every score equal: the lowest slot wins.
  for chunk in (16, 96):
    one = jax.jit(lambda q, e, l, c=chunk: knn.top_k_entries(q, e, l, k=1, return_embeddings=True,
                                                             chunk_size=c))
    two = jax.jit(lambda q, e, l, c=chunk: knn.top_k_entries(q, e, l, k=2, return_embeddings=True,
                                                             chunk_size=c))
    for args in cases:
      got, first = one(*args), jax.tree.map(lambda x: x[:, :1], two(*args))
      assert_identical(got, first)
  got = one(*cases[2])
  np.testing.assert_array_equal(np.asarray(got.indices[:, 0]), np.flatnonzero(labels >= 0)[0])
  empty = one(*cases[1])
  assert (np.asarray(empty.indices) == -1).all() and (np.asarray(empty.labels) == -1).all()
  assert np.isneginf(np.asarray(empty.scores)).all() and not np.asarray(empty.embeddings).any()


def test_k1_reduction_nan_is_the_largest_score_as_in_top_k():
  scores = jnp.array([[1.0, jnp.nan, 3.0, jnp.nan], [2.0, 5.0, 5.0, -jnp.inf],
                      [-jnp.inf] * 4])
  values, positions = knn._max_and_position(scores)
  top_values, top_positions = jax.lax.top_k(scores, 1)
  np.testing.assert_array_equal(np.asarray(values), np.asarray(top_values[:, 0]))
  np.testing.assert_array_equal(np.asarray(positions), np.asarray(top_positions[:, 0]))
  np.testing.assert_array_equal(np.asarray(positions), [1, 1, 0])


@pytest.mark.parametrize("k", [1, 3])
def test_chunked_pseudo_labels_match_the_reference(mesh, k):
  """pseudo_labels over 2 queues of 64 slots, chunks of 2 (sharded: 8 slots per device, 4
  chunks) == one block == the numpy reference of the vote rules."""
  rng = np.random.default_rng(k)
  queries = rng.integers(-1, 2, size=(2, 10, 6)).astype(np.float32)
  emb = rng.integers(-1, 2, size=(2, 64, 6)).astype(np.float32)
  lab = rng.integers(-1, NUM_CLASSES, size=(2, 64)).astype(np.int32)
  q = queue_lib.Queue(emb, lab, np.zeros((), np.int32))
  fn = lambda x, q, c: knn.pseudo_labels(x, q, k=k, num_classes=NUM_CLASSES, chunk_size=c)
  chunked = lambda x, q: fn(x, q, 2)
  plain, plain_jit = sharded_vs_unsharded(
      mesh, chunked, (queries, q), (NamedSharding(mesh, P()), queue_sharding(mesh)))
  want = ref_pseudo_labels(queries, emb, lab, k, NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(plain), want)
  np.testing.assert_array_equal(np.asarray(plain_jit), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, q: fn(x, q, 64))(queries, q)), want)


def test_chunked_weighted_knn_scores_equal_one_block():
  """Float data at a realistic shape (D = 128, 2048 entries, chunks of 512): the cosine scores
  of a chunk are those of the whole bank (on XLA:CPU a tiny block, e.g. 8 x 32, can round a dot
  product differently: the module docstring's caveat on scores)."""
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(64, 128)).astype(np.float32)
  bank = rng.normal(size=(2048, 128)).astype(np.float32)
  labels = rng.integers(-1, NUM_CLASSES, size=2048).astype(np.int32)
  fn = jax.jit(lambda q, e, l, c: knn.weighted_knn_scores(
      q, e, l, k=5, num_classes=NUM_CLASSES, temperature=0.1, chunk_size=c), static_argnums=3)
  assert_identical(fn(queries, bank, labels, 512), fn(queries, bank, labels, 2048))


def test_auto_chunk_size():
  budget = knn.CHUNK_ELEMENTS
  assert knn.auto_chunk_size(100, 4096, 1) == 4096  # Fits: one block, no loop.
  # The paper's shape at Q = 2^20 on 16 chips: 14,336 query rows, 65,536 slots per chip.
  chunk = knn.auto_chunk_size(14336, 65536, 1)
  assert chunk == 4096 and 14336 * chunk <= budget < 14336 * 2 * chunk
  # A divisor, as large as the budget allows.
  assert knn.auto_chunk_size(budget // 1000, 3 * 5 * 7 * 64, 1) == 960
  # No divisor within 8x of the budget (a prime shard): one block, as before chunking.
  assert knn.auto_chunk_size(budget // 64, 65537, 1) == 65537
  # Never fewer slots than k.
  assert knn.auto_chunk_size(budget, 1024, 8) == 8


def test_chunk_size_must_divide_the_slots_per_device(mesh):
  queries, keys, labels = integer_data(0, size=64)
  for bad in (0, -4, 2.0):
    with pytest.raises(ValueError, match="chunk_size must be a positive Python integer"):
      knn.top_k_entries(queries, keys, labels, k=1, chunk_size=bad)
  with pytest.raises(ValueError, match=r"chunk_size=5 must divide the slots per device \(64\)"):
    knn.top_k_entries(queries, keys, labels, k=1, chunk_size=5)
  placed = [jax.device_put(keys, slots_sharding(mesh, 2)),
            jax.device_put(labels, slots_sharding(mesh, 1))]
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"divide the slots per device \(8\)"):
    knn.top_k_entries(queries, *placed, k=1, chunk_size=16)


def test_chunks_bound_the_temporaries():
  """The compiled program's temporaries: one [rows, chunk] score block instead of [rows, Q]."""
  rows, size, dim = 512, 8192, 16
  q = queue_lib.Queue(jax.ShapeDtypeStruct((1, size, dim), jnp.float32),
                      jax.ShapeDtypeStruct((1, size), jnp.int32),
                      jax.ShapeDtypeStruct((), jnp.int32))
  x = jax.ShapeDtypeStruct((1, rows, dim), jnp.float32)

  def temp_bytes(chunk):
    fn = lambda x, q: knn.pseudo_labels(x, q, k=1, num_classes=NUM_CLASSES, chunk_size=chunk)
    return jax.jit(fn).lower(x, q).compile().memory_analysis().temp_size_in_bytes

  block = rows * size * 4
  full, chunked = temp_bytes(size), temp_bytes(256)
  assert full >= block
  assert chunked < block / 8, (chunked, block)
