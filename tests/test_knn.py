"""Tests for semppl_jax.knn against plain numpy references; sharded == unsharded bit for bit."""
import re

import jax
import jax.numpy as jnp
from knn_testlib import assert_identical, queue_sharding, sharded_vs_unsharded, slots_sharding
import numpy as np
import pytest
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


def ref_rule(labels, sims):
  """Tie rule, written plainly: most ballots, then largest summed similarity, then smallest label.

  labels / sims: one row of ballots; labels < 0 are no ballot. Returns (label, summed sim),
  (-1, 0.0) without any ballot. Sums are float64 (exact for the small-integer test data).
  """
  count, total = {}, {}
  for y, s in zip(labels, sims):
    if y >= 0:
      count[y] = count.get(y, 0) + 1
      total[y] = total.get(y, 0.0) + float(s)
  if not count:
    return -1, 0.0
  best = min(count, key=lambda y: (-count[y], -total[y], y))
  return best, total[best]


def ref_vote_and_strength(queries, keys, labels, k, num_classes):
  sims, top_labels, _ = ref_top_k(queries, keys, labels, k, num_classes)
  return [ref_rule(l, s) for l, s in zip(top_labels, sims)]


def ref_vote(queries, keys, labels, k, num_classes):
  return np.array([y for y, _ in ref_vote_and_strength(queries, keys, labels, k, num_classes)])


def ref_pseudo_labels(queries, emb, lab, k, num_classes):
  """Votes of every (queue l, view j), ballots queue-major; combined with the same rule."""
  num_views, batch = queries.shape[:2]
  votes = [ref_vote_and_strength(queries[j], emb[l], lab[l], k, num_classes)
           for l in range(emb.shape[0]) for j in range(num_views)]
  return np.array([ref_rule([v[i][0] for v in votes], [v[i][1] for v in votes])[0]
                   for i in range(batch)])


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


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


VOTE_SHARDINGS = lambda mesh: (None, slots_sharding(mesh, 2), slots_sharding(mesh, 1))


def vote_fn(k):
  return lambda q, e, l: knn.knn_vote(q, e, l, k=k, num_classes=NUM_CLASSES)


@pytest.mark.parametrize("k", [1, 3, 12, 100])
@pytest.mark.slow
def test_knn_vote_ties_partly_empty(mesh, k):
  """Integer data (many count and similarity ties), 40 % empty, k up to > Q / devices and > Q."""
  queries, keys, labels = integer_data(1)
  # Out-of-range labels in a device array count as empty slots.
  labels[[5, 40]] = NUM_CLASSES + 2
  results = sharded_vs_unsharded(mesh, vote_fn(k), (queries, keys, jnp.asarray(labels)),
                                 VOTE_SHARDINGS(mesh))
  expected = ref_vote(queries, keys, labels, k, NUM_CLASSES)
  for got in results:
    assert got.dtype == jnp.int32 and got.shape == (10,)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_knn_vote_tie_rule(mesh):
  """Hand-made neighbourhoods; rows 0-3 are the cases the old smallest-label rule got wrong."""
  num_classes = 10
  # Query r is e_r; row r's entries hold their similarity on axis r and 0 elsewhere, so every
  # query scores its own 5 entries above 0 and all other valid entries exactly 0.
  sims_and_labels = [
      # Row 0: all-distinct labels -> the nearest one (7), not the smallest (3).
      ([0.9, 0.8, 0.7, 0.6, 0.5], [7, 3, 5, 8, 9], 7),
      # Row 1: 2 vs 2 votes; class 4 sums 0.9 + 0.1, class 2 sums 0.8 + 0.7 -> 2.
      ([0.9, 0.8, 0.7, 0.1, 0.05], [4, 2, 2, 4, 6], 2),
      # Row 2: 2 vs 2 votes, sums 1.125 vs 1.25 -> 5, although 1 is nearest and smaller.
      ([1.0, 0.75, 0.5, 0.25, 0.125], [1, 5, 5, 3, 1], 5),
      # Row 3: count beats similarity: 3 votes of class 8 beat 1 nearest vote of class 0.
      ([1.0, 0.25, 0.25, 0.25, 0.125], [0, 8, 8, 8, 6], 8),
      # Row 4: exact float tie of the sums (0.75 + 0.125 = 0.5 + 0.375) -> smallest label 3.
      ([0.75, 0.5, 0.375, 0.125, 0.0625], [6, 3, 3, 6, 1], 3),
  ]
  size, dim = 64, len(sims_and_labels) + 1
  queries = np.eye(len(sims_and_labels), dim, dtype=np.float32)
  keys = np.zeros((size, dim), np.float32)
  keys[:, -1] = 1.0  # Empty slots: non-zero vectors that every query scores 0.
  labels = np.full(size, -1, np.int32)
  slots = np.arange(size).reshape(-1, 8)[:, 3]  # One slot per shard, spread over 8 shards.
  for row, (sims, labs, _) in enumerate(sims_and_labels):
    for j, (s, y) in enumerate(zip(sims, labs)):
      slot = slots[j] + row  # 5 rows x 5 neighbours: distinct slots, 5 shards each.
      keys[slot, row], keys[slot, -1], labels[slot] = s, 0.0, y
  fn = lambda q, e, l: knn.knn_vote(q, e, l, k=5, num_classes=num_classes)
  expected = [want for _, _, want in sims_and_labels]
  assert ref_vote(queries, keys, labels, 5, num_classes).tolist() == expected
  for got in sharded_vs_unsharded(mesh, fn, (queries, keys, labels), VOTE_SHARDINGS(mesh)):
    np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_knn_vote_fewer_valid_than_k_and_empty(mesh):
  queries, keys, _ = integer_data(2)
  labels = np.full(64, -1, np.int32)
  labels[[17, 18, 50, 51, 52]] = [3, 1, 1, 3, 2]  # 5 valid entries in two shards.
  fn = vote_fn(7)
  for got in sharded_vs_unsharded(mesh, fn, (queries, keys, labels), VOTE_SHARDINGS(mesh)):
    # All 5 valid entries vote: 1 and 3 tie with two votes each, summed similarity decides.
    expected = ref_vote(queries, keys, labels, 7, NUM_CLASSES)
    assert set(expected.tolist()) == {1, 3}  # Both outcomes occur in this batch.
    np.testing.assert_array_equal(got, expected)

  empty = np.full(64, -1, np.int32)
  for got in sharded_vs_unsharded(mesh, fn, (queries, keys, empty), VOTE_SHARDINGS(mesh)):
    np.testing.assert_array_equal(got, -np.ones(10))


@pytest.mark.slow
def test_knn_vote_normalised_floats(mesh):
  rng = np.random.default_rng(3)
  queries = rng.normal(size=(16, 8)).astype(np.float32)
  keys = rng.normal(size=(128, 8)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  labels = rng.integers(-1, NUM_CLASSES, size=128).astype(np.int32)
  results = sharded_vs_unsharded(mesh, vote_fn(5), (queries, keys, labels), VOTE_SHARDINGS(mesh))
  for got in results:
    np.testing.assert_array_equal(got, ref_vote(queries, keys, labels, 5, NUM_CLASSES))


# ----------------------------------------------------------------------------- pseudo_labels


def pseudo_fn(k, num_classes=NUM_CLASSES):
  return lambda x, q: knn.pseudo_labels(x, q, k=k, num_classes=num_classes)


@pytest.mark.slow
def test_pseudo_labels(mesh):
  rng = np.random.default_rng(4)
  num_views, batch, size, dim = 3, 12, 64, 4
  queries = rng.integers(-1, 2, size=(num_views, batch, dim)).astype(np.float32)
  emb = rng.integers(-1, 2, size=(num_views, size, dim)).astype(np.float32)
  lab = rng.integers(-1, NUM_CLASSES, size=(num_views, size)).astype(np.int32)
  lab[0] = -1  # Queue 0 is empty: its votes are -1 and must be ignored.
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(lab), jnp.zeros((), jnp.int32))
  results = sharded_vs_unsharded(mesh, pseudo_fn(3), (queries, q), (None, queue_sharding(mesh)))
  expected = ref_pseudo_labels(queries, emb, lab, 3, NUM_CLASSES)
  for got in results:
    assert got.dtype == jnp.int32 and got.shape == (batch,)
    np.testing.assert_array_equal(got, expected)

  all_empty = queue_lib.init(num_views, size, dim)
  np.testing.assert_array_equal(pseudo_fn(3)(queries, all_empty), -np.ones(batch))


def test_pseudo_labels_min_agreement(mesh):
  """Images whose winner holds less than the required share of the valid ballots get -1."""
  rng = np.random.default_rng(7)
  num_views, batch, size, dim = 2, 16, 32, 4
  queries = rng.normal(size=(num_views, batch, dim)).astype(np.float32)
  emb = rng.normal(size=(num_views, size, dim)).astype(np.float32)
  lab = rng.integers(0, NUM_CLASSES, size=(num_views, size)).astype(np.int32)
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(lab), jnp.zeros((), jnp.int32))
  expected = ref_pseudo_labels(queries, emb, lab, 1, NUM_CLASSES)
  # Reference share: the 1-NN vote of each (queue, view) pair is a ballot.
  ballots = np.stack([ref_vote(queries[j], emb[l], lab[l], 1, NUM_CLASSES)
                      for l in range(num_views) for j in range(num_views)], axis=1)
  share = np.mean(ballots == expected[:, None], axis=1)
  assert set(share) == {0.25, 0.5, 0.75, 1.0}  # Every level of agreement occurs.
  for threshold in (0.0, 0.5, 0.75, 1.0):
    fn = lambda x, q, t=threshold: knn.pseudo_labels(x, q, k=1, num_classes=NUM_CLASSES,
                                                     min_agreement=t)
    for got in sharded_vs_unsharded(mesh, fn, (queries, q), (None, queue_sharding(mesh))):
      np.testing.assert_array_equal(got, np.where(share >= threshold, expected, -1))
  with pytest.raises(ValueError, match=r"min_agreement must be in \[0, 1\], got 1.5"):
    knn.pseudo_labels(queries, q, k=1, num_classes=NUM_CLASSES, min_agreement=1.5)


def test_pseudo_labels_bfloat16_queue_and_approximate_top_k(mesh):
  """A bfloat16 queue votes like the reference on the bf16-rounded queries and entries
  (scored in bf16 with float32 accumulation; sharded == unsharded). approximate=True
  (lax.approx_max_k) is exact on CPU: without tied scores it gives the exact votes."""
  rng = np.random.default_rng(11)
  num_views, batch, size, dim = 2, 16, 64, 8
  queries = rng.normal(size=(num_views, batch, dim)).astype(np.float32)
  emb = rng.normal(size=(num_views, size, dim)).astype(np.float32)
  lab = rng.integers(-1, NUM_CLASSES, size=(num_views, size)).astype(np.int32)
  for k in (1, 3):
    q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(lab), jnp.zeros((), jnp.int32))
    expected = ref_pseudo_labels(queries, emb, lab, k, NUM_CLASSES)
    fn = lambda x, q, k=k: knn.pseudo_labels(x, q, k=k, num_classes=NUM_CLASSES,
                                             approximate=True)
    for got in sharded_vs_unsharded(mesh, fn, (queries, q), (None, queue_sharding(mesh))):
      np.testing.assert_array_equal(got, expected)

    bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    q16 = q._replace(embeddings=jnp.asarray(emb, jnp.bfloat16))
    expected16 = ref_pseudo_labels(bf16(queries), bf16(emb), lab, k, NUM_CLASSES)
    fn = lambda x, q, k=k: knn.pseudo_labels(x, q, k=k, num_classes=NUM_CLASSES)
    for got in sharded_vs_unsharded(mesh, fn, (queries, q16), (None, queue_sharding(mesh))):
      np.testing.assert_array_equal(got, expected16)


@pytest.mark.slow
def test_pseudo_labels_ties_across_votes(mesh):
  """L = 2: four votes per image, each the one entry of a queue that its query sees best.

  Queue l holds, for image i, one entry per class on the image's own axis (similarity = the
  value there); view j of image i is e_i, so both views vote alike and votes come in pairs.
  """
  num_views, size, num_classes = 2, 16, 10
  # Per image: (queue 0 entry (label, sim), queue 1 entry (label, sim), expected), k = 1.
  cases = [
      ((1, 0.5), (2, 0.75), 2),   # 2 vs 2 votes: summed 1.0 vs 1.5 -> 2 (old rule: 1).
      ((6, 0.5), (4, 0.5), 4),    # Exact tie of the sums -> smallest label.
      ((3, 0.25), (3, 0.5), 3),   # Unanimous.
      ((9, 1.0), (0, 0.25), 9),   # 2 vs 2, the larger label has the larger similarity.
  ]
  batch = len(cases)
  dim = batch
  queries = np.broadcast_to(np.eye(batch, dim, dtype=np.float32),
                            (num_views, batch, dim)).copy()
  emb = np.zeros((2, size, dim), np.float32)
  lab = np.full((2, size), -1, np.int32)
  for i, entries in enumerate(cases):
    for l, (y, s) in enumerate(entries[:2]):
      slot = 4 * i + 2 * l + 1  # Scattered over shards.
      emb[l, slot, i], lab[l, slot] = s, y
  q = queue_lib.Queue(jnp.asarray(emb), jnp.asarray(lab), jnp.zeros((), jnp.int32))
  expected = [want for *_, want in cases]
  assert ref_pseudo_labels(queries, emb, lab, 1, num_classes).tolist() == expected
  fn = pseudo_fn(1, num_classes)
  for got in sharded_vs_unsharded(mesh, fn, (queries, q), (None, queue_sharding(mesh))):
    np.testing.assert_array_equal(got, expected)

  # With k = 3 a vote's strength is the summed similarity of its winning class: queue 0 gives
  # image 0 two entries of class 1 (0.25 + 0.25 = 0.5) and one of class 7 (0.375): it votes 1
  # with strength 0.5, which loses to queue 1's class-2 votes of strength 0.75 (queue 1's two
  # other neighbours score 0). Slots 10 and 12 are free in the layout above.
  emb3, lab3 = emb.copy(), lab.copy()
  emb3[0, 1, 0], emb3[0, 10, 0], emb3[0, 12, 0] = 0.25, 0.25, 0.375
  lab3[0, 10], lab3[0, 12] = 1, 7
  q3 = queue_lib.Queue(jnp.asarray(emb3), jnp.asarray(lab3), jnp.zeros((), jnp.int32))
  got = jax.jit(pseudo_fn(3, num_classes))(queries, q3)
  np.testing.assert_array_equal(got, ref_pseudo_labels(queries, emb3, lab3, 3, num_classes))
  assert int(got[0]) == 2


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
@pytest.mark.slow
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
  with jax.set_mesh(mesh):
    compiled_vote = vote.lower(spec((batch, dim), jnp.float32, P()),
                               spec((size, dim), jnp.float32, P("data")),
                               spec((size,), jnp.int32, P("data"))).compile()
  full_scores = batch * size * 4
  assert compiled_vote.memory_analysis().temp_size_in_bytes < full_scores / 4
  assert not re.search(rf"\[[0-9,]*\b{size}\b", compiled_vote.as_text())


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
