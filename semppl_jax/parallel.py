"""Meshes, shardings, host-local <-> global arrays and multi-host initialisation.

Everything runs on a 1-D ``jax.sharding.Mesh`` whose single axis is named ``'data'``: the batch
is sharded along it, parameters are replicated, and the queues are sharded along their slots.
On several hosts, every process feeds its own slice of the global batch
(:func:`host_local_to_global`) and reads back its own slice of sharded results
(:func:`global_to_host_local`).
"""
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis ``'data'`` over ``devices`` (all global devices by default).

  Built with ``jax.sharding.Mesh`` (not ``jax.make_mesh``, whose axes default to Explicit), so
  the axis is Auto and works with ``jax.shard_map`` and ``jax.set_mesh``.

  Args:
    devices: the devices in mesh order; default ``jax.devices()`` (every process's devices).

  Returns:
    ``Mesh(np.array(devices), ('data',))``.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices must be a non-empty sequence of jax devices")
  return Mesh(np.array(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P('data'))``: leading axis split across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """``NamedSharding(mesh, P())``: a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, P())


def ambient_data_axis_size() -> int:
  """Size of the ``'data'`` axis of the mesh set by ``jax.set_mesh`` (or of the jit context).

  Returns 1 when there is no ambient mesh, when it has no ``'data'`` axis, or when that axis is
  already manual (inside a ``jax.shard_map`` over it), i.e. whenever functions must run their
  plain single-device computation.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if DATA_AXIS not in mesh.axis_names or DATA_AXIS in mesh.manual_axes:
    return 1
  return mesh.shape[DATA_AXIS]


def shard_batch(x: jax.Array) -> jax.Array:
  """``x`` constrained to be split along its first (batch) axis over the ambient ``'data'`` axis.

  Inside a jitted function under ``jax.set_mesh(mesh)`` this pins the layout where GSPMD might
  otherwise choose to replicate (e.g. at a network's input); without an ambient data axis (one
  device, or inside a ``shard_map`` over ``'data'``) it returns ``x`` unchanged.
  """
  if ambient_data_axis_size() == 1:
    return x
  return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
  """Assembles global arrays, sharded along their leading axis, from per-process data.

  Each process passes its own slice of every leaf (e.g. its ``B / num_processes`` images); the
  global array concatenates the processes' slices in process order along axis 0 (with
  ``make_mesh()``'s default device order). Multi-host safe: nothing is sent between hosts.

  Args:
    tree: a pytree of array-likes, each ``[b_local, ...]``; ``b_local`` must be a multiple of
      this process's number of devices in ``mesh``.
    mesh: the mesh with a ``'data'`` axis.

  Returns:
    The same pytree of ``jax.Array`` s of shape ``[b_local * num_processes, ...]`` with
    :func:`data_sharding` (``P('data')``).
  """
  sharding = data_sharding(mesh)
  num_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def to_global(leaf):
    leaf = np.asarray(leaf)
    if leaf.ndim == 0 or leaf.shape[0] % num_local:
      raise ValueError(f"every leaf must have a leading axis that is a multiple of the "
                       f"{num_local} local devices, got shape {leaf.shape}")
    return jax.make_array_from_process_local_data(sharding, leaf)

  return jax.tree.map(to_global, tree)


def global_to_host_local(tree: Any) -> Any:
  """The part of every global array that this process holds, as numpy.

  For an array sharded along its leading axis (``P('data')``) this is the process's contiguous
  slice, the inverse of :func:`host_local_to_global`; for a replicated array it is the whole
  array; non-jax leaves are converted with ``np.asarray``.

  Args:
    tree: a pytree of ``jax.Array`` s (or array-likes).

  Returns:
    The same pytree of ``np.ndarray`` s.

  Raises:
    ValueError: when the process's shards do not form one contiguous block.
  """
  def to_local(leaf):
    if not isinstance(leaf, jax.Array):
      return np.asarray(leaf)
    if leaf.is_fully_addressable:
      return np.asarray(leaf)
    # Deduplicate replicas, then place each shard into the bounding box of the local shards.
    shards = {}
    for shard in leaf.addressable_shards:
      bounds = tuple(sl.indices(dim)[:2] for sl, dim in zip(shard.index, leaf.shape))
      shards.setdefault(bounds, shard)
    lo = [min(b[d][0] for b in shards) for d in range(leaf.ndim)]
    hi = [max(b[d][1] for b in shards) for d in range(leaf.ndim)]
    out = np.empty([h - l for l, h in zip(lo, hi)], leaf.dtype)
    covered = 0
    for bounds, shard in shards.items():
      region = tuple(slice(b0 - l, b1 - l) for (b0, b1), l in zip(bounds, lo))
      data = np.asarray(shard.data)
      out[region] = data
      covered += data.size
    if covered != out.size:
      raise ValueError(f"this process's shards of an array of shape {leaf.shape} do not form "
                       "one contiguous block")
    return out

  return jax.tree.map(to_local, tree)


def check_batch_divisible(field: str, value: int, num_devices: int, num_processes: int) -> None:
  """Checks that a global batch size splits evenly over devices and processes.

  Each process feeds ``value / num_processes`` rows (:func:`host_local_to_global`) and each
  device computes on ``value / num_devices`` rows, so ``value`` must be a multiple of both
  (their least common multiple; with equally many devices per process, of ``num_devices``).
  Meant to run on the config before anything compiles.

  Args:
    field: the config field, named in the error (e.g. ``'data.labelled_batch_size'``).
    value: the global batch size, an int ``>= 0``.
    num_devices: global number of devices on the ``'data'`` axis, ``>= 1``.
    num_processes: number of processes (hosts), ``>= 1``.

  Raises:
    ValueError: ``config.<field>: ...`` with the counts and the multiple to use.
  """
  for name, count in (("num_devices", num_devices), ("num_processes", num_processes)):
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
      raise ValueError(f"{name} must be an int >= 1, got {count!r}")
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"config.{field}: must be an int >= 0, got {value!r}.")
  multiple = math.lcm(int(num_devices), int(num_processes))
  if value % multiple:
    raise ValueError(
        f"config.{field}: {value} is not divisible by the number of devices ({num_devices}) "
        f"and of processes ({num_processes}); use a multiple of {multiple}.")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           initialization_timeout_s: int = 300,
                           heartbeat_timeout_s: int = 60,
                           shutdown_timeout_s: int = 120) -> None:
  """Connects this process to the others (``jax.distributed.initialize``).

  With ``coordinator_address``, ``num_processes`` and ``process_id`` all None, jax detects the
  cluster itself (Cloud TPU slices, SLURM, Open MPI). A no-op when ``num_processes == 1`` and
  when jax.distributed is already initialised (so it is safe to call twice). Must run before
  any other jax call that touches devices.

  The timeouts bound how long a healthy process waits on a broken one: a peer that sends no
  heartbeat for ``heartbeat_timeout_s`` is declared dead and every other process then exits
  with an error naming the lost task, instead of blocking in the next collective forever.

  Args:
    coordinator_address: ``'host:port'`` of process 0's coordinator service.
    num_processes: total number of processes, ``>= 1``.
    process_id: this process's index in ``[0, num_processes)``.
    initialization_timeout_s: seconds to wait for every process to connect at start-up.
    heartbeat_timeout_s: seconds without a heartbeat after which a process counts as dead.
    shutdown_timeout_s: seconds a finishing process waits at exit for the others to finish.

  Raises:
    ValueError: a bad argument, named with the expected value.
  """
  for name, value in (("initialization_timeout_s", initialization_timeout_s),
                      ("heartbeat_timeout_s", heartbeat_timeout_s),
                      ("shutdown_timeout_s", shutdown_timeout_s)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be an int >= 1 (seconds), got {value!r}")
  timeouts = dict(initialization_timeout=int(initialization_timeout_s),
                  heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                  shutdown_timeout_seconds=int(shutdown_timeout_s))
  auto_detect = coordinator_address is None and num_processes is None and process_id is None
  if not auto_detect:
    if num_processes is None or int(num_processes) != num_processes or num_processes < 1:
      raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if (process_id is None or int(process_id) != process_id
        or not 0 <= process_id < num_processes):
      raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    if num_processes == 1:
      return
    if not coordinator_address:
      raise ValueError("coordinator_address must be 'host:port', got "
                       f"{coordinator_address!r}")
  if jax.distributed.is_initialized():
    return
  if auto_detect:
    jax.distributed.initialize(**timeouts)
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=int(num_processes), process_id=int(process_id),
                               **timeouts)
