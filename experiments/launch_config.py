"""The jaxline launch settings every semppl_jax config shares (one place, not one per config)."""
from jaxline import base_config
from ml_collections import config_dict


def launch_config(*, experiment_class: str, training_steps, checkpoint_dir,
                  experiment_config: config_dict.ConfigDict, log_interval: int,
                  save_interval: int, max_checkpoints_to_keep: int = 2) -> config_dict.ConfigDict:
  """A locked jaxline config around ``experiment_config`` (``experiment_kwargs.config``).

  Args:
    experiment_class: 'pretrain' or 'eval' (picked by experiments/launch.py).
    training_steps: int or ``FieldReference`` shared with ``experiment_config``.
    checkpoint_dir: run directory (str or ``FieldReference`` expression).
    experiment_config: the experiment's own config.
    log_interval: steps between TensorBoard scalar writes (jaxline logs 4x less often).
    save_interval: steps between checkpoints.
    max_checkpoints_to_keep: checkpoints kept on disk.
  """
  config = base_config.get_base_config()
  config.experiment_class = experiment_class
  config.training_steps = training_steps
  config.random_seed = 0
  config.interval_type = "steps"
  config.log_train_data_interval = log_interval
  config.log_tensors_interval = 4 * log_interval
  config.save_checkpoint_interval = save_interval
  config.max_checkpoints_to_keep = max_checkpoints_to_keep
  # Checkpoints are written in the background while training goes on (the step waits only for
  # the host copy of the state); False: every save blocks until it is on disk.
  config.save_checkpoint_async = True
  config.checkpoint_dir = checkpoint_dir
  config.train_checkpoint_all_hosts = True  # Orbax saves are collective: every host takes part.
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=experiment_config))
  config.lock()
  return config


# Step counts that make no sense beyond the run's length. Paths are relative to the launch config;
# a missing field (another experiment's config) is skipped, and 0 (= off) is kept.
STEP_FIELDS = (
    "experiment_kwargs.config.optimizer.warmup_steps",
    "experiment_kwargs.config.semppl.semantic_ramp_steps",
    "experiment_kwargs.config.log_every_steps",
    "experiment_kwargs.config.evaluation.every_steps",
    "experiment_kwargs.config.summaries.images_every_steps",
    "save_checkpoint_interval",
    "log_train_data_interval",
    "log_tensors_interval",
)


_SCALED = ("experiment_kwargs.config.optimizer.warmup_steps",)


def _lookup(config, path):
  """(parent ConfigDict, last key) of a dotted path, or None when a part is missing."""
  *parents, last = path.split(".")
  node = config
  for part in parents:
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  if not hasattr(node, "keys") or last not in node:
    return None
  return node, last


def fit_to_training_steps(config: config_dict.ConfigDict) -> str:
  """Fits every step-count field (:data:`STEP_FIELDS`) above ``training_steps`` to the run.

  A short run (``--config.training_steps=20``) then runs as asked instead of failing on the
  demo's 100 warm-up steps: a warm-up longer than the run becomes 10 % of it (the demo's share;
  the cosine decay needs steps after it), every other field is clamped to ``training_steps``
  (the semantic ramp ends with the run; the run still logs, evaluates, writes images and
  checkpoints at its last step). Fields at or below ``training_steps`` are not changed.

  Args:
    config: a launch config (``experiment_kwargs.config`` inside); modified in place.

  Returns:
    A one-line note naming each clamped field (its flag and old value), or '' when none was.
  """
  steps = config.get("training_steps")
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    return ""  # Nothing to fit to (a kNN evaluation runs 0 steps); the config check decides.
  changed = []
  for path in STEP_FIELDS:
    found = _lookup(config, path)
    if found is None:
      continue
    node, key = found
    value = node[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > steps:
      # A warm-up as long as the run would leave the cosine decay no step (and the peak
      # learning rate unused): it becomes 10 % of the run, the demo's share.
      node[key] = type(value)(steps // 10 if path in _SCALED else steps)
      changed.append(f"{path.replace('experiment_kwargs.config.', '')} {value} -> "
                     f"{node[key]:g}")
  if not changed:
    return ""
  return (f"[setup] training_steps={steps} is shorter than these step counts, fitted to the run: "
          f"{', '.join(changed)}")
