"""Tests for semppl_jax.jaxline.run_config: which config changes a resume refuses."""
import logging

import pytest

from semppl_jax import checkpointing
from semppl_jax.jaxline import run_config
from tests.configs import tiny_fashion_mnist


def _metadata(**overrides):
  config = tiny_fashion_mnist.get_config()
  config.unlock()
  for field, value in overrides.items():
    node = config
    *parents, last = field.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return run_config.run_metadata(config)


def test_run_defining_changes_are_refused_with_a_named_diff():
  saved = _metadata()
  current = _metadata(**{
      "experiment_kwargs.config.objective": "relic",
      "experiment_kwargs.config.queue.size": 128,
      "experiment_kwargs.config.semppl.temperature": 0.1,
      "experiment_kwargs.config.data.label_percent": 10,
      "random_seed": 3, "training_steps": 8})
  with pytest.raises(checkpointing.ResumeRefused) as e:
    run_config.check_resume(saved, "run/1", current=current)
  text = str(e.value)
  assert "in 7 run-defining field(s)" in text, text  # training_steps is referenced twice.
  for line in ('experiment_kwargs.config.objective: "semppl" -> "relic"',
               "experiment_kwargs.config.queue.size: 64 -> 128",
               "experiment_kwargs.config.semppl.temperature: 0.2 -> 0.1",
               "experiment_kwargs.config.data.label_percent: 1 -> 10",
               "random_seed: 0 -> 3", "training_steps: 4 -> 8",
               "experiment_kwargs.config.training_steps: 4 -> 8"):
    assert f"  {line}\n" in text, (line, text)
  # The override names fields (or sub-trees); everything allowed resumes.
  with pytest.raises(checkpointing.ResumeRefused, match="in 1 run-defining"):
    run_config.check_resume(saved, "run/1", current=current, allowed=[
        "experiment_kwargs.config.objective", "experiment_kwargs.config.queue",
        "experiment_kwargs.config.semppl", "experiment_kwargs.config.data", "random_seed",
        "training_steps"])
  run_config.check_resume(saved, "run/1", current=current, allowed=["all"])


def test_cadence_logging_and_evaluation_may_change(caplog):
  saved = _metadata()
  current = _metadata(**{
      "experiment_kwargs.config.log_every_steps": 7,
      "experiment_kwargs.config.evaluation.every_steps": 2,
      "experiment_kwargs.config.evaluation.knn_ks": (3, 9),
      "experiment_kwargs.config.evaluate_at_end": False,
      "experiment_kwargs.config.summaries.plots": True,
      "experiment_kwargs.config.data.data_dir": "/elsewhere",
      "save_checkpoint_interval": 5, "max_checkpoints_to_keep": 9,
      "checkpoint_dir": "/moved", "log_train_data_interval": 3})
  run_config.check_resume(saved, "run/1", current=current)
  with caplog.at_level(logging.WARNING):
    run_config.check_resume(None, "run/1", current=current)  # A checkpoint of before.
  assert "stores no run config" in caplog.text
