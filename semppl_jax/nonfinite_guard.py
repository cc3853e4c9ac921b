"""The non-finite guard of the pre-training step: keep or refuse an update on device.

:func:`guard_nonfinite` runs inside ``semppl_jax.train.train_step``: an update whose metrics or
new state are not all finite is refused without a host sync, and the first failing check is
recorded in the state's ``nonfinite_step`` / ``nonfinite_check`` fields
(``semppl_jax.train.TrainState``), which the experiment names with
:func:`nonfinite_check_names`.
"""
from typing import Any, Mapping, Tuple

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


def guard_nonfinite(state: Any, new_state: Any,
                    metrics: Mapping[str, jax.Array]) -> Any:
  """``new_state`` if every check of :func:`nonfinite_check_names` is finite, else ``state``.

  On device, without a host sync: the refused update leaves ``state`` (step included) as it
  was and records the step number (``state.step + 1``) in ``nonfinite_step`` and the first
  failing check in ``nonfinite_check``. The guard is sticky: once set, later updates are
  refused too, so the state is the last finite one until the host sees the flag and stops.

  Args:
    state: the state the step started from.
    new_state: the updated state.
    metrics: the step's metrics (float32 [] each).

  Returns:
    The state to keep.
  """
  names = nonfinite_check_names(metrics)
  checked = dict(metrics, **{f: getattr(new_state, f) for f in GUARDED_STATE_FIELDS})
  finite = jnp.stack([_all_finite(checked[n]) for n in names])  # bool [len(names)]
  clear = state.nonfinite_step < 0
  accept = clear & jnp.all(finite)
  # One conditional, not a select per leaf: XLA fuses the scalar tail that computes ``accept``
  # (every leaf's finiteness flag, the metrics' last scalar ops) into each leaf's select, so the
  # program grew with leaves x checks and the ResNet-50 step (~1000 state leaves) did not finish
  # compiling on CPU in 20 minutes. A conditional's predicate is computed once.
  kept = jax.lax.cond(accept, lambda: new_state, lambda: state)
  newly_bad = clear & ~jnp.all(finite)
  first_bad = jnp.argmax(~finite).astype(jnp.int32)
  return kept._replace(
      nonfinite_step=jnp.where(newly_bad, state.step + 1, state.nonfinite_step).astype(jnp.int32),
      nonfinite_check=jnp.where(newly_bad, first_bad, state.nonfinite_check).astype(jnp.int32))
