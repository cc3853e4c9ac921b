"""The objective's research switches in the pre-training config: checked by name, refused where
they cannot work, and announced on the setup line."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import fashion_mnist  # noqa: E402
from semppl_jax import train  # noqa: E402
from semppl_jax.jaxline import experiment  # noqa: E402
from semppl_jax.jaxline import experiment_config  # noqa: E402


def _config(**semppl):
  c = fashion_mnist.get_experiment_config(100)
  c.semppl.update(semppl)
  return c


@pytest.mark.parametrize("field,value,message", [
    ("pseudo_labels", "truth", r"config.semppl.pseudo_labels: .*'truth'"),
    ("semantic_negatives", "rows", r"config.semppl.semantic_negatives: .*'rows'"),
    ("oracle_accuracy", 1.5, r"config.semppl.oracle_accuracy: .*1.5"),
    ("semantic_invariance_weight", -1.0, r"config.semppl.semantic_invariance_weight: .*-1"),
    ("knn_query", "embedding", r"config.semppl.knn_query: .*'embedding'"),
    ("min_vote_agreement", -0.5, r"config.semppl.min_vote_agreement: .*-0.5"),
    ("precision", "fast", r"config.semppl.precision: .*'fast'"),
    ("knn_monitor_every", 0, r"config.semppl.knn_monitor_every: .*0"),
])
def test_bad_switch_values_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    experiment_config.validate_pretrain_config(_config(**{field: value}), num_devices=1)


def test_oracle_is_refused_for_data_without_hidden_labels():
  c = _config(pseudo_labels="oracle")
  c.data.dataset = "image_folder"
  with pytest.raises(ValueError, match="config.semppl.pseudo_labels: 'oracle' reads the hidden "
                     "labels"):
    experiment_config.validate_pretrain_config(c, num_devices=1)


def test_switches_reach_the_typed_config_and_the_setup_line():
  c = _config(pseudo_labels="noisy_oracle", oracle_accuracy=0.55,
              semantic_negatives="augmentation", semantic_invariance_weight=0.0,
              knn_query="target", min_vote_agreement=0.75)
  experiment_config.validate_pretrain_config(c, num_devices=1)
  t = experiment_config.train_config(c, 1)
  assert (t.loss.knn_query, t.loss.min_vote_agreement) == ("target", 0.75)
  assert (t.loss.pseudo_labels, t.loss.oracle_accuracy) == ("noisy_oracle", 0.55)
  assert (t.loss.semantic_negatives, t.loss.semantic_invariance_weight) == ("augmentation", 0.0)
  assert "ORACLE pseudo-labels (noisy_oracle, accuracy 0.55)" in experiment._oracle_note(t)
  assert experiment._oracle_note(experiment_config.train_config(_config(), 1)) == ""
  relic = experiment_config.train_config(_config(pseudo_labels="oracle"), 1)
  assert experiment._oracle_note(train.TrainConfig(**{**relic.__dict__, "objective": "relic"})) == ""


def test_cost_switches_resolve_per_backend():
  """semppl.precision='auto' is exact float32 on CPU and the backend's default elsewhere; the
  approximate kNN top-k is used on TPU only; queue.dtype reaches the typed config."""
  c = _config(knn_approximate=True, knn_monitor_every=50)
  c.queue.dtype = "bfloat16"
  experiment_config.validate_pretrain_config(c, num_devices=1)
  cpu = experiment_config.train_config(c, 1, backend="cpu")
  tpu = experiment_config.train_config(c, 1, backend="tpu")
  gpu = experiment_config.train_config(c, 1, backend="gpu")
  assert (cpu.loss.precision, gpu.loss.precision, tpu.loss.precision) == (
      "highest", "default", "default")
  assert (cpu.loss.knn_approximate, gpu.loss.knn_approximate, tpu.loss.knn_approximate) == (
      False, False, True)
  assert cpu.queue_dtype == "bfloat16" and cpu.loss.knn_monitor_every == 50
  c.semppl.precision = "highest"
  assert experiment_config.train_config(c, 1, backend="tpu").loss.precision == "highest"
  c.queue.dtype = "float16"
  with pytest.raises(ValueError, match=r"config.queue.dtype: .*'float16'"):
    experiment_config.validate_pretrain_config(c, num_devices=1)
  # The shipped default keeps CPU float32 numerics as they were.
  default = experiment_config.train_config(_config(), 1, backend="cpu")
  assert (default.loss.precision, default.queue_dtype, default.loss.knn_monitor_every) == (
      "highest", "float32", 1)
