"""Optimiser and schedules for SemPPL pre-training.

* LARS (``optax.lars``) with biases and BatchNorm parameters excluded from both weight decay and
  the trust-ratio adaptation, as in BYOL/ReLIC.
* Learning rate ``base * batch_size / 256``: linear warm-up, then cosine decay to zero.
* Target-network EMA with the cosine-increasing decay of BYOL:
  ``tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2``.
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# Haiku parameter names that are biases or BatchNorm affine terms.
_UNADAPTED_PARAM_NAMES = ("b", "offset", "scale")


def _is_adapted(path, leaf) -> bool:
  """True for weights that get weight decay and the LARS trust ratio."""
  del leaf
  names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  module = "/".join(str(n) for n in names[:-1])
  if names and names[-1] in _UNADAPTED_PARAM_NAMES:
    return False
  return "batchnorm" not in module and "batch_norm" not in module


def lars_mask(params: PyTree) -> PyTree:
  """Boolean tree, True for the parameters LARS adapts and decays.

  Args:
    params: a Haiku parameter tree ``{module: {name: array}}``.

  Returns:
    A tree of Python bools with the structure of ``params``: False for biases (``b``), BatchNorm
    ``scale``/``offset`` and anything inside a module whose name contains ``batchnorm``.
  """
  return jax.tree_util.tree_map_with_path(_is_adapted, params)


def learning_rate_schedule(*, base_learning_rate: float, batch_size: int, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warm-up to ``base * batch_size / 256``, then cosine decay to 0 at ``total_steps``.

  Args:
    base_learning_rate: learning rate for a batch of 256.
    batch_size: the global batch size (labelled + unlabelled images).
    total_steps: the number of training steps (the schedule reaches 0 there).
    warmup_steps: steps of linear warm-up from 0; ``0 <= warmup_steps <= total_steps``.

  Returns:
    An optax schedule ``step -> float32 []``.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  peak = base_learning_rate * batch_size / 256.0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=0.0)


def lars(learning_rate: optax.ScalarOrSchedule, params: PyTree, *, weight_decay: float = 1e-6,
         momentum: float = 0.9, trust_coefficient: float = 1e-3) -> optax.GradientTransformation:
  """LARS with biases and BatchNorm parameters excluded from decay and adaptation.

  Args:
    learning_rate: a float or an optax schedule.
    params: the parameter tree to be optimised (used only for its structure and names).
    weight_decay: decoupled-into-gradient weight decay for the adapted parameters.
    momentum: heavy-ball momentum.
    trust_coefficient: LARS trust coefficient ``eta``.

  Returns:
    An ``optax.GradientTransformation``.
  """
  mask = lars_mask(params)
  return optax.lars(
      learning_rate, weight_decay=weight_decay, weight_decay_mask=mask,
      trust_coefficient=trust_coefficient, trust_ratio_mask=mask, momentum=momentum)


def target_ema_decay(step: jax.Array, *, base_decay: float, total_steps: int) -> jax.Array:
  """BYOL's target decay ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``.

  Args:
    step: int or int32 [] global step.
    base_decay: decay at step 0, in [0, 1].
    total_steps: steps of training; the decay reaches 1 there.

  Returns:
    float32 [] decay in [base_decay, 1].
  """
  if not 0.0 <= base_decay <= 1.0:
    raise ValueError(f"base_decay must be in [0, 1], got {base_decay}.")
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return 1.0 - (1.0 - base_decay) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def target_ema(online: PyTree, target: PyTree, decay: jax.Array) -> PyTree:
  """Moves the target towards the online values: ``decay * target + (1 - decay) * online``.

  This is ``optax.incremental_update(online, target, step_size=1 - decay)`` (Polyak
  averaging), cast back to the target's dtypes.

  Args:
    online: online parameters; must have the structure of ``target`` (pass the matching subset).
    target: target parameters.
    decay: float32 [] in [0, 1]; 1 keeps the target, 0 copies the online values.

  Returns:
    The new target tree (dtypes of ``target``).
  """
  updated = optax.incremental_update(online, target, step_size=1.0 - decay)
  # A float32 decay would promote lower-precision target leaves; keep the target's dtypes.
  return jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), updated, target)
