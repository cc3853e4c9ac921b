"""Semantic positives: queue entries drawn at random among those sharing an image's label.

:func:`sample_semantic_positives` draws, for every image, queue and draw, one entry of a
(sharded) :class:`~semppl_jax.queue.Queue` uniformly among the non-empty entries whose label
equals the image's (pseudo-)label. It does not score entries at all: it counts label matches per
shard, draws one integer rank per draw and lets the device holding that match send it. Its cost
does not grow with ``B × Q``.

Sharding follows :mod:`semppl_jax.knn`: inside ``with jax.set_mesh(mesh)`` whose ``'data'``
axis has size ``n > 1`` (eagerly or under ``jax.jit``), the queue is taken sharded along its
slot axis on ``'data'`` (``Q % n == 0``) and the work runs in a ``jax.shard_map``; without such
a mesh it runs over all ``Q`` slots at once. Sampling does no arithmetic on the entries, so the
two paths are identical, bit for bit (eager or jitted alike).

Labels: ``-1`` (any negative value) marks an empty slot of the queue, or an image without a
label; neither is ever matched.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from semppl_jax import knn
from semppl_jax.parallel import DATA_AXIS, ambient_data_axis_size
from semppl_jax.queue import Queue


def _stable_label_sort(queue_labels):
  """Labels of every row sorted, and the slots in that order (equal labels: slot order).

  Negative labels all become ``-1`` (only labels ``>= 0`` are ever looked up). When every
  ``(label + 1) · Ql + slot`` fits in int32, one sort of those packed keys (unique, so any sort
  is stable) does it: on XLA:CPU it is ~5x faster than a stable sort of (label, slot) pairs,
  measured at ``[4, 16384]``. Otherwise (labels of order ``2^31 / Ql``, checked at run time)
  the pair sort runs; both give the same result.

  Args:
    queue_labels: int32 ``[L, Ql]``.

  Returns:
    ``(sorted_labels, order)``, int32 ``[L, Ql]`` each.
  """
  labels = jnp.maximum(queue_labels, -1)
  local_size = labels.shape[1]
  slots = lax.broadcasted_iota(jnp.int32, labels.shape, 1)
  max_packable = (jnp.iinfo(jnp.int32).max - (local_size - 1)) // local_size - 1

  def packed(labels):
    keys = jnp.sort((labels + 1) * local_size + slots, axis=1)
    return keys // local_size - 1, keys % local_size

  def paired(labels):
    return lax.sort((labels, slots), dimension=1, is_stable=True, num_keys=1)

  return lax.cond(jnp.max(labels) <= max_packable, packed, paired, labels)


def _local_matches(queue_labels, targets):
  """Where the entries matching each target sit in one block of slots.

  Args:
    queue_labels: int32 ``[L, Ql]``, one block of slots of every queue.
    targets: int32 ``[B]``; ``< 0`` matches nothing.

  Returns:
    ``(order, first, count)``: ``order`` int32 ``[L, Ql]``, the block's slots sorted by label,
    stably (equal labels keep slot order); ``first`` and ``count`` int32 ``[L, B]``: the
    matches of ``targets[i]`` in queue ``l`` are ``order[l, first[l, i] + j]`` for
    ``0 <= j < count[l, i]``, in slot order.
  """
  sorted_labels, order = _stable_label_sort(queue_labels)
  # Binary search (O(B log Ql)), not method="compare_all" (O(B Ql)).
  search = jax.vmap(lambda row, side: jnp.searchsorted(row, targets, side=side),
                    in_axes=(0, None))
  first = search(sorted_labels, "left").astype(jnp.int32)
  last = search(sorted_labels, "right").astype(jnp.int32)
  count = jnp.where(targets[None, :] >= 0, last - first, 0)
  return order, first, count


def _mul_high_u32(a, b):
  """``floor(a * b / 2^32)`` of uint32 arrays, exactly, with uint32 arithmetic only (no x64)."""
  low16 = lambda x: x & 0xFFFF
  a_hi, a_lo, b_hi, b_lo = a >> 16, low16(a), b >> 16, low16(b)
  cross_1, cross_2 = a_hi * b_lo, a_lo * b_hi  # Each < 2^32: no overflow.
  carry = ((a_lo * b_lo) >> 16) + low16(cross_1) + low16(cross_2)  # < 3 · 2^16.
  return a_hi * b_hi + (cross_1 >> 16) + (cross_2 >> 16) + (carry >> 16)


def _draw_ranks(key, total, num_positives: int):
  """Uniform ranks ``r[l, n, i] = floor(u · total[l, i] / 2^32)`` in ``[0, total[l, i])``.

  ``u`` is ``jax.random.bits(key, (L, N, B), uint32)``: one call with a fixed shape, so every
  device (and the unsharded path) draws the same numbers. Integer arithmetic only (exact, no
  float rounding that could reach ``total``). Each rank is hit by ``floor`` or ``ceil`` of
  ``2^32 / total`` of the ``2^32`` values of ``u``: relative deviation from uniform below
  ``total / 2^32``. ``r = 0`` where ``total = 0``.

  Args:
    key: a PRNG key.
    total: int32 ``[L, B]``, ``>= 0``.
    num_positives: ``N``.

  Returns:
    int32 ``[L, N, B]``.
  """
  num_queues, batch = total.shape
  bits = jax.random.bits(key, (num_queues, num_positives, batch), jnp.uint32)
  ranks = _mul_high_u32(bits, total.astype(jnp.uint32)[:, None, :])
  return ranks.astype(jnp.int32)


def _pick_entries(embeddings, order, first, rank, mine):
  """Embeddings of the ``rank``-th local matches: float ``[L, N, B, D]``, zeros where not mine.

  Shapes: embeddings ``[L, Ql, D]``; order ``[L, Ql]``; first ``[L, B]``; rank and mine
  ``[L, N, B]``.
  """
  num_queues, local_size, dim = embeddings.shape
  _, num_positives, batch = rank.shape
  position = jnp.clip(first[:, None, :] + rank, 0, local_size - 1).reshape(num_queues, -1)
  slot = jnp.take_along_axis(order, position, axis=1)  # [L, N * B]
  picked = jnp.take_along_axis(embeddings, slot[..., None], axis=1)
  picked = picked.reshape(num_queues, num_positives, batch, dim)
  return jnp.where(mine[..., None], picked, jnp.zeros((), embeddings.dtype))


def sample_semantic_positives(key, labels, queue: Queue, num_positives: int):
  """Draws semantic positives: queue entries that share each image's (pseudo-)label.

  For each queue ``l``, draw ``n`` and image ``i``, one entry of queue ``l`` is chosen uniformly
  at random among the non-empty entries whose label equals ``labels[i]``. Algorithm (per
  device, on its block of ``Ql = Q / devices`` slots; one block without a mesh):

  1. stably sort the block's labels and binary-search every ``labels[i]``: the local matches of
     ``labels[i]`` are a run of the sorted order, in slot order (``count_d[l, i]`` of them);
  2. all-gather the ``[L, B]`` counts: their sum is the global number of matches
     ``total[l, i]``, the sum over lower devices is this device's exclusive offset;
  3. draw ``r[l, n, i]`` uniformly in ``[0, total[l, i])``: ``floor(u · total / 2^32)`` for
     ``u = jax.random.bits(key, (L, N, B), uint32)``, in exact integer arithmetic: the same
     numbers on every device and without a mesh;
  4. the device whose offset range holds ``r`` gathers its ``(r - offset)``-th local match; a
     sum over the integer bit patterns of the ``[L, N, B, D]`` block, which exactly one
     device fills, assembles the result: a ``psum_scatter`` along ``B`` when ``B`` is a
     multiple of the devices (each device receives only its own ``B / n`` rows, the batch's
     sharding; the result is sharded along ``B``), else a ``psum`` (replicated result).

  So draw ``(l, n, i)`` returns the ``r``-th matching entry of queue ``l`` in global slot order,
  whatever the sharding: sharded and unsharded calls (eager or jitted) return identical bits.
  Per device the cost is a sort of ``L × Ql`` labels, ``O(L × B × log Ql)`` searches, an
  ``[L, N, B, D]`` gather and reduce-scatter (or ``psum``) and an all-gather of ``[L, B]``
  counts: nothing grows with ``B × Q``. Draws for different ``(l, n, i)`` are independent; draws of the same image
  may repeat an entry (sampling with replacement). The relative deviation from uniform is below
  ``total / 2^32`` (step 3), negligible.

  Args:
    key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``); use a fresh one per step.
    labels: int ``[B]``, the images' labels / pseudo-labels; ``-1`` (any negative value) = no
      label, never matched.
    queue: a :class:`~semppl_jax.queue.Queue` ``[L, Q, D]`` (sharded along ``Q`` on ``'data'``
      under a mesh, ``Q`` a multiple of the axis size); empty slots (label ``-1``) are never
      returned.
    num_positives: ``N >= 1``, draws per image and queue.

  Returns:
    ``(embeddings, valid)``: float ``[L, N, B, D]`` in the queue's dtype (zeros where invalid)
    and bool ``[L, N, B]``, ``False`` where no entry of queue ``l`` matches ``labels[i]``.
  """
  knn.check_queue(queue)
  if jnp.ndim(labels) != 1:
    raise ValueError(f"labels must have shape [B], got {jnp.shape(labels)}")
  num_positives = knn.positive_int(num_positives, "num_positives")
  targets = jnp.asarray(labels, jnp.int32)
  embeddings = jnp.asarray(queue.embeddings)
  queue_labels = jnp.asarray(queue.labels, jnp.int32)
  size = embeddings.shape[1]
  shards = ambient_data_axis_size()

  if shards == 1:
    order, first, count = _local_matches(queue_labels, targets)
    rank = _draw_ranks(key, count, num_positives)
    valid = jnp.broadcast_to((count > 0)[:, None, :], rank.shape)
    return _pick_entries(embeddings, order, first, rank, valid), valid

  if size % shards:
    raise ValueError(f"queue size Q={size} must be a multiple of the mesh's 'data' axis size "
                     f"{shards}")

  def body(key, targets, embeddings, queue_labels):
    me = lax.axis_index(DATA_AXIS)
    order, first, count = _local_matches(queue_labels, targets)
    counts = lax.all_gather(count, DATA_AXIS)  # [devices, L, B]
    total = counts.sum(axis=0)
    offset = jnp.where(jnp.arange(shards)[:, None, None] < me, counts, 0).sum(axis=0)
    rank = _draw_ranks(key, total, num_positives) - offset[:, None, :]
    mine = (rank >= 0) & (rank < count[:, None, :])
    picked = _pick_entries(embeddings, order, first, rank, mine)
    # Exactly one device sends each drawn entry, the others zeros. Summing the bit patterns as
    # integers keeps every bit (a float sum would turn -0.0 into 0.0).
    int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[picked.dtype.itemsize]
    bits = lax.bitcast_convert_type(picked, int_type)
    if scatter:  # Each device receives only its own rows of the batch.
      bits = lax.psum_scatter(bits, DATA_AXIS, scatter_dimension=2, tiled=True)
    else:
      bits = lax.psum(bits, DATA_AXIS)
    valid = jnp.broadcast_to((total > 0)[:, None, :], rank.shape)
    return lax.bitcast_convert_type(bits, picked.dtype), valid

  # The batch's own sharding: with B a multiple of the devices, device d's rows are block d.
  scatter = targets.shape[0] % shards == 0
  slots = P(None, DATA_AXIS)
  return jax.shard_map(
      body,
      mesh=jax.sharding.get_abstract_mesh(),
      in_specs=(P(), P(), slots, slots),
      out_specs=(P(None, None, DATA_AXIS) if scatter else P(), P()),
      check_vma=False,
  )(key, targets, embeddings, queue_labels)
