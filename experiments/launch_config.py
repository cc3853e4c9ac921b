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
  config.checkpoint_dir = checkpoint_dir
  config.train_checkpoint_all_hosts = True  # Orbax saves are collective: every host takes part.
  config.experiment_kwargs = config_dict.ConfigDict(dict(config=experiment_config))
  config.lock()
  return config
