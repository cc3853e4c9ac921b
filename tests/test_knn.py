"""Tests for semppl_jax.knn against plain numpy references; sharded == unsharded bit for bit."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semppl_jax import knn
from semppl_jax import queue as queue_lib

NUM_CLASSES = 4


# ----------------------------------------------------------------------------- references


def ref_ranking(scores, eligible):
  """Eligible indices ordered by descending score, ties by ascending index."""
  return sorted(np.flatnonzero(eligible), key=lambda j: (-scores[j], j))


def ref_top_k(queries, keys, labels, k, num_classes=None):
  """Per query: (scores, labels, indices) of the k best eligible entries, padded (-inf, -1, -1)."""
  scores = queries.astype(np.float64) @ keys.astype(np.float64).T
  eligible = labels >= 0
  if num_classes is not None:
    eligible &= labels < num_classes
  width = min(k, keys.shape[0])
  out_s = np.full((len(queries), width), -np.inf)
  out_l = np.full((len(queries), width), -1)
  out_i = np.full((len(queries), width), -1)
  for row in range(len(queries)):
    chosen = ref_ranking(scores[row], eligible)[:k]
    out_s[row, :len(chosen)] = scores[row, chosen]
    out_l[row, :len(chosen)] = labels[chosen]
    out_i[row, :len(chosen)] = chosen
  return out_s, out_l, out_i


def ref_majority(votes, num_classes):
  """Most frequent non-negative value per row (ties -> smallest), -1 if none."""
  out = []
  for row in votes:
    row = [v for v in row if v >= 0]
    if not row:
      out.append(-1)
      continue
    counts = np.bincount(row, minlength=num_classes)
    out.append(int(np.argmax(counts)))
  return np.array(out)


def ref_vote(queries, keys, labels, k, num_classes):
  _, top_labels, _ = ref_top_k(queries, keys, labels, k, num_classes)
  return ref_majority(top_labels, num_classes)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


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


def integer_data(seed, batch=10, size=64, dim=6, empty_share=0.4):
  """Small-integer vectors: exact float32 dot products with many ties."""
  rng = np.random.default_rng(seed)
  queries = rng.integers(-1, 2, size=(batch, dim)).astype(np.float32)
  keys = rng.integers(-1, 2, size=(size, dim)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=size).astype(np.int32)
  labels[rng.random(size) < empty_share] = -1
  return queries, keys, labels


# ----------------------------------------------------------------------------- top_k_entries


@pytest.mark.parametrize("k", [3, 12, 100])
def test_top_k_entries(mesh, k):
  """Ties by lowest slot index, empty slots skipped, k > Q / devices and k > Q."""
  queries, keys, labels = integer_data(0)
  fn = lambda q, e, l: knn.top_k_entries(q, e, l, k=k, return_embeddings=True)
  results = sharded_vs_unsharded(
      mesh, fn, (queries, keys, labels), (None, slots_sharding(mesh, 2), slots_sharding(mesh, 1)))
  ref_s, ref_l, ref_i = ref_top_k(queries, keys, labels, k)
  ref_e = np.where((ref_i >= 0)[..., None], keys[np.maximum(ref_i, 0)], 0)
  for got in results:
    assert got.scores.shape == (10, min(k, 64))
    np.testing.assert_array_equal(got.scores, ref_s.astype(np.float32))
    np.testing.assert_array_equal(got.labels, ref_l)
    np.testing.assert_array_equal(got.indices, ref_i)
    np.testing.assert_array_equal(got.embeddings, ref_e)


# ----------------------------------------------------------------------------- knn_vote


@pytest.mark.parametrize("k", [1, 3, 12, 100])
def test_knn_vote_ties_partly_empty(mesh, k):
  """Integer data (many ties), 40 % empty slots, k up to > Q / devices and > Q."""
  queries, keys, labels = integer_data(1)
  # Out-of-range labels in a device array count as empty slots.
  labels[[5, 40]] = NUM_CLASSES + 2
  fn = lambda q, e, l: knn.knn_vote(q, e, l, k=k, num_classes=NUM_CLASSES)
  results = sharded_vs_unsharded(
      mesh, fn, (queries, keys, jnp.asarray(labels)),
      (None, slots_sharding(mesh, 2), slots_sharding(mesh, 1)))
  expected = ref_vote(queries, keys, labels, k, NUM_CLASSES)
  for got in results:
    assert got.dtype == jnp.int32 and got.shape == (10,)
    np.testing.assert_array_equal(got, expected)


def test_knn_vote_fewer_valid_than_k_and_empty(mesh):
  queries, keys, _ = integer_data(2)
  labels = np.full(64, -1, np.int32)
  labels[[17, 18, 50, 51, 52]] = [3, 1, 1, 3, 2]  # 5 valid entries in two shards.
  fn = lambda q, e, l: knn.knn_vote(q, e, l, k=7, num_classes=NUM_CLASSES)
  shardings = (None, slots_sharding(mesh, 2), slots_sharding(mesh, 1))
  for got in sharded_vs_unsharded(mesh, fn, (queries, keys, labels), shardings):
    # All 5 valid entries vote: 1 and 3 tie with two votes each -> 1.
    np.testing.assert_array_equal(got, np.ones(10))
    np.testing.assert_array_equal(got, ref_vote(queries, keys, labels, 7, NUM_CLASSES))

  empty = np.full(64, -1, np.int32)
  for got in sharded_vs_unsharded(mesh, fn, (queries, keys, empty), shardings):
    np.testing.assert_array_equal(got, -np.ones(10))


def test_knn_vote_normalised_floats(mesh):
  rng = np.random.default_rng(3)
  queries = rng.normal(size=(16, 8)).astype(np.float32)
  keys = rng.normal(size=(128, 8)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  labels = rng.integers(-1, NUM_CLASSES, size=128).astype(np.int32)
  fn = lambda q, e, l: knn.knn_vote(q, e, l, k=5, num_classes=NUM_CLASSES)
  results = sharded_vs_unsharded(
      mesh, fn, (queries, keys, labels), (None, slots_sharding(mesh, 2), slots_sharding(mesh, 1)))
  for got in results:
    np.testing.assert_array_equal(got, ref_vote(queries, keys, labels, 5, NUM_CLASSES))


# ----------------------------------------------------------------------------- pseudo_labels


def test_pseudo_labels(mesh):
  rng = np.random.default_rng(4)
  num_views, batch, size, dim = 3, 12, 64, 4
  queries = rng.integers(-1, 2, size=(num_views, batch, dim)).astype(np.float32)
  emb = rng.integers(-1, 2, size=(num_views, size, dim)).astype(np.float32)
  lab = rng.integers(-1, NUM_CLASSES, size=(num_views, size)).astype(np.int32)
  lab[0] = -1  # Queue 0 is empty: its votes are -1 and must be ignored.
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(lab), jnp.zeros((), jnp.int32))
  fn = lambda x, q: knn.pseudo_labels(x, q, k=3, num_classes=NUM_CLASSES)
  results = sharded_vs_unsharded(mesh, fn, (queries, q), (None, queue_sharding(mesh)))

  votes = [ref_vote(queries[j], emb[l], lab[l], 3, NUM_CLASSES)
           for j in range(num_views) for l in range(num_views)]
  expected = ref_majority(np.stack(votes, axis=1), NUM_CLASSES)
  for got in results:
    assert got.dtype == jnp.int32 and got.shape == (batch,)
    np.testing.assert_array_equal(got, expected)

  all_empty = queue_lib.init(num_views, size, dim)
  np.testing.assert_array_equal(fn(queries, all_empty), -np.ones(batch))


# ----------------------------------------------------------------------------- sampling


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


def test_sample_semantic_positives(mesh, sampling_queue):
  labels = np.array([0, 1, 2, 3, -1, 7, 0, 2], np.int32)
  num_positives = 4
  fn = lambda key, y, q: knn.sample_semantic_positives(key, y, q, num_positives)
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
  for l in range(2):
    for i, y in enumerate(labels):
      has_match = y >= 0 and bool((queue_labels[l] == y).any())
      np.testing.assert_array_equal(valid[l, :, i], has_match)
      for n in range(num_positives):
        if has_match:
          queue_index, slot = int(emb[l, n, i, 0]), int(emb[l, n, i, 1])
          assert queue_index == l and queue_labels[l, slot] == y
          assert emb[l, n, i].tobytes() == queue_emb[l, slot].tobytes()
        else:
          assert emb[l, n, i].tobytes() == np.zeros(3, np.float32).tobytes()
  assert not valid[1, :, 3].any() and not valid[:, :, 4].any() and not valid[:, :, 5].any()

  other, _ = fn(jax.random.key(1), labels, sampling_queue)
  assert not np.array_equal(other, emb)


def test_sample_semantic_positives_uniform():
  size, batch, num_positives = 64, 128, 8
  slots = np.array([3, 10, 11, 30, 45, 63])  # Class 2 entries, spread over 5 shards.
  labels = np.full((1, size), 1, np.int32)
  labels[0, slots] = 2
  labels[0, 20:28] = -1
  emb = np.stack([np.arange(size), np.zeros(size)], axis=1)[None].astype(np.float32)
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(labels), jnp.zeros((), jnp.int32))
  draw = jax.jit(lambda key: knn.sample_semantic_positives(
      key, jnp.full((batch,), 2, jnp.int32), q, num_positives))
  picks = []
  for seed in range(10):
    emb_out, valid = draw(jax.random.key(seed))
    assert bool(valid.all())
    picks.append(np.asarray(emb_out[0, :, :, 0]).astype(int))  # [N, B] chosen slots.
  picks = np.stack(picks)
  assert set(np.unique(picks)) <= set(slots.tolist())
  counts = np.array([(picks == s).sum() for s in slots])
  assert scipy.stats.chisquare(counts).pvalue > 1e-3
  # Draws of different n for the same image are independent: they coincide ~1/6 of the time.
  coincide = np.mean(picks[:, 0] == picks[:, 1])
  assert 0.1 < coincide < 0.25


# ----------------------------------------------------------------------------- evaluation kNN


def ref_weighted(queries, bank, labels, k, num_classes, temperature):
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  sims, top_labels, _ = ref_top_k(queries, bank, labels, k, num_classes)
  out = np.zeros((len(queries), num_classes))
  for row in range(len(queries)):
    for s, y in zip(sims[row], top_labels[row]):
      if y >= 0:
        out[row, y] += np.exp(s / temperature)
  return out


@pytest.mark.parametrize("k", [5, 100])
def test_weighted_knn_scores(mesh, k):
  """Entries +-1 in D=4 (norm 2) scaled by powers of two: exact cosines with many ties."""
  rng = np.random.default_rng(6)
  queries = rng.choice([-1.0, 1.0], size=(6, 4)).astype(np.float32)
  bank = (rng.choice([-1.0, 1.0], size=(64, 4))
          * rng.choice([0.5, 1.0, 4.0], size=(64, 1))).astype(np.float32)
  labels = rng.integers(-1, NUM_CLASSES, size=64).astype(np.int32)
  fn = lambda q, e, l: knn.weighted_knn_scores(q, e, l, k=k, num_classes=NUM_CLASSES,
                                               temperature=0.1)
  results = sharded_vs_unsharded(
      mesh, fn, (queries, bank, labels), (None, slots_sharding(mesh, 2), slots_sharding(mesh, 1)))
  expected = ref_weighted(queries, bank, labels, k, NUM_CLASSES, 0.1)
  for got in results:
    assert got.shape == (6, NUM_CLASSES) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_weighted_knn_scores_floats(mesh):
  rng = np.random.default_rng(8)
  queries = rng.normal(size=(6, 8)).astype(np.float32)
  bank = rng.normal(size=(64, 8)).astype(np.float32) * 3.0
  labels = rng.integers(-1, NUM_CLASSES, size=64).astype(np.int32)
  got = jax.jit(lambda q, e, l: knn.weighted_knn_scores(
      q, e, l, k=7, num_classes=NUM_CLASSES, temperature=0.07))(queries, bank, labels)
  np.testing.assert_allclose(got, ref_weighted(queries, bank, labels, 7, NUM_CLASSES, 0.07),
                             rtol=1e-4)


def test_float_scores_bit_identical_at_realistic_shapes(mesh):
  """Gaussian data, D = 128: float scores (dot and cosine) match sharded vs unsharded exactly."""
  rng = np.random.default_rng(9)
  queries = rng.normal(size=(32, 128)).astype(np.float32)
  keys = rng.normal(size=(2048, 128)).astype(np.float32)
  labels = rng.integers(-1, 10, size=2048).astype(np.int32)
  fn = lambda q, e, l: (knn.top_k_entries(q, e, l, k=20),
                        knn.weighted_knn_scores(q, e, l, k=20, num_classes=10, temperature=0.07))
  expected = jax.jit(fn)(queries, keys, labels)
  with jax.set_mesh(mesh):
    got = jax.jit(fn)(queries, jax.device_put(keys, slots_sharding(mesh, 2)),
                      jax.device_put(labels, slots_sharding(mesh, 1)))
  assert_identical(expected, got)
  _, ref_l, ref_i = ref_top_k(queries, keys, labels, 20)
  np.testing.assert_array_equal(expected[0].indices, ref_i)
  np.testing.assert_array_equal(expected[0].labels, ref_l)


# ----------------------------------------------------------------------------- memory


def test_sharded_path_never_holds_full_score_matrix(mesh):
  """Compiled per-device program: no buffer with a Q-sized axis, temp memory ~ B * Q / 8."""
  batch, size, dim = 64, 16384, 16
  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, s))
  vote = jax.jit(lambda q, e, l: knn.knn_vote(q, e, l, k=4, num_classes=NUM_CLASSES))
  sample = jax.jit(lambda key, y, q: knn.sample_semantic_positives(key, y, q, 2))
  q_spec = queue_lib.Queue(spec((2, size, dim), jnp.float32, P(None, "data")),
                           spec((2, size), jnp.int32, P(None, "data")),
                           spec((), jnp.int32, P()))
  with jax.set_mesh(mesh):
    compiled_vote = vote.lower(spec((batch, dim), jnp.float32, P()),
                               spec((size, dim), jnp.float32, P("data")),
                               spec((size,), jnp.int32, P("data"))).compile()
    compiled_sample = sample.lower(jax.random.key(0), spec((batch,), jnp.int32, P()),
                                   q_spec).compile()
  full_scores = batch * size * 4
  assert compiled_vote.memory_analysis().temp_size_in_bytes < full_scores / 4
  for compiled in (compiled_vote, compiled_sample):
    assert not re.search(rf"\[[0-9,]*\b{size}\b", compiled.as_text())


# ----------------------------------------------------------------------------- bad input


def test_bad_input(mesh):
  queries, keys, labels = integer_data(7)
  vote = lambda **kw: knn.knn_vote(**{**dict(queries=queries, queue_embeddings=keys,
                                              queue_labels=labels, k=1,
                                              num_classes=NUM_CLASSES), **kw})
  with pytest.raises(ValueError, match="queue_embeddings"):
    vote(queue_embeddings=keys[:, :4])
  with pytest.raises(ValueError, match="queue_labels"):
    vote(queue_labels=labels[:10])
  with pytest.raises(ValueError, match="queries"):
    vote(queries=queries[0])
  for bad_k in (0, -1, 1.5, None):
    with pytest.raises(ValueError, match="k must be"):
      vote(k=bad_k)
  with pytest.raises(ValueError, match="num_classes"):
    vote(num_classes=0)
  with pytest.raises(ValueError, match=r"queue_labels must lie in \[-1, 4\)"):
    vote(queue_labels=np.where(labels == 0, NUM_CLASSES, labels).astype(np.int32))
  with pytest.raises(ValueError, match="multiple of the mesh's 'data' axis size 8"):
    with jax.set_mesh(mesh):
      vote(queue_embeddings=keys[:60], queue_labels=labels[:60])

  q = queue_lib.init(2, 16, 6)
  with pytest.raises(ValueError, match="queries must have shape"):
    knn.pseudo_labels(queries, q, k=1, num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="queue.embeddings"):
    knn.pseudo_labels(np.zeros((2, 3, 5), np.float32), q, k=1, num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="num_positives"):
    knn.sample_semantic_positives(jax.random.key(0), np.zeros(3, np.int32), q, 0)
  with pytest.raises(ValueError, match="labels must have shape"):
    knn.sample_semantic_positives(jax.random.key(0), np.zeros((3, 1), np.int32), q, 1)
  with pytest.raises(ValueError, match="temperature"):
    knn.weighted_knn_scores(queries, keys, labels, k=1, num_classes=NUM_CLASSES, temperature=0)
  with pytest.raises(ValueError, match="bank_embeddings"):
    knn.weighted_knn_scores(queries, keys[:, :2], labels, k=1, num_classes=NUM_CLASSES,
                            temperature=0.1)
  with pytest.raises(ValueError, match="key_labels"):
    knn.top_k_entries(queries, keys, labels[:3], k=1)


def test_check_labels():
  knn.check_labels(np.array([-1, 0, 3]), 4)
  knn.check_labels(jnp.array([0, 3]), 4, allow_empty=False)
  with pytest.raises(ValueError, match=r"labels must lie in \[-1, 4\)"):
    knn.check_labels(np.array([0, 4]), 4)
  with pytest.raises(ValueError, match=r"my_labels must lie in \[0, 4\)"):
    knn.check_labels(np.array([-1, 0]), 4, name="my_labels", allow_empty=False)
  with pytest.raises(ValueError, match="labels must lie"):
    knn.check_labels(np.array([-2]), 4)
  with pytest.raises(ValueError, match="integer"):
    knn.check_labels(np.array([0.5]), 4)
