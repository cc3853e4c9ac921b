"""kNN votes, pseudo-labels and semantic-positive sampling over (sharded) queues.

Everything here goes through one primitive, a sharded top-k over the entries of a queue (or of an
evaluation bank). Inside ``with jax.set_mesh(mesh)`` whose ``'data'`` axis has size ``n > 1`` —
eagerly or under ``jax.jit`` — the entries are taken sharded along their slot axis on ``'data'``
(``Q % n == 0``) and the queries replicated (a batch-sharded query array is all-gathered, which
is small next to the queue). In a ``jax.shard_map``:

1. every device scores the queries against its own ``Q / n`` entries (``[rows, Q / n]``: no
   device ever holds a score matrix over the full queue);
2. keeps its local top ``min(k, Q / n)`` (excluded entries score ``-inf``);
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
* the random scores used for sampling are a function of the global slot index, not of the shard
  (see :func:`sample_semantic_positives`).

The selection and merge logic is exact. What this module cannot pin down is the rounding of
the similarity scores themselves: they come from the backend's matmul of a ``[rows, Q / n]``
block instead of a ``[rows, Q]`` one, and a compiler may round a dot product differently for
different shapes. On XLA:CPU (jax 0.10.2) scores are bit-identical for realistic shapes
(D = 128 / 256, thousands of entries) but not for some tiny ones (D <= 32); where they differ,
only entries whose similarities agree to the last bit or so can change places. Sampling does no
arithmetic on the entries and is always identical. Comparisons should be eager vs eager or jit
vs jit: XLA fuses the elementwise tail (e.g. ``exp`` in :func:`weighted_knn_scores`) differently
in the two modes.

Labels: ``-1`` marks an empty slot. Labels outside ``[0, num_classes)`` are treated as empty as
well (values of traced arrays cannot be checked); host-side numpy labels are checked and raise
``ValueError``; :func:`check_labels` does that check explicitly for any array.
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


def _positive_int(value, name: str) -> int:
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
  num_classes = _positive_int(num_classes, "num_classes")
  values = np.asarray(labels)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array, got dtype {values.dtype}")
  low = -1 if allow_empty else 0
  bad = (values < low) | (values >= num_classes)
  if bad.any():
    raise ValueError(f"{name} must lie in [{low}, {num_classes}), got "
                     f"{values[bad].ravel()[:5].tolist()} (num_classes={num_classes})")


def _local_top_k(score_fn: ScoreFn, shared, keys, labels, offset, k: int, with_embeddings: bool):
  """Top-k of every group over one block of slots.

  Shapes: keys ``[G, Ql, D]``, labels ``[G, Ql]``; ``offset`` is the global index of local slot
  0. Returns (scores, labels, global indices, embeddings or None), each ``[G, R, min(k, Ql)]``
  (embeddings ``[G, R, min(k, Ql), D]``).
  """
  num_groups, local_size, _ = keys.shape
  slots = offset + jnp.arange(local_size, dtype=jnp.int32)
  local_k = min(k, local_size)

  def one_group(args):
    group, keys_g, labels_g = args
    scores = score_fn(shared, group, keys_g, labels_g, slots).astype(jnp.float32)
    values, positions = lax.top_k(scores, local_k)
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
    # lax.map, not vmap: only one group's [R, Ql] score block is alive at a time.
    out = lax.map(one_group, (groups, keys, labels))
  return out if with_embeddings else out + (None,)


def _sharded_top_k(score_fn: ScoreFn, shared, keys, labels, *, k: int,
                   with_embeddings: bool) -> TopK:
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

  Returns:
    :class:`TopK` with leading ``[G, R]`` axes, replicated.
  """
  num_groups, size, _ = keys.shape
  k_eff = min(k, size)
  shards = ambient_data_axis_size()
  if shards == 1:
    values, labs, idx, emb = _local_top_k(score_fn, shared, keys, labels, 0, k_eff,
                                          with_embeddings)
    return TopK(values, labs, idx, emb)
  if size % shards:
    raise ValueError(f"queue size Q={size} must be a multiple of the mesh's 'data' axis size "
                     f"{shards}")
  local_size = size // shards
  local_k = min(k, local_size)

  def body(shared, keys, labels):
    me = lax.axis_index(DATA_AXIS)
    values, labs, idx, emb = _local_top_k(
        score_fn, shared, keys, labels, me * local_size, k, with_embeddings)
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
  """Dot-product scores; entries whose label is outside [0, num_classes) are excluded."""
  def score_fn(queries, group, keys, labels, slots):
    del group, slots
    valid = labels >= 0
    if num_classes is not None:
      valid &= labels < num_classes
    scores = jnp.einsum("rd,qd->rq", queries, keys, preferred_element_type=jnp.float32)
    return jnp.where(valid[None, :], scores, -jnp.inf)
  return score_fn


def _majority(labels, num_classes: int):
  """Most frequent label along the last axis, ignoring -1 (ties -> smallest; -1 if none)."""
  counts = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32).sum(axis=-2)
  return jnp.where(counts.max(axis=-1) > 0, jnp.argmax(counts, axis=-1), -1).astype(jnp.int32)


def top_k_entries(queries, keys, key_labels, *, k: int,
                  return_embeddings: bool = False) -> TopK:
  """The ``k`` non-empty entries with the largest dot product with each query.

  Args:
    queries: float ``[B, D]``.
    keys: float ``[Q, D]`` (sharded along ``Q`` on ``'data'`` under a mesh, see module doc).
    key_labels: int ``[Q]``, ``-1`` (any negative value) = empty slot, never returned.
    k: entries per query, ``>= 1``; clamped to ``Q``.
    return_embeddings: also return the entries' embeddings.

  Returns:
    :class:`TopK` with ``scores``, ``labels``, ``indices`` ``[B, min(k, Q)]`` and
    ``embeddings`` ``[B, min(k, Q), D]`` or ``None``.
  """
  _check_entries(queries, keys, key_labels, entries="keys", labels_name="key_labels")
  k = _positive_int(k, "k")
  top = _sharded_top_k(_dot_scores(None), jnp.asarray(queries), jnp.asarray(keys)[None],
                       jnp.asarray(key_labels, jnp.int32)[None], k=k,
                       with_embeddings=return_embeddings)
  return jax.tree.map(lambda x: x[0], top)


def knn_vote(queries, queue_embeddings, queue_labels, *, k: int, num_classes: int):
  """Majority label of the ``k`` most similar valid queue entries of every query.

  Similarity is the dot product: the caller l2-normalises queries and queue entries (the queue
  holds normalised target projections), so it is the cosine similarity.

  Args:
    queries: float ``[B, D]``.
    queue_embeddings: float ``[Q, D]`` (sharded along ``Q`` on ``'data'`` under a mesh).
    queue_labels: int ``[Q]``; ``-1`` = empty; labels outside ``[0, num_classes)`` are treated
      as empty (numpy labels are checked and raise instead).
    k: neighbours per query, ``>= 1``; with fewer than ``k`` valid entries the vote is among
      those.
    num_classes: ``C >= 1``.

  Returns:
    int32 ``[B]``: the majority label (ties -> smallest label), ``-1`` if no entry is valid.
  """
  _check_entries(queries, queue_embeddings, queue_labels, entries="queue_embeddings",
                 labels_name="queue_labels")
  k = _positive_int(k, "k")
  num_classes = _positive_int(num_classes, "num_classes")
  if isinstance(queue_labels, np.ndarray):
    check_labels(queue_labels, num_classes, name="queue_labels")
  top = _sharded_top_k(_dot_scores(num_classes), jnp.asarray(queries),
                       jnp.asarray(queue_embeddings)[None],
                       jnp.asarray(queue_labels, jnp.int32)[None], k=k, with_embeddings=False)
  return _majority(top.labels[0], num_classes)


def _check_queue(queue: Queue, dim: Optional[int] = None):
  if jnp.ndim(queue.embeddings) != 3:
    raise ValueError(f"queue.embeddings must have shape [L, Q, D], got "
                     f"{jnp.shape(queue.embeddings)}")
  if jnp.shape(queue.labels) != jnp.shape(queue.embeddings)[:2]:
    raise ValueError(f"queue.labels must have shape {jnp.shape(queue.embeddings)[:2]}, got "
                     f"{jnp.shape(queue.labels)}")
  if dim is not None and jnp.shape(queue.embeddings)[2] != dim:
    raise ValueError(f"queue.embeddings must have D={dim} (as in the queries), got "
                     f"{jnp.shape(queue.embeddings)}")


def pseudo_labels(queries, queue: Queue, *, k: int, num_classes: int):
  """Pseudo-labels: majority over the kNN votes of every (online large view, queue) pair.

  For each image ``i``, each view ``j`` (``queries[j, i]``) and each queue ``l``, the vote is
  :func:`knn_vote` of ``queries[j, i]`` against queue ``l``; the ``L × L`` votes are combined by
  majority. Use the queues as they were before this step's enqueue.

  Args:
    queries: float ``[L, B, D]``, l2-normalised online projections of the large views.
    queue: a :class:`~semppl_jax.queue.Queue` with ``L`` queues ``[L, Q, D]`` (sharded along
      ``Q`` on ``'data'`` under a mesh).
    k: neighbours per vote, ``>= 1``.
    num_classes: ``C >= 1``.

  Returns:
    int32 ``[B]``: the majority vote (ties -> smallest label; votes of ``-1`` are ignored;
    ``-1`` only if every vote is ``-1``, e.g. when all queues are empty).
  """
  if jnp.ndim(queries) != 3:
    raise ValueError(f"queries must have shape [L, B, D], got {jnp.shape(queries)}")
  num_views, batch, dim = jnp.shape(queries)
  _check_queue(queue, dim)
  k = _positive_int(k, "k")
  num_classes = _positive_int(num_classes, "num_classes")
  if isinstance(queue.labels, np.ndarray):
    check_labels(queue.labels, num_classes, name="queue.labels")
  flat = jnp.asarray(queries).reshape(num_views * batch, dim)
  top = _sharded_top_k(_dot_scores(num_classes), flat, jnp.asarray(queue.embeddings),
                       jnp.asarray(queue.labels, jnp.int32), k=k, with_embeddings=False)
  votes = _majority(top.labels, num_classes)  # [L_queue, L_view * B]
  votes = votes.reshape(-1, num_views, batch).reshape(-1, batch)
  return _majority(votes.T, num_classes)


def _sampling_scores(num_positives: int) -> ScoreFn:
  """Random scores at label-matched entries, -inf elsewhere; a function of the global slot.

  ``noise[l, n, i, q] = float32(bits(fold_in(fold_in(key, l), q), (N, B))[n, i] >> 8)``: one
  key per (queue, global slot) and a fixed shape, so a device generates exactly the values of
  its own slots whatever the sharding. Integer-valued (< 2^24), hence exact in float32: no
  transcendental function whose rounding could depend on the shape.
  """
  def score_fn(shared, group, keys, labels, slots):
    del keys
    key, targets = shared
    batch = targets.shape[0]
    group_key = jax.random.fold_in(key, group)
    slot_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(group_key, slots)
    bits = jax.vmap(lambda kq: jax.random.bits(kq, (num_positives, batch), jnp.uint32),
                    out_axes=-1)(slot_keys)  # [N, B, Ql]
    noise = (bits >> 8).astype(jnp.float32)
    match = (labels[None, :] == targets[:, None]) & (targets[:, None] >= 0)  # [B, Ql]
    return jnp.where(match[None], noise, -jnp.inf).reshape(num_positives * batch, -1)
  return score_fn


def sample_semantic_positives(key, labels, queue: Queue, num_positives: int):
  """Draws semantic positives: queue entries that share each image's (pseudo-)label.

  For each queue ``l``, draw ``n`` and image ``i``, one entry of queue ``l`` is chosen uniformly
  at random among the non-empty entries whose label equals ``labels[i]``, by Gumbel-max through
  the sharded top-k with ``k = 1``: score = iid noise on matched entries, ``-inf`` elsewhere.
  With equal weights Gumbel-max is the argmax of *any* iid continuous noise, so the noise is
  uniform random integers below 2^24 (exact in float32) rather than Gumbel variates; two
  matched entries tie for the maximum with probability below ``m / 2^24`` for ``m`` matches
  (then the lower slot wins), a negligible bias.

  The noise of entry ``q`` of queue ``l`` for draw ``n`` and image ``i`` is element ``[n, i]`` of
  ``jax.random.bits(fold_in(fold_in(key, l), q), (N, B)) >> 8`` with ``q`` the *global* slot
  index: each device generates the noise of its own slots only, and the draws are identical,
  bit for bit, whether the queue is sharded (over any number of devices) or not, eagerly or
  under jit. Draws for different ``(l, n, i)`` are independent.

  Args:
    key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); use a fresh one per step.
    labels: int ``[B]``, the images' labels / pseudo-labels; ``-1`` = no label, never matched.
    queue: a :class:`~semppl_jax.queue.Queue` ``[L, Q, D]`` (sharded along ``Q`` on ``'data'``
      under a mesh).
    num_positives: ``N >= 1``, draws per image and queue.

  Returns:
    ``(embeddings, valid)``: float ``[L, N, B, D]`` in the queue's dtype (zeros where invalid)
    and bool ``[L, N, B]``, ``False`` where no entry of queue ``l`` matches ``labels[i]``.
  """
  _check_queue(queue)
  if jnp.ndim(labels) != 1:
    raise ValueError(f"labels must have shape [B], got {jnp.shape(labels)}")
  num_positives = _positive_int(num_positives, "num_positives")
  num_queues, _, dim = jnp.shape(queue.embeddings)
  batch = jnp.shape(labels)[0]
  top = _sharded_top_k(_sampling_scores(num_positives), (key, jnp.asarray(labels, jnp.int32)),
                       jnp.asarray(queue.embeddings), jnp.asarray(queue.labels, jnp.int32),
                       k=1, with_embeddings=True)
  embeddings = top.embeddings[:, :, 0].reshape(num_queues, num_positives, batch, dim)
  valid = (top.scores[:, :, 0] > -jnp.inf).reshape(num_queues, num_positives, batch)
  return embeddings, valid


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
                        temperature: float):
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

  Returns:
    float32 ``[B, C]``; all zeros for a query when the bank has no valid entry.
  """
  _check_entries(queries, bank_embeddings, bank_labels, entries="bank_embeddings",
                 labels_name="bank_labels")
  k = _positive_int(k, "k")
  num_classes = _positive_int(num_classes, "num_classes")
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
                       jnp.asarray(bank_labels, jnp.int32)[None], k=k, with_embeddings=False)
  sims, labels = top.scores[0], top.labels[0]
  weights = jnp.where(labels >= 0, jnp.exp(sims / temperature), 0.0)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return jnp.sum(weights[..., None] * one_hot, axis=-2)
