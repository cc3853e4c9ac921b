"""Queues of labelled target projections: one ring buffer per large view, as a pytree.

A :class:`Queue` holds ``L`` queues (one per large view) of ``Q`` slots each. A slot is an
embedding (a target projection of a labelled image) plus its label; empty slots carry label
``-1`` and are never returned by the kNN vote or by semantic-positive sampling
(:mod:`semppl_jax.knn`).

Ring semantics and the block layout
-----------------------------------
``enqueue(queue, embeddings [L, b, D], labels [b], num_shards=n)`` views the ``Q`` slots as
``n`` contiguous blocks of ``Q/n`` slots and the ``b`` new items as ``n`` contiguous blocks of
``b/n`` items. Item block ``i`` is written into slot block ``i`` at the same in-block offsets
``position, position + 1, ..., position + b/n - 1`` (mod ``Q/n``), overwriting the oldest
entries of that block once it is full. ``position`` is the shared in-block write offset; it then
advances by ``b/n`` modulo ``Q/n``. With ``n = 1`` this is an ordinary ring buffer over all ``Q``
slots.

Why blocks: in the train step the queue is sharded along ``Q`` on the mesh's ``'data'`` axis and
the labelled items along ``b``, so with ``n`` equal to the size of that axis block ``i`` of the
slots *is* device ``i``'s shard and block ``i`` of the items is device ``i``'s own items: every
device writes only into its own shard, with no all-gather of the queue. The unsharded call with
the same ``n`` produces exactly the same layout, so a queue can move between a single device and
a mesh (or be checked against a reference) without changing its contents. The order of the
slots has no meaning for kNN or sampling except for tie-breaking (see :mod:`semppl_jax.knn`).
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from semppl_jax.parallel import DATA_AXIS, ambient_data_axis_size


class Queue(NamedTuple):
  """``L`` ring buffers of labelled embeddings.

  Attributes:
    embeddings: float32 ``[L, Q, D]``: one queue of ``Q`` slots per large view.
    labels: int32 ``[L, Q]``: the label of each slot, ``-1`` for an empty slot.
    position: int32 ``[]``: the in-block write offset of the next enqueue (see module doc).
  """
  embeddings: jax.Array
  labels: jax.Array
  position: jax.Array


def init(num_queues: int, size: int, dim: int, dtype=jnp.float32) -> Queue:
  """Empty queues.

  Args:
    num_queues: ``L``, the number of queues (one per large view), ``>= 1``.
    size: ``Q``, slots per queue, ``>= 1``.
    dim: ``D``, the embedding size, ``>= 1``.
    dtype: dtype of the embeddings (float32 by default).

  Returns:
    A :class:`Queue` with zero embeddings ``[L, Q, D]``, labels ``-1`` (int32 ``[L, Q]``) and
    position ``0`` (int32 ``[]``).
  """
  for name, value in (("num_queues", num_queues), ("size", size), ("dim", dim)):
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return Queue(
      embeddings=jnp.zeros((num_queues, size, dim), dtype),
      labels=jnp.full((num_queues, size), -1, jnp.int32),
      position=jnp.zeros((), jnp.int32))


def _write_blocks(queue_embeddings, queue_labels, position, embeddings, labels, num_blocks,
                  write=None):
  """Writes item block i into slot block i at in-block offsets position + j (mod block size).

  Shapes: queue_embeddings [L, Q, D], queue_labels [L, Q], embeddings [L, b, D], labels [b];
  Q and b are multiples of num_blocks; ``write``: bool [] or None (see :func:`enqueue`).
  Returns the new (embeddings, labels).
  """
  num_queues, size, dim = queue_embeddings.shape
  block_size = size // num_blocks
  per_block = embeddings.shape[1] // num_blocks
  # A scatter at modular offsets (rather than one dynamic_update_slice, which clamps instead of
  # wrapping) handles the write that crosses the end of the block.
  offsets = (position + jnp.arange(per_block, dtype=jnp.int32)) % block_size
  q_emb = queue_embeddings.reshape(num_queues, num_blocks, block_size, dim)
  q_lab = queue_labels.reshape(num_queues, num_blocks, block_size)
  new_emb = embeddings.astype(queue_embeddings.dtype).reshape(
      num_queues, num_blocks, per_block, dim)
  new_lab = jnp.broadcast_to(
      labels.astype(jnp.int32).reshape(1, num_blocks, per_block),
      (num_queues, num_blocks, per_block))
  if write is not None:  # Refused: the slots get their own contents back (same scatter).
    new_emb = jnp.where(write, new_emb, q_emb[:, :, offsets])
    new_lab = jnp.where(write, new_lab, q_lab[:, :, offsets])
  q_emb = q_emb.at[:, :, offsets].set(new_emb, unique_indices=True)
  q_lab = q_lab.at[:, :, offsets].set(new_lab, unique_indices=True)
  return q_emb.reshape(num_queues, size, dim), q_lab.reshape(num_queues, size)


def enqueue(queue: Queue, embeddings, labels, *, num_shards: int = 1,
            write: Optional[jax.Array] = None) -> Queue:
  """Writes ``b`` labelled items into every queue (ring buffer, block layout: module doc).

  Inside ``jax.set_mesh(mesh)`` whose ``'data'`` axis has size ``num_shards > 1`` the write runs
  in a ``jax.shard_map``: the queue is taken sharded along ``Q`` and the items along ``b`` on
  ``'data'``, and each device writes its own items into its own shard (no gather of the queue).
  Otherwise the same math runs as one computation; the result is identical either way.

  Args:
    queue: a :class:`Queue` with embeddings ``[L, Q, D]``.
    embeddings: float ``[L, b, D]``, item ``j`` of queue ``l`` is ``embeddings[l, j]`` (the
      target projection of large view ``l``); cast to the queue's dtype.
    labels: int ``[b]``, the items' labels (shared by all ``L`` queues).
    num_shards: ``n``, the number of blocks; ``Q % n == 0``, ``b % n == 0`` and
      ``b / n <= Q / n`` are required.
    write: bool ``[]`` or None (= True). False returns the queue unchanged (position included)
      through the same in-place scatter, which writes the slots' own contents back: a caller
      that decides late whether to keep the update (the non-finite guard) then needs no copy
      of the queue as it was.

  Returns:
    The updated :class:`Queue`; ``position`` advanced by ``b / n`` modulo ``Q / n``.

  Raises:
    ValueError: on mismatched shapes or a block layout that does not fit.
  """
  num_queues, size, dim = queue.embeddings.shape
  if queue.labels.shape != (num_queues, size):
    raise ValueError(f"queue.labels must have shape {(num_queues, size)}, "
                     f"got {queue.labels.shape}")
  if jnp.shape(queue.position) != ():
    raise ValueError(f"queue.position must be a scalar, got shape {jnp.shape(queue.position)}")
  if jnp.ndim(embeddings) != 3 or jnp.shape(embeddings)[0] != num_queues or (
      jnp.shape(embeddings)[2] != dim):
    raise ValueError(f"embeddings must have shape [L={num_queues}, b, D={dim}], "
                     f"got {jnp.shape(embeddings)}")
  batch = jnp.shape(embeddings)[1]
  if jnp.shape(labels) != (batch,):
    raise ValueError(f"labels must have shape [b={batch}], got {jnp.shape(labels)}")
  if int(num_shards) != num_shards or num_shards < 1:
    raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
  if size % num_shards:
    raise ValueError(f"queue size Q={size} must be a multiple of num_shards={num_shards}")
  if batch % num_shards:
    raise ValueError(f"labels/embeddings batch b={batch} must be a multiple of "
                     f"num_shards={num_shards}")
  if batch // num_shards > size // num_shards:
    raise ValueError(f"batch b={batch} per shard ({batch // num_shards}) must not exceed queue "
                     f"size Q={size} per shard ({size // num_shards})")

  position = jnp.asarray(queue.position, jnp.int32)
  block_size = size // num_shards
  per_block = batch // num_shards
  new_position = (position + per_block) % block_size
  if write is not None:
    write = jnp.asarray(write, bool)
    if write.shape != ():
      raise ValueError(f"write must be a scalar bool, got shape {write.shape}")
    new_position = jnp.where(write, new_position, position)

  no_flag = write is None
  if num_shards > 1 and ambient_data_axis_size() == num_shards:
    def write_own_shard(q_emb, q_lab, pos, emb, lab, write):
      # Each device holds exactly one slot block and one item block.
      return _write_blocks(q_emb, q_lab, pos, emb, lab, num_blocks=1,
                           write=None if no_flag else write)

    slots = P(None, DATA_AXIS)
    new_emb, new_lab = jax.shard_map(
        write_own_shard,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(slots, slots, P(), slots, P(DATA_AXIS), P()),
        out_specs=(slots, slots),
        check_vma=False,
    )(queue.embeddings, queue.labels, position, jnp.asarray(embeddings), jnp.asarray(labels),
      jnp.asarray(True) if no_flag else write)
  else:
    new_emb, new_lab = _write_blocks(queue.embeddings, queue.labels, position,
                                     jnp.asarray(embeddings), jnp.asarray(labels), num_shards,
                                     write)
  return Queue(embeddings=new_emb, labels=new_lab, position=new_position)


def fill_fraction(queue: Queue) -> jax.Array:
  """Share of non-empty slots over all ``L`` queues: float32 ``[]`` in ``[0, 1]``."""
  return jnp.mean((queue.labels >= 0).astype(jnp.float32))
