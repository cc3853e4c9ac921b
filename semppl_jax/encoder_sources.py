"""Where an evaluated encoder comes from: a pre-training run's checkpoints or a release file.

Pure functions over Haiku trees ``{module: {name: array}}``; the evaluation experiment picks
the source from its config.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from semppl_jax import checkpointing

ModuleTree = Dict[str, Dict[str, Any]]

# Top-level scopes of a pre-training tree that are heads, not encoder.
HEAD_SCOPES = ("projector", "predictor")
HEAD_SCOPE_PREFIXES = ("classifier",)


def encoder_modules(tree: Mapping[str, Any]) -> Dict[str, Any]:
  """The encoder's modules of a pre-training ``online_params`` / ``online_state`` tree.

  Args:
    tree: Haiku tree ``{module_name: {name: array}}`` of the pre-training online network.

  Returns:
    The entries whose top-level scope is not a head: not ``projector/...``,
    ``predictor/...`` nor ``classifier...`` (the same leaves, not copies).
  """
  def is_head(module):
    scope = module.split("/", 1)[0]
    return scope in HEAD_SCOPES or scope.startswith(HEAD_SCOPE_PREFIXES)
  return {m: v for m, v in tree.items() if not is_head(m)}


def load_pretrain_encoder(path: str) -> Tuple[ModuleTree, ModuleTree, Optional[int]]:
  """The encoder of a pre-training run's newest Orbax checkpoint, as host numpy arrays.

  Reads only ``train_state.online_params`` / ``online_state`` of the experiment snapshot
  (partial restore: optimiser states, target network and queues stay on disk) and keeps the
  encoder modules (:func:`encoder_modules`).

  Args:
    path: ``<checkpoint_dir>/checkpoints`` of a run launched with ``experiments/launch.py``
      (its ``latest`` series), a series directory, or one checkpoint directory.

  Returns:
    ``(params, state, global_step)``: ``{module: {name: np.ndarray}}`` trees (float32
    weights; BatchNorm ``counter`` int32 ``[]``, ``hidden`` / ``average`` ``(1, 1, 1, C)``) and
    the pre-training step of the checkpoint (None if not recorded).

  Raises:
    checkpointing.CheckpointError: no checkpoint there, or not a pre-training snapshot.
  """
  def select(snapshot):
    train_state = snapshot["train_state"]
    return {"train_state": {k: encoder_modules(train_state[k])
                            for k in ("online_params", "online_state")}}

  try:
    global_step, snapshot = checkpointing.read_experiment_snapshot(path, select=select)
  except checkpointing.CheckpointError as e:
    raise checkpointing.CheckpointError(
        f"config.checkpoint.path: {e} Expected a pre-training run's checkpoints with "
        "train_state.online_params / online_state.") from e
  restored = snapshot["train_state"]
  as_dicts = lambda t: {m: {k: np.asarray(v) for k, v in leaves.items()} for m, leaves in t.items()}
  return as_dicts(restored["online_params"]), as_dicts(restored["online_state"]), global_step


def check_encoder(params, state, expected_params, expected_state, what: str,
                  network_config) -> None:
  """Raises CheckpointError listing every name/shape difference to our encoder."""
  diffs = checkpointing.verify_checkpoint_tree(params, state, expected_params, expected_state)
  if diffs:
    count = lambda word: sum(f": {word} " in d for d in diffs)
    shown = diffs[:40] + ([f"... and {len(diffs) - 40} more"] if len(diffs) > 40 else [])
    n = network_config
    raise checkpointing.CheckpointError(
        f"{what} does not match config.network (encoder={n.encoder!r}, "
        f"width_multiplier={n.width_multiplier}, small_images={n.small_images}): "
        f"{len(diffs)} difference(s) ({count('missing')} missing, {count('unexpected')} "
        f"unexpected, {len(diffs) - count('missing') - count('unexpected')} of another shape):"
        "\n  " + "\n  ".join(shown))
