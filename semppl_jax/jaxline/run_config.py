"""Config-checked resume: which fields of a launch config define a run.

Every checkpoint stores :func:`run_metadata` (the resolved launch config, flattened to dotted
field names, and the package version). Resuming compares the stored config with the current
one (:func:`check_resume`): a field that defines the run (objective, data and label split,
batch sizes, views, network, queue, loss weights, optimiser, seeds, training length ...)
differing refuses the resume with one line per field, ``old -> new``. Fields that do not change
what is trained may differ (:data:`MAY_CHANGE`: logging, evaluation, summaries, checkpoint
cadence and location, data location, recomputation policy).

``training_steps`` is run-defining: the learning-rate warm-up / cosine schedule and the target
network's EMA schedule are functions of it, so a resumed run with another length would follow
a schedule that its earlier steps did not. Extending a run on purpose is the override's job
(``--allow_config_change=training_steps``): the schedules are then recomputed for the new
length from the step resumed at.
"""
import json
import logging
from typing import Any, Iterable, Mapping

import jax
from ml_collections import config_dict

import semppl_jax
from semppl_jax import checkpointing

_EXP = "experiment_kwargs.config."

# Top-level jaxline fields that define the run; every other top-level field (logging and
# checkpoint intervals, checkpoint_dir, evaluation-mode settings ...) may change.
RUN_DEFINING_TOP_LEVEL = ("experiment_class", "random_seed", "training_steps",
                          "legacy_random_seed_behavior", "random_mode_train")

# Fields (or whole sub-trees) of ``experiment_kwargs.config`` that may change on resume.
MAY_CHANGE = tuple(_EXP + f for f in (
    "log_every_steps", "evaluate_at_end", "evaluation", "summaries", "data.data_dir",
    "data.test_dir", "data.eval_split", "network.remat"))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def flat_config(config: config_dict.ConfigDict) -> dict[str, Any]:
  """The launch config as ``{dotted field: JSON value}`` (references resolved, tuples as
  lists)."""
  return _flatten(json.loads(json.dumps(config.to_dict(), default=repr)))


def run_metadata(config: config_dict.ConfigDict) -> dict[str, Any]:
  """What every checkpoint stores about its run: the flattened config and the versions."""
  return {"config": flat_config(config), "semppl_jax_version": semppl_jax.__version__,
          "jax_version": jax.__version__}


def _defining(field: str) -> bool:
  if not field.startswith(_EXP):
    return field in RUN_DEFINING_TOP_LEVEL
  return not any(field == f or field.startswith(f + ".") for f in MAY_CHANGE)


def _allowed(field: str, allowed: Iterable[str]) -> bool:
  for a in allowed:
    if a == "all" or field == a or field.startswith(a + "."):
      return True
  return False


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]
                       ) -> list[tuple[str, Any, Any]]:
  """``(field, saved value, current value)`` of every run-defining field that differs
  (a field absent on one side shows as ``'<absent>'``), sorted by field."""
  absent = "<absent>"
  out = []
  for field in sorted(set(saved) | set(current)):
    if not _defining(field):
      continue
    old, new = saved.get(field, absent), current.get(field, absent)
    if old != new:
      out.append((field, old, new))
  return out


def check_resume(stored: Any, checkpoint_dir: str, *, current: Mapping[str, Any],
                 allowed: Iterable[str] = ()) -> None:
  """Refuses to resume a checkpoint whose run-defining config differs from ``current``.

  Args:
    stored: the checkpoint's :func:`run_metadata` (None for checkpoints written before configs
      were stored: resumed with a warning that nothing could be checked).
    checkpoint_dir: the checkpoint, for messages.
    current: :func:`run_metadata` of this launch.
    allowed: fields allowed to differ anyway (``--allow_config_change``; ``'all'`` for every
      field); a field allows its sub-fields.

  Raises:
    checkpointing.ResumeRefused: naming each differing field, ``old -> new``.
  """
  if not isinstance(stored, Mapping) or not isinstance(stored.get("config"), Mapping):
    logging.warning("Checkpoint %s stores no run config (written before configs were stored); "
                    "resuming without checking that this launch's config matches it.",
                    checkpoint_dir)
    return
  allowed = tuple(allowed)
  diffs = config_differences(stored["config"], current["config"])
  refused = [d for d in diffs if not _allowed(d[0], allowed)]
  for field, old, new in diffs:
    if (field, old, new) not in refused:
      logging.warning("Resuming %s with %s changed: %r -> %r (allowed by "
                      "--allow_config_change).", checkpoint_dir, field, old, new)
  version = stored.get("semppl_jax_version")
  if version != current.get("semppl_jax_version"):
    logging.warning("Checkpoint %s was written by semppl_jax %s; this is %s.", checkpoint_dir,
                    version, current.get("semppl_jax_version"))
  if refused:
    lines = "\n".join(f"  {field}: {json.dumps(old)} -> {json.dumps(new)}"
                      for field, old, new in refused)
    raise checkpointing.ResumeRefused(
        f"refusing to resume {checkpoint_dir}: this launch's config differs from the run that "
        f"wrote it in {len(refused)} run-defining field(s) (saved -> now):\n{lines}\n"
        "Use another config.checkpoint_dir for a new run, relaunch with the saved values, or "
        "pass --allow_config_change=<field>[,<field>...] to resume anyway (training_steps: the "
        "learning-rate and target-EMA schedules are then recomputed for the new length).")
