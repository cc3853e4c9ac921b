"""Paper-scale configs against their provenance tables (issue #10, fix 1).

Every field of the experiment config of ``experiments/imagenet_r50_{1,10}pct.py`` and
``experiments/eval_imagenet.py`` must appear in the file's table with the same value and a source
from the allowed list, and the table must name no field the config lacks.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# The checkout must be on sys.path before the experiments package is imported.
from experiments import eval_imagenet  # noqa: E402
from experiments import imagenet_r50  # noqa: E402
from experiments import imagenet_r50_10pct  # noqa: E402
from experiments import imagenet_r50_1pct  # noqa: E402
from semppl_jax.jaxline import experiment_config  # noqa: E402

ALLOWED_SOURCES = {"paper", "ReLICv2", "BYOL", "our choice"}


def flatten(config, prefix=""):
  """``{'a.b': leaf}`` of a ConfigDict (FieldReferences resolved, lists as tuples)."""
  out = {}
  for key in config.keys():
    value = config[key]
    path = f"{prefix}{key}"
    if hasattr(value, "keys"):
      out.update(flatten(value, path + "."))
    else:
      out[path] = tuple(value) if isinstance(value, (list, tuple)) else value
  return out


def check_against_table(config, table):
  fields = flatten(config)
  rows = {row.path: row for row in table}
  assert len(rows) == len(table), "a field is listed twice"
  assert sorted(fields) == sorted(rows), (
      f"config fields without provenance: {sorted(set(fields) - set(rows))}; "
      f"table rows without a config field: {sorted(set(rows) - set(fields))}")
  for path, value in fields.items():
    row = rows[path]
    expected = tuple(row.value) if isinstance(row.value, (list, tuple)) else row.value
    assert value == expected and type(value) is type(expected), (
        f"{path}: config runs {value!r}, the table says {expected!r}")
    assert row.source in ALLOWED_SOURCES, f"{path}: source {row.source!r}"
    assert row.note.strip(), f"{path}: the table gives no reason"


@pytest.mark.parametrize("module, percent", [(imagenet_r50_1pct, 1), (imagenet_r50_10pct, 10)])
def test_imagenet_pretrain_configs_match_their_provenance(module, percent):
  config = module.get_config()
  c = config.experiment_kwargs.config
  check_against_table(c, imagenet_r50.provenance(percent))
  assert config.training_steps == c.training_steps == imagenet_r50.EPOCHS * (
      imagenet_r50.STEPS_PER_EPOCH)
  assert config.checkpoint_dir == f"runs/imagenet_r50_{percent}pct"
  experiment_config.validate_pretrain_config(c, num_devices=8)


def test_imagenet_runs_design_k_not_the_demo_k():
  # The bug of issue #10: the ImageNet configs inherited the Fashion-MNIST demo's k = 5.
  c = imagenet_r50_1pct.get_config().experiment_kwargs.config
  assert c.semppl.knn_k == 1
  rows = {r.path: r for r in imagenet_r50.provenance(1)}
  assert rows["semppl.knn_k"].value == 1
  assert "k = 1" in imagenet_r50.__doc__


def test_provenance_tables_use_the_allowed_sources():
  assert set(imagenet_r50.SOURCES) == ALLOWED_SOURCES
  assert set(eval_imagenet.SOURCES) == ALLOWED_SOURCES


def test_a_drifted_config_fails_the_check():
  c = imagenet_r50_1pct.get_config().experiment_kwargs.config
  c.semppl.knn_k = 5
  with pytest.raises(AssertionError, match="semppl.knn_k"):
    check_against_table(c, imagenet_r50.provenance(1))
  c = imagenet_r50.get_experiment_config(1, imagenet_r50.EPOCHS * imagenet_r50.STEPS_PER_EPOCH)
  c.semppl.new_field = 3
  with pytest.raises(AssertionError, match="new_field"):
    check_against_table(c, imagenet_r50.provenance(1))


def test_imagenet_eval_config_matches_its_provenance():
  config = eval_imagenet.get_config()
  c = config.experiment_kwargs.config
  check_against_table(c, eval_imagenet.provenance())
  # Exactly the fields the evaluation experiment requires.
  required = experiment_config._EVAL_FIELDS  # pylint: disable=protected-access
  assert sorted(flatten(c)) == sorted(required)
  c.checkpoint.path = "/ckpts/semppl_r50_1pct.pkl"
  experiment_config.validate_eval_config(c, num_devices=8)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: short runs and the smoke preset (issue #22).
# ----------------------------------------------------------------------------------------------

from experiments import eval_fashion_mnist  # noqa: E402
from experiments import fashion_mnist  # noqa: E402
from experiments import launch_config  # noqa: E402


def test_a_short_run_fits_its_step_counts_and_validates():
  config = fashion_mnist.get_config()
  config.training_steps = 20
  note = launch_config.fit_to_training_steps(config)
  c = config.experiment_kwargs.config
  assert c.training_steps == 20
  assert c.optimizer.warmup_steps == 2  # 10 % of the run: the cosine decay keeps 18 steps.
  assert (c.log_every_steps, c.evaluation.every_steps, c.summaries.images_every_steps) == (
      20, 20, 20)
  assert (config.save_checkpoint_interval, config.log_train_data_interval,
          config.log_tensors_interval) == (20, 20, 20)
  assert c.evaluation.subset == 1000 and c.queue.size == 2560  # Not step counts: unchanged.
  assert note.count("\n") == 0 and note.startswith("[setup] training_steps=20 ")
  for part in ("optimizer.warmup_steps 100 -> 2", "log_every_steps 25 -> 20",
               "evaluation.every_steps 200 -> 20", "save_checkpoint_interval 200 -> 20"):
    assert part in note, note
  experiment_config.validate_pretrain_config(c, num_devices=8)


def test_fitting_keeps_fields_within_the_run_and_off_switches():
  config = fashion_mnist.get_config()
  config.training_steps = 500
  c = config.experiment_kwargs.config
  c.summaries.images_every_steps = 0  # off
  note = launch_config.fit_to_training_steps(config)
  assert (c.optimizer.warmup_steps, c.log_every_steps, c.evaluation.every_steps,
          c.summaries.images_every_steps) == (100, 25, 200, 0)
  assert note == ""
  assert launch_config.fit_to_training_steps(fashion_mnist.get_config()) == ""
  # A kNN evaluation runs no step: nothing to fit to.
  knn = eval_fashion_mnist.get_config()
  knn.training_steps = 0
  assert launch_config.fit_to_training_steps(knn) == ""


def test_smoke_preset_is_short_and_valid():
  config = fashion_mnist.get_config("smoke")
  c = config.experiment_kwargs.config
  assert config.training_steps == c.training_steps == 60
  assert config.checkpoint_dir == "runs/fashion_mnist_smoke"
  assert launch_config.fit_to_training_steps(config) == ""  # Already fits.
  experiment_config.validate_pretrain_config(c, num_devices=8)
  assert fashion_mnist.get_config().training_steps == 1000  # The demo is unchanged.
  with pytest.raises(ValueError, match="unknown preset"):
    fashion_mnist.get_config("smokey")
