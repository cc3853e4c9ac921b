"""The non-finite guard of the pre-training step: keep or refuse an update on device.

:func:`guard_nonfinite` runs inside ``semppl_jax.train.train_step``: an update whose metrics or
new state are not all finite is refused without a host sync, and the first failing check is
recorded in the state's ``nonfinite_step`` / ``nonfinite_check`` fields
(``semppl_jax.train.TrainState``), which the experiment names with
:func:`nonfinite_check_names`.

What it costs per step: one finiteness reduction per checked leaf (each a read, no write) and
one ``lax.cond`` choosing between the updated and the previous state. The queue, the one big
leaf (``[L, Q, D]``; 4 GiB at the paper's Q = 2^20 with two queues), is not re-read: the guard
checks the items written into it this step (``enqueued``), which is enough because every queue
it ever accepted was finite. Nor is it copied: ``train_step`` passes its enqueue as
``update_queue``, run after the decision (``write=accept``), so the queue stays out of the
conditional and is updated in place. BENCHMARKS.md "Asynchronous checkpoints (issue #20)" and
"Per-part cost", round five, have the compiled program's bytes with and without the guard.
"""
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

PyTree = Any

# The state fields the guard checks after the step's metrics, in this order.
GUARDED_STATE_FIELDS = ("online_params", "online_state", "opt_state", "probe_params",
                        "probe_opt_state", "target_params", "target_state", "queue")
_FIRST_CHECKS = ("loss", "grad_norm")


def nonfinite_check_names(metric_names) -> Tuple[str, ...]:
  """The guard's checks in the order they are reported; ``nonfinite_check`` indexes this.

  Args:
    metric_names: the keys of the step's metrics dict.

  Returns:
    'loss' and 'grad_norm' (when present), the other metric names sorted, then
    :data:`GUARDED_STATE_FIELDS` (the updated state).
  """
  names = set(metric_names)
  first = tuple(n for n in _FIRST_CHECKS if n in names)
  return first + tuple(sorted(names - set(first))) + GUARDED_STATE_FIELDS


def _all_finite(tree: PyTree) -> jax.Array:
  """bool []: every floating-point leaf of ``tree`` is finite (integer leaves always are)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
           if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _queue_finite(state: Any, new_state: Any, enqueued: Optional[jax.Array]) -> jax.Array:
  """bool []: the updated queue is finite, read as cheaply as its update allows.

  An unchanged queue (the same object: the step did not enqueue) is finite, and so is one
  whose new items ``enqueued`` are (cast to the queue's dtype, as the enqueue stores them): the
  queue the step started from was accepted by this guard before (or is a fresh or restored
  one, and only guarded states are saved). Only without ``enqueued`` is the whole updated queue
  reduced.
  """
  if new_state.queue is state.queue:
    return jnp.asarray(True)
  if enqueued is None:
    return _all_finite(new_state.queue)
  return _items_finite(enqueued, new_state.queue)


def _items_finite(enqueued, queue) -> jax.Array:
  """bool []: the items are finite once cast to the queue's dtype (as the enqueue stores them)."""
  return jnp.all(jnp.isfinite(jnp.asarray(enqueued).astype(queue.embeddings.dtype)))


def guard_nonfinite(state: Any, new_state: Any, metrics: Mapping[str, jax.Array], *,
                    enqueued: Optional[jax.Array] = None,
                    update_queue: Optional[Callable[[jax.Array], Any]] = None) -> Any:
  """``new_state`` if every check of :func:`nonfinite_check_names` is finite, else ``state``.

  On device, without a host sync: the refused update leaves ``state`` (step included) as it
  was and records the step number (``state.step + 1``) in ``nonfinite_step`` and the first
  failing check in ``nonfinite_check``. The guard is sticky: once set, later updates are
  refused too, so the state is the last finite one until the host sees the flag and stops.

  The metrics are checked first ('loss' and 'grad_norm' catch a non-finite gradient, hence
  parameters and optimiser state), then each field of :data:`GUARDED_STATE_FIELDS` of
  ``new_state``: those also catch what no metric shows (NaN pixels can leave the loss finite
  and poison the BatchNorm statistics in ``online_state``). The 'queue' check looks at
  ``enqueued`` only (see :func:`_queue_finite`).

  Args:
    state: the state the step started from (its queue finite, as every state this guard
      accepted).
    new_state: the updated state.
    metrics: the step's metrics (float32 [] each).
    enqueued: float [..., D], every item the step wrote into ``new_state.queue`` (more rows
      are allowed: then they are checked too); None: the whole updated queue is checked.
    update_queue: None, or the step's enqueue as a function of the decision: ``accept`` (bool
      ``[]``) -> the queue to keep, ``state.queue`` unchanged when ``accept`` is False (e.g.
      ``queue.enqueue(..., write=accept)``). Then ``new_state.queue`` is ignored, the queue
      stays out of the conditional, and the enqueue runs after the decision: its scatter
      updates the (donated) queue in place instead of the conditional copying the updated
      queue into its output. Requires ``enqueued`` (the items it writes).

  Returns:
    The state to keep.
  """
  names = nonfinite_check_names(metrics)
  if update_queue is not None:
    if enqueued is None:
      raise ValueError("update_queue needs enqueued (the items it writes)")
    new_state = new_state._replace(queue=state.queue)
  checks = {n: jnp.all(jnp.isfinite(metrics[n])) for n in metrics}
  checks.update({f: _all_finite(getattr(new_state, f)) for f in GUARDED_STATE_FIELDS
                 if f != "queue"})
  checks["queue"] = (_queue_finite(state, new_state, enqueued) if update_queue is None else
                     _items_finite(enqueued, state.queue))
  finite = jnp.stack([checks[n] for n in names])  # bool [len(names)]
  clear = state.nonfinite_step < 0
  accept = clear & jnp.all(finite)
  # One conditional, not a select per leaf: XLA fuses the scalar tail that computes ``accept``
  # into each leaf's select, so the program grew with leaves x checks and the ResNet-50 step
  # (~1000 state leaves) did not finish compiling on CPU in 20 minutes; a select per leaf also
  # reads both states in full. A conditional's predicate is computed once, and the compiled
  # step moves 0.02 queue sizes more with it than without any guard (BENCHMARKS.md, issue #20).
  if update_queue is None:
    kept = jax.lax.cond(accept, lambda: new_state, lambda: state)
  else:
    without_queue = lambda s: s._replace(queue=None)
    kept = jax.lax.cond(accept, lambda: without_queue(new_state), lambda: without_queue(state))
    kept = kept._replace(queue=update_queue(accept))
  newly_bad = clear & ~jnp.all(finite)
  first_bad = jnp.argmax(~finite).astype(jnp.int32)
  return kept._replace(
      nonfinite_step=jnp.where(newly_bad, state.step + 1, state.nonfinite_step).astype(jnp.int32),
      nonfinite_check=jnp.where(newly_bad, first_bad, state.nonfinite_check).astype(jnp.int32))
