"""kNN votes, pseudo-labels and evaluation kNN over (sharded) queues.

kNN votes, pseudo-labels and evaluation kNN go through one primitive, a sharded top-k over the
entries of a queue (or of an evaluation bank). Inside ``with jax.set_mesh(mesh)`` whose
``'data'`` axis has size ``n > 1`` — eagerly or under ``jax.jit`` — the entries are taken
sharded along their slot axis on ``'data'`` (``Q % n == 0``) and the queries replicated (a
batch-sharded query array is all-gathered, which is small next to the queue). In a
``jax.shard_map``:

1. every device scores the queries against its own ``Q / n`` entries (``[rows, Q / n]``: no
   device ever holds a score matrix over the full queue);
2. keeps its local top ``min(k, Q / n)`` (excluded entries score ``-inf``), scoring its slots
   in chunks (``chunk_size``, default :func:`auto_chunk_size`) with a running top-k, so only a
   ``[rows, chunk]`` score block is alive; for ``k = 1`` each chunk's best comes from one max
   reduction (no sort, no index block);
3. all-gathers those ``n · k`` candidates (scores, labels, global slot indices) and merges them
   with a second top-k; embeddings, when needed, are sent by the owning device only (a ``psum``
   of a ``[rows, k, D]`` block that is zero elsewhere), never all-gathered.

Without such a mesh the same scoring runs over all ``Q`` entries with a single top-k. Given the
same scores, both paths return identical results, bit for bit:

* ties between equal scores go to the lowest global slot index: ``lax.top_k`` puts the lower
  index first, and the merge sees the shards' candidates in shard order, i.e. in global slot
  order among equal scores;
* fewer than ``k`` eligible entries (or ``k > Q``, or ``k > Q / n``) only shortens the candidate
  list; missing entries come back with score ``-inf``, label ``-1``, index ``-1`` and a zero
  embedding, in both paths;
* the vote's tie-break sums similarities in a fixed order (nearest neighbour first) on the
  merged, replicated candidates, so it sees the same numbers in both paths (see
  :func:`knn_vote`).

The selection and merge logic is exact. What this module cannot pin down is the rounding of
the similarity scores themselves: they come from the backend's matmul of a ``[rows, chunk]``
block (a chunk of the ``Q / n`` slots of a device) instead of a ``[rows, Q]`` one, and a
compiler may round a dot product differently for different shapes. On XLA:CPU (jax 0.10.2)
scores are bit-identical for realistic shapes (D = 128 / 256, thousands of entries, chunks of
hundreds of slots or more) but not for some tiny ones (D <= 32, or 8 rows x 32 slots at
D = 128); where they differ, only entries whose similarities agree to the last bit or so can
change places. Comparisons should be eager vs eager or jit vs jit: XLA fuses the elementwise
tail (e.g. ``exp`` in :func:`weighted_knn_scores`) differently in the two modes.

Labels: ``-1`` marks an empty slot. Labels outside ``[0, num_classes)`` are treated as empty as
well (values of traced arrays cannot be checked); host-side numpy labels are checked and raise
``ValueError``; :func:`check_labels` does that check explicitly for any array.

Semantic-positive sampling from the same queues lives in :mod:`semppl_jax.semantic_positives`
(it shares :func:`check_queue` and :func:`positive_int`, the argument checks, with this module).
"""
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from semppl_jax.parallel import DATA_AXIS, ambient_data_axis_size
from semppl_jax.queue import Queue


class TopK(NamedTuple):
  """The ``k' = min(k, Q)`` best entries per row, best first (ties: lowest slot index first).

  Attributes:
    scores: float32 ``[..., R, k']``; ``-inf`` where fewer than ``k'`` entries were eligible.
    labels: int32 ``[..., R, k']``; the entries' labels, ``-1`` for missing entries.
    indices: int32 ``[..., R, k']``; global slot indices, ``-1`` for missing entries.
    embeddings: float ``[..., R, k', D]`` (zeros for missing entries), or ``None`` when not
      requested.
  """
  scores: jax.Array
  labels: jax.Array
  indices: jax.Array
  embeddings: Optional[jax.Array]


# score_fn(shared, group, keys [Ql, D], labels [Ql], slots [Ql]) -> float [R, Ql], -inf = skip.
ScoreFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def positive_int(value, name: str) -> int:
  """``value`` as an int; ``ValueError`` naming ``name`` unless it is a Python / numpy int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive Python integer, got {value!r}")
  return int(value)


def check_labels(labels, num_classes: int, *, name: str = "labels",
                 allow_empty: bool = True) -> None:
  """Host-side check that every label lies in ``[-1, num_classes)`` (or ``[0, num_classes)``).

  Args:
    labels: integer array-like of any shape (a ``jax.Array`` is copied to the host).
    num_classes: ``C >= 1``.
    name: the argument name used in the error message.
    allow_empty: whether ``-1`` (an empty slot / an unlabelled image) is allowed.

  Raises:
    ValueError: naming ``name`` and the allowed range, on a non-integer dtype or a bad value.
  """
  num_classes = positive_int(num_classes, "num_classes")
  values = np.asarray(labels)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {values.dtype}")
  low = -1 if allow_empty else 0
  bad = (values < low) | (values >= num_classes)
  if bad.any():
    raise ValueError(f"{name} must lie in [{low}, {num_classes}), got "
                     f"{values[bad].ravel()[:5].tolist()} (num_classes={num_classes})")


# Recall target of the approximate local top-k (``approximate=True``).
APPROX_RECALL = 0.95

# Budget of the exact local top-k's score block: a device scores its slots in chunks of ``C``
# slots, ``rows * C`` at most this many elements (256 MiB of float32), so the live block stays
# bounded whatever the queue size (see :func:`auto_chunk_size`).
CHUNK_ELEMENTS = 2**26


def auto_chunk_size(rows: int, local_size: int, k: int) -> int:
  """The default chunk: the most slots ``C`` dividing ``local_size`` with ``rows * C`` within
  :data:`CHUNK_ELEMENTS` (at least ``k`` slots); ``local_size`` (one chunk, no loop) when all
  of them fit, or when no divisor comes within 8x of that budget (e.g. a prime shard size:
  scoring it in tiny chunks would cost more than the bounded block saves)."""
  target = max(k, CHUNK_ELEMENTS // max(rows, 1))
  if local_size <= target:
    return local_size
  best = max(d for i in range(1, int(local_size**0.5) + 1) if local_size % i == 0
             for d in (i, local_size // i) if d <= target)
  return best if 8 * best >= target else local_size


def _max_and_position(scores):
  """Each row's largest score and its first position, in one pass over ``scores [R, C]``.

  A single variadic reduction of (score, position): unlike ``lax.top_k`` (a sort) it writes no
  ``[R, C]`` index block, and unlike ``argmax`` + a gather it reads the block once. Among equal
  scores the lowest position wins, as in ``lax.top_k``; a NaN counts as the largest score.
  Returns float ``[R]`` (the scores' dtype) and int32 ``[R]``.
  """
  def pick(a, b):
    (a_val, a_pos), (b_val, b_pos) = a, b
    a_nan, b_nan = a_val != a_val, b_val != b_val
    take_a = (a_nan & ~b_nan) | (a_val > b_val) | (
        ((a_val == b_val) | (a_nan & b_nan)) & (a_pos < b_pos))
    return lax.select(take_a, a_val, b_val), lax.select(take_a, a_pos, b_pos)

  positions = lax.broadcasted_iota(jnp.int32, scores.shape, 1)
  init = (jnp.array(-jnp.inf, scores.dtype), jnp.array(jnp.iinfo(jnp.int32).max, jnp.int32))
  return lax.reduce((scores, positions), init, pick, (1,))


def _local_top_k(score_fn: ScoreFn, shared, keys, labels, offset, k: int, with_embeddings: bool,
                 approximate: bool = False, chunk_size: Optional[int] = None):
  """Top-k of every group over one block of slots.

  Shapes: keys ``[G, Ql, D]``, labels ``[G, Ql]``; ``offset`` is the global index of local slot
  0; the rows ``R`` are axis 0 of ``shared``'s first leaf (the queries). ``approximate``:
  ``lax.approx_max_k`` over the whole block instead (see :func:`pseudo_labels`).

  Exact mode scores the slots in chunks of ``chunk_size`` (default :func:`auto_chunk_size`;
  it must divide ``Ql``) in a ``fori_loop`` that keeps each row's best ``min(k, Ql)`` so far:
  only one ``[R, chunk]`` score block is alive. A chunk's best come from ``lax.top_k``, or for
  ``k = 1`` from :func:`_max_and_position` (one reduction: no sort, no ``[R, chunk]`` index
  block); both put the lowest slot first among equal scores, and the merge puts the earlier chunks'
  (lower) slots first, so the result is that of one top-k over all ``Ql`` slots. Returns
  (scores, labels, global indices, embeddings or None), each ``[G, R, min(k, Ql)]``
  (embeddings ``[G, R, min(k, Ql), D]``).
  """
  num_groups, local_size, _ = keys.shape
  local_k = min(k, local_size)
  rows = jnp.shape(jax.tree.leaves(shared)[0])[0]
  if chunk_size is None:
    chunk = auto_chunk_size(rows, local_size, local_k)
  else:
    chunk = positive_int(chunk_size, "chunk_size")
    if local_size % chunk:
      raise ValueError(f"chunk_size={chunk} must divide the slots per device ({local_size})")
  num_chunks = local_size // chunk

  def chunk_best(group, keys_g, labels_g, start):
    """The best ``min(k, chunk)`` of the chunk at local slot ``start``: (scores, positions)."""
    keys_c = lax.dynamic_slice_in_dim(keys_g, start, chunk)
    labels_c = lax.dynamic_slice_in_dim(labels_g, start, chunk)
    slots_c = offset + start + jnp.arange(chunk, dtype=jnp.int32)
    scores = score_fn(shared, group, keys_c, labels_c, slots_c).astype(jnp.float32)
    if local_k == 1:
      values, positions = _max_and_position(scores)
      values, positions = values[:, None], positions[:, None]
    else:
      values, positions = lax.top_k(scores, min(local_k, chunk))
    return values, start + positions

  def merge(best, new):
    if local_k == 1:  # Strictly better only: an equal score keeps the earlier (lower) slot.
      better = (new[0] > best[0]) | (jnp.isnan(new[0]) & ~jnp.isnan(best[0]))
      return tuple(jnp.where(better, n, b) for n, b in zip(new, best))
    # The kept entries precede the chunk's, and top_k puts the first of equal scores first.
    values, positions = (jnp.concatenate(pair, axis=1) for pair in zip(best, new))
    values, sel = lax.top_k(values, local_k)
    return values, jnp.take_along_axis(positions, sel, axis=1)

  def one_group(args):
    group, keys_g, labels_g = args
    slots = offset + jnp.arange(local_size, dtype=jnp.int32)
    if approximate:
      scores = score_fn(shared, group, keys_g, labels_g, slots).astype(jnp.float32)
      values, positions = lax.approx_max_k(scores, local_k, recall_target=APPROX_RECALL)
    elif num_chunks == 1:
      values, positions = chunk_best(group, keys_g, labels_g, 0)
    else:
      init = (jnp.full((rows, local_k), -jnp.inf, jnp.float32),
              jnp.zeros((rows, local_k), jnp.int32))
      values, positions = lax.fori_loop(
          0, num_chunks,
          lambda i, best: merge(best, chunk_best(group, keys_g, labels_g, i * chunk)), init)
    found = values > -jnp.inf
    out = (values,
           jnp.where(found, labels_g[positions], -1),
           jnp.where(found, slots[positions], -1))
    if with_embeddings:
      out += (jnp.where(found[..., None], keys_g[positions], 0).astype(keys_g.dtype),)
    return out

  groups = jnp.arange(num_groups, dtype=jnp.int32)
  if num_groups == 1:
    out = jax.tree.map(lambda x: x[None], one_group((groups[0], keys[0], labels[0])))
  else:
    # lax.map, not vmap: only one group's score block is alive at a time.
    out = lax.map(one_group, (groups, keys, labels))
  return out if with_embeddings else out + (None,)


def _sharded_top_k(score_fn: ScoreFn, shared, keys, labels, *, k: int,
                   with_embeddings: bool, approximate: bool = False,
                   chunk_size: Optional[int] = None) -> TopK:
  """The one top-k primitive: per group, the k best-scoring entries of a (sharded) queue.

  Args:
    score_fn: ``score_fn(shared, group, keys [Ql, D], labels [Ql], slots [Ql]) -> [R, Ql]``,
      ``-inf`` for entries that must not be returned; ``slots`` are global slot indices. Must
      score each entry independently of the others (so sharding cannot change a score).
    shared: pytree of arrays replicated to every device (queries, keys, ...).
    keys: ``[G, Q, D]`` entries (sharded along ``Q`` under a mesh).
    labels: int ``[G, Q]`` entry labels.
    k: number of entries per row, ``>= 1`` (clamped to ``Q``).
    with_embeddings: also return the entries' embeddings.
    approximate: each device's top-k over its own entries is ``lax.approx_max_k`` (the merge
      stays exact).
    chunk_size: slots scored at a time on each device in exact mode (must divide ``Q / n``);
      ``None``: :func:`auto_chunk_size`. The result does not depend on it (see
      :func:`_local_top_k`).

  Returns:
    :class:`TopK` with leading ``[G, R]`` axes, replicated.
  """
  num_groups, size, _ = keys.shape
  k_eff = min(k, size)
  shards = ambient_data_axis_size()
  if shards == 1:
    values, labs, idx, emb = _local_top_k(score_fn, shared, keys, labels, 0, k_eff,
                                          with_embeddings, approximate, chunk_size)
    return TopK(values, labs, idx, emb)
  if size % shards:
    raise ValueError(f"queue size Q={size} must be a multiple of the mesh's 'data' axis size "
                     f"{shards}")
  local_size = size // shards
  local_k = min(k, local_size)

  def body(shared, keys, labels):
    me = lax.axis_index(DATA_AXIS)
    values, labs, idx, emb = _local_top_k(
        score_fn, shared, keys, labels, me * local_size, k, with_embeddings, approximate,
        chunk_size)
    # Shard-major concatenation: among equal scores, candidates stay in global slot order.
    gather = lambda x: lax.all_gather(x, DATA_AXIS, axis=2, tiled=True)
    all_values, all_labels, all_idx = gather(values), gather(labs), gather(idx)
    top_values, sel = lax.top_k(all_values, k_eff)
    top_labels = jnp.take_along_axis(all_labels, sel, axis=-1)
    top_idx = jnp.take_along_axis(all_idx, sel, axis=-1)
    top_emb = None
    if with_embeddings:
      mine = (sel // local_k) == me
      own = jnp.take_along_axis(emb, (sel % local_k)[..., None], axis=2)
      # Exactly one device contributes each entry and the others add zeros. Summing the bit
      # patterns as integers keeps every bit (a float sum would turn -0.0 into 0.0).
      int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[emb.dtype.itemsize]
      own_bits = jnp.where(mine[..., None], lax.bitcast_convert_type(own, int_type), 0)
      top_emb = lax.bitcast_convert_type(lax.psum(own_bits, DATA_AXIS), emb.dtype)
    return TopK(top_values, top_labels, top_idx, top_emb)

  slots = P(None, DATA_AXIS)
  return jax.shard_map(
      body,
      mesh=jax.sharding.get_abstract_mesh(),
      in_specs=(P(), slots, slots),
      out_specs=P(),
      check_vma=False,
  )(shared, keys, labels)


def _check_entries(queries, embeddings, labels, *, entries: str, labels_name: str):
  if jnp.ndim(queries) != 2:
    raise ValueError(f"queries must have shape [B, D], got {jnp.shape(queries)}")
  if jnp.ndim(embeddings) != 2 or jnp.shape(embeddings)[1] != jnp.shape(queries)[1]:
    raise ValueError(f"{entries} must have shape [Q, D={jnp.shape(queries)[1]}] (D as in "
                     f"queries), got {jnp.shape(embeddings)}")
  if jnp.shape(labels) != jnp.shape(embeddings)[:1]:
    raise ValueError(f"{labels_name} must have shape [Q={jnp.shape(embeddings)[0]}], got "
                     f"{jnp.shape(labels)}")


def _dot_scores(num_classes: Optional[int]) -> ScoreFn:
  """Dot-product scores; entries whose label is outside [0, num_classes) are excluded.

  Scores are accumulated in float32. A bfloat16 queue is scored with bfloat16 queries (one
  bf16 matmul, no float32 copy of the entries); float32 entries are scored as they are.
  """
  def score_fn(queries, group, keys, labels, slots):
    del group, slots
    valid = labels >= 0
    if num_classes is not None:
      valid &= labels < num_classes
    if keys.dtype == jnp.bfloat16:
      queries = queries.astype(jnp.bfloat16)
    scores = jnp.einsum("rd,qd->rq", queries, keys, preferred_element_type=jnp.float32)
    return jnp.where(valid[None, :], scores, -jnp.inf)
  return score_fn


def _vote(labels, similarities):
  """Majority label along the last axis; ties by the largest summed similarity, then label.

  Each position ``m`` is one ballot with label ``labels[..., m]`` (``< 0``: no ballot) and weight
  ``similarities[..., m]``. The winner is the label with the most ballots; among labels with
  equally many, the one whose ballots' weights sum highest; among those (an exact float tie),
  the smallest label. Works in ``O(M^2)`` per row without any ``[..., num_classes]`` array.

  The weights of a label are summed one ballot at a time in position order (``m = 0, 1, ...``)
  in a ``fori_loop``: a reduction could be split into partial sums differently for different
  shapes or shardings, which could turn an exact tie into a 1-ulp difference in one path only.

  Args:
    labels: int32 ``[..., M]``.
    similarities: float32 ``[..., M]``.

  Returns:
    ``(label, summed_similarity)``: int32 ``[...]``, ``-1`` where no position holds a ballot,
    and float32 ``[...]``, the winner's summed weight (``0`` where there is no winner).
  """
  similarities = similarities.astype(jnp.float32)
  valid = labels >= 0
  num = labels.shape[-1]

  def add_ballot(m, carry):
    count, summed = carry
    label_m = lax.dynamic_index_in_dim(labels, m, axis=-1, keepdims=True)
    sim_m = lax.dynamic_index_in_dim(similarities, m, axis=-1, keepdims=True)
    same = (labels == label_m) & (label_m >= 0)
    return count + same.astype(jnp.int32), summed + jnp.where(same, sim_m, 0.0)

  count, summed = lax.fori_loop(
      0, num, add_ballot,
      (jnp.zeros(labels.shape, jnp.int32), jnp.zeros(labels.shape, jnp.float32)))
  # Lexicographic argmax over the ballots of (count, summed similarity, -label).
  best = valid & (count == jnp.max(jnp.where(valid, count, 0), axis=-1, keepdims=True))
  best_sum = jnp.max(jnp.where(best, summed, -jnp.inf), axis=-1, keepdims=True)
  best &= summed == best_sum
  no_label = jnp.iinfo(jnp.int32).max
  winner = jnp.min(jnp.where(best, labels, no_label), axis=-1)
  found = valid.any(axis=-1)
  return (jnp.where(found, winner, -1).astype(jnp.int32),
          jnp.where(found, best_sum[..., 0], 0.0))


def top_k_entries(queries, keys, key_labels, *, k: int, return_embeddings: bool = False,
                  chunk_size: Optional[int] = None) -> TopK:
  """The ``k`` non-empty entries with the largest dot product with each query.

  Args:
    queries: float ``[B, D]``.
    keys: float ``[Q, D]`` (sharded along ``Q`` on ``'data'`` under a mesh, see module doc).
    key_labels: int ``[Q]``, ``-1`` (any negative value) = empty slot, never returned.
    k: entries per query, ``>= 1``; clamped to ``Q``.
    return_embeddings: also return the entries' embeddings.
    chunk_size: slots scored at a time per device (must divide the slots per device);
      ``None``: :func:`auto_chunk_size`. Bounds the live ``[rows, chunk]`` score block; the
      result does not depend on it.

  Returns:
    :class:`TopK` with ``scores``, ``labels``, ``indices`` ``[B, min(k, Q)]`` and
    ``embeddings`` ``[B, min(k, Q), D]`` or ``None``.
  """
  _check_entries(queries, keys, key_labels, entries="keys", labels_name="key_labels")
  k = positive_int(k, "k")
  top = _sharded_top_k(_dot_scores(None), jnp.asarray(queries), jnp.asarray(keys)[None],
                       jnp.asarray(key_labels, jnp.int32)[None], k=k,
                       with_embeddings=return_embeddings, chunk_size=chunk_size)
  return jax.tree.map(lambda x: x[0], top)


def knn_vote(queries, queue_embeddings, queue_labels, *, k: int, num_classes: int,
             chunk_size: Optional[int] = None):
  """Majority label of the ``k`` most similar valid queue entries of every query.

  Similarity is the dot product: the caller l2-normalises queries and queue entries (the queue
  holds normalised target projections), so it is the cosine similarity.

  Tie rule: among the labels with the most neighbours, the one whose neighbours' similarities
  sum highest wins (summed in order of rank, nearest first, in float32); an exact float tie of
  those sums goes to the smallest label. Hence ``k`` neighbours with all-distinct labels return
  the nearest neighbour's label, and ``k = 1`` is the plain nearest neighbour. Which entries
  are the ``k`` nearest is decided by the top-k (equal scores: lowest slot index first).

  Args:
    queries: float ``[B, D]``.
    queue_embeddings: float ``[Q, D]`` (sharded along ``Q`` on ``'data'`` under a mesh).
    queue_labels: int ``[Q]``; ``-1`` = empty; labels outside ``[0, num_classes)`` are treated
      as empty (numpy labels are checked and raise instead).
    k: neighbours per query, ``>= 1``; with fewer than ``k`` valid entries the vote is among
      those.
    num_classes: ``C >= 1``.
    chunk_size: slots scored at a time per device (must divide the slots per device);
      ``None``: :func:`auto_chunk_size`. Bounds the live ``[rows, chunk]`` score block; the
      result does not depend on it.

  Returns:
    int32 ``[B]``: the majority label (ties as above), ``-1`` if no entry is valid.
  """
  _check_entries(queries, queue_embeddings, queue_labels, entries="queue_embeddings",
                 labels_name="queue_labels")
  k = positive_int(k, "k")
  num_classes = positive_int(num_classes, "num_classes")
  if isinstance(queue_labels, np.ndarray):
    check_labels(queue_labels, num_classes, name="queue_labels")
  top = _sharded_top_k(_dot_scores(num_classes), jnp.asarray(queries),
                       jnp.asarray(queue_embeddings)[None],
                       jnp.asarray(queue_labels, jnp.int32)[None], k=k, with_embeddings=False,
                       chunk_size=chunk_size)
  return _vote(top.labels[0], top.scores[0])[0]


def check_queue(queue: Queue, dim: Optional[int] = None):
  """Raises ``ValueError`` unless ``queue`` holds ``[L, Q, D]`` embeddings, ``[L, Q]`` labels.

  ``dim``, if given, is the ``D`` the embeddings must have (that of the queries).
  """
  if jnp.ndim(queue.embeddings) != 3:
    raise ValueError(f"queue.embeddings must have shape [L, Q, D], got "
                     f"{jnp.shape(queue.embeddings)}")
  if jnp.shape(queue.labels) != jnp.shape(queue.embeddings)[:2]:
    raise ValueError(f"queue.labels must have shape {jnp.shape(queue.embeddings)[:2]}, got "
                     f"{jnp.shape(queue.labels)}")
  if dim is not None and jnp.shape(queue.embeddings)[2] != dim:
    raise ValueError(f"queue.embeddings must have D={dim} (as in the queries), got "
                     f"{jnp.shape(queue.embeddings)}")


def pseudo_labels(queries, queue: Queue, *, k: int, num_classes: int,
                  min_agreement: float = 0.0, approximate: bool = False,
                  chunk_size: Optional[int] = None):
  """Pseudo-labels: majority over the kNN votes of every (online large view, queue) pair.

  For each image ``i``, each view ``j`` (``queries[j, i]``) and each queue ``l``, the vote is
  :func:`knn_vote` of ``queries[j, i]`` against queue ``l``; the ``L × L`` votes are combined by
  majority. Use the queues as they were before this step's enqueue.

  The *strength* of a vote for label ``c`` is the sum of the similarities of the neighbours of
  class ``c`` among that vote's ``k`` neighbours (the quantity that broke ties inside the vote;
  for ``k = 1`` the nearest neighbour's similarity). Combining the votes: the label with the
  most votes wins; among labels with equally many votes, the one whose votes' strengths sum
  highest, i.e. the largest sum of the similarities of all neighbours of that class within the
  votes won by it; an exact float tie goes to the smallest label. Strengths are summed in float32
  in the fixed order queue ``l`` major, view ``j`` minor. Votes of ``-1`` (no valid entry) count
  for nothing.

  Args:
    queries: float ``[L, B, D]``, l2-normalised online projections of the large views.
    queue: a :class:`~semppl_jax.queue.Queue` with ``L`` queues ``[L, Q, D]`` (sharded along
      ``Q`` on ``'data'`` under a mesh).
    k: neighbours per vote, ``>= 1``.
    num_classes: ``C >= 1``.
    min_agreement: in ``[0, 1]``; an image whose winning label holds less than this share of
      its valid votes gets ``-1`` (no pseudo-label). ``1.0`` keeps only unanimous images.
    approximate: each device's top-k over its queue shard is ``lax.approx_max_k`` (recall
      target :data:`APPROX_RECALL`): on TPU a top-k fused with the scoring matmul, which never
      writes the ``[L·B, Q / n]`` score block to memory. Not exact there (a missed neighbour
      changes a vote), and ties are not broken by slot index, so sharded and unsharded calls
      may differ where scores tie. On CPU and GPU ``approx_max_k`` computes the exact top-k
      values (callers that want the exact path everywhere but on TPU pass
      ``approximate=jax.default_backend() == 'tpu'``).
    chunk_size: exact mode: queue slots scored at a time per device (must divide ``Q / n``);
      ``None``: :func:`auto_chunk_size`. Bounds the live ``[L·B, chunk]`` score block; the
      result does not depend on it. ``k = 1`` keeps each row's best by a max reduction (no
      sort, no index block).

  Returns:
    int32 ``[B]``: the combined vote (ties as above; ``-1`` if every vote is ``-1``, e.g.
    when all queues are empty, or if the winner's share of the votes is below
    ``min_agreement``).
  """
  if not 0.0 <= min_agreement <= 1.0:
    raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
  if jnp.ndim(queries) != 3:
    raise ValueError(f"queries must have shape [L, B, D], got {jnp.shape(queries)}")
  num_views, batch, dim = jnp.shape(queries)
  check_queue(queue, dim)
  k = positive_int(k, "k")
  num_classes = positive_int(num_classes, "num_classes")
  if isinstance(queue.labels, np.ndarray):
    check_labels(queue.labels, num_classes, name="queue.labels")
  flat = jnp.asarray(queries).reshape(num_views * batch, dim)
  top = _sharded_top_k(_dot_scores(num_classes), flat, jnp.asarray(queue.embeddings),
                       jnp.asarray(queue.labels, jnp.int32), k=k, with_embeddings=False,
                       approximate=approximate, chunk_size=chunk_size)
  votes, strengths = _vote(top.labels, top.scores)  # [L_queue, L_view * B] each.
  # Ballot axis last, ordered queue-major then view: [B, L_queue * L_view].
  to_ballots = lambda x: x.reshape(-1, num_views, batch).reshape(-1, batch).T
  ballots = to_ballots(votes)
  winner = _vote(ballots, to_ballots(strengths))[0]
  if min_agreement > 0.0:
    # Integer comparison (agree >= min_agreement * valid) would round differently on devices.
    agree = jnp.sum((ballots == winner[:, None]) & (ballots >= 0), axis=1).astype(jnp.float32)
    valid = jnp.sum(ballots >= 0, axis=1).astype(jnp.float32)
    winner = jnp.where(agree >= min_agreement * valid, winner, -1)
  return winner


def _norms(x, eps: float = 1e-12):
  """Row norms ``[..., 1]`` of float32 ``x [..., D]``, at least ``eps``.

  The barrier keeps XLA from turning ``y / sqrt(s)`` into ``y * rsqrt(s)``, whose approximation
  rounds differently for different block shapes on XLA:CPU (sharded would then differ from
  unsharded); sqrt and division are correctly rounded.
  """
  return lax.optimization_barrier(
      jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps)))


def _l2_normalize(x):
  x = x.astype(jnp.float32)
  return x / _norms(x)


def weighted_knn_scores(queries, bank_embeddings, bank_labels, *, k: int, num_classes: int,
                        temperature: float, chunk_size: Optional[int] = None):
  """Evaluation kNN: temperature-weighted cosine votes of the ``k`` nearest bank entries.

  ``scores[i, c] = sum over the k nearest valid entries e with label c of exp(cos(q_i, e) / τ)``;
  ``argmax`` over ``c`` is the prediction. Queries and bank entries are l2-normalised here.

  Args:
    queries: float ``[B, D]``.
    bank_embeddings: float ``[M, D]`` (sharded along ``M`` on ``'data'`` under a mesh; pad
      ``M`` to a multiple of the device count with label ``-1``).
    bank_labels: int ``[M]``; ``-1`` (padding) and labels outside ``[0, num_classes)`` are
      ignored (numpy labels are checked and raise instead).
    k: neighbours, ``>= 1`` (fewer valid entries: only those vote).
    num_classes: ``C >= 1``.
    temperature: ``τ > 0``.
    chunk_size: slots scored at a time per device (must divide the slots per device);
      ``None``: :func:`auto_chunk_size`. Bounds the live ``[rows, chunk]`` score block; the
      result does not depend on it.

  Returns:
    float32 ``[B, C]``; all zeros for a query when the bank has no valid entry.
  """
  _check_entries(queries, bank_embeddings, bank_labels, entries="bank_embeddings",
                 labels_name="bank_labels")
  k = positive_int(k, "k")
  num_classes = positive_int(num_classes, "num_classes")
  if not float(temperature) > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  if isinstance(bank_labels, np.ndarray):
    check_labels(bank_labels, num_classes, name="bank_labels")
  dot = _dot_scores(num_classes)

  def cosine(queries, group, keys, labels, slots):
    # Scores divided by the entries' norms (mathematically the cosine): avoids a fused
    # row-normalisation of the block, whose rounding on XLA:CPU depends on the block shape.
    keys = keys.astype(jnp.float32)
    return dot(queries, group, keys, labels, slots) / _norms(keys)[:, 0][None, :]

  top = _sharded_top_k(cosine, _l2_normalize(jnp.asarray(queries)),
                       jnp.asarray(bank_embeddings)[None],
                       jnp.asarray(bank_labels, jnp.int32)[None], k=k, with_embeddings=False,
                       chunk_size=chunk_size)
  sims, labels = top.scores[0], top.labels[0]
  weights = jnp.where(labels >= 0, jnp.exp(sims / temperature), 0.0)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.sum(weights[..., None] * one_hot, axis=-2)
