"""End-to-end tests of the SemPPL pre-training experiment (semppl_jax.jaxline.experiment).

Runs go through the real launcher (experiments/launch.py) in subprocesses, on 8 fake CPU
devices, with the tiny config in tests/configs. Config validation is tested in-process. A killed
run resuming bit-identical to an uninterrupted one is tests/test_faults.py's (kills inside a
save and after a step, plus a damaged newest checkpoint).
"""
import copy
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax.jaxline import experiment
from semppl_jax.jaxline import experiment_config

from launch_util import ROOT
from launch_util import final_module_state as _final_module_state
from launch_util import launch as _launch

sys.path.insert(0, os.path.join(ROOT, "tests", "configs"))
import tiny_fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position


def _check_trained_and_evaluated(stdout, run_dir, steps):
  assert f"[train] step {steps}/{steps}" in stdout
  for metric in ("online-probe top-1", "weighted kNN top-1 (test, k=5", "queue-kNN top-1",
                 "pseudo-label accuracy"):
    assert metric in stdout, stdout[-3000:]
  assert os.listdir(os.path.join(run_dir, "train"))  # TensorBoard event files.


@pytest.mark.e2e
def test_launcher_on_8_devices_trains_evaluates_and_checkpoints(tmp_path):
  stdout = _launch(tmp_path, 8)
  _check_trained_and_evaluated(stdout, tmp_path, 4)
  step, state = _final_module_state(tmp_path)
  assert step == 4
  queue = state["train_state"]["queue"]
  # Four steps of 8 labelled items filled 32 of the 64 slots of each of the 2 queues.
  assert (np.asarray(queue["labels"]) >= 0).sum() == 2 * 32


def _config():
  return copy.deepcopy(tiny_fashion_mnist.get_config().experiment_kwargs.config)


@pytest.mark.parametrize("field, value, message", [
    ("data.labelled_batch_size", 12, r"data.labelled_batch_size: 12 is not divisible by the "
     r"number of devices \(8\) and of processes \(1\); use a multiple of 8"),
    ("data.unlabelled_batch_size", 4, "data.unlabelled_batch_size: 4 is not divisible"),
    ("data.labelled_batch_size", 0, r"data.labelled_batch_size: must be in \[1, inf\], got 0"),
    ("data.labelled_batch_size", 72, r"queue.size: 64 is smaller than the labelled items "
     r"written per step \(data.labelled_batch_size=72\)"),
    ("queue.size", 60, "queue.size: 60 is not a multiple of the global number of devices"),
    ("semppl.knn_k", 65, r"semppl.knn_k: must be in \[1, 64\], got 65"),
    ("semppl.knn_k", 0, r"semppl.knn_k: must be in \[1, 64\], got 0"),
    ("views.large_size", 40, r"views.large_size: must be in \[1, 28\], got 40"),
    ("network.small_images", False, "network.small_images: the ImageNet stem"),
    ("network.encoder", "resnet7", "network.encoder: got 'resnet7', allowed: 'tiny_resnet'"),
    ("objective", "byol", "objective: got 'byol', allowed: 'semppl', 'relic', 'supervised'"),
    ("data.label_percent", 5, "data.label_percent: got 5, allowed: 1, 10"),
    ("semppl.temperature", 0.0, r"semppl.temperature: must be in \(0.0, inf\], got 0.0"),
    ("optimizer.warmup_steps", 99, r"optimizer.warmup_steps: must be in \[0, 4\], got 99"),
    ("optimizer.base_learning_rate", float("nan"), "optimizer.base_learning_rate: must be a "
     "finite number, got nan"),
    ("optimizer.base_learning_rate", -1.0, r"optimizer.base_learning_rate: must be in \[0.0"),
    ("optimizer.momentum", 1.5, r"optimizer.momentum: must be in \[0.0, 1.0\), got 1.5"),
    ("semppl.semantic_weight", float("nan"), "semppl.semantic_weight: must be a finite number"),
    ("evaluation.knn_ks", (), "evaluation.knn_ks: must be a non-empty tuple of ints >= 1"),
    ("evaluation.max_examples", -5, r"evaluation.max_examples: must be in \[0, inf\], got -5"),
    ("evaluation.knn_temperature", 0.0, r"evaluation.knn_temperature: must be in \(0.0"),
    ("evaluation.batch_size", 100, "evaluation.batch_size: 100 is not divisible by the number "
     "of devices"),
    ("views.blur_probability", (1.5, 0.1), r"views.blur_probability.0: must be in \[0.0, 1.0\]"),
])
def test_config_validation_names_field_and_allowed_values(field, value, message):
  config = _config()
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    experiment_config.validate_pretrain_config(config, num_devices=8)


def test_optional_antialias_field_is_checked():
  config = _config()
  with config.unlocked():
    config.views.antialias = "yes"
  with pytest.raises(ValueError, match="views.antialias: must be True or False, got 'yes'"):
    experiment_config.validate_pretrain_config(config, num_devices=8)


def test_valid_tiny_config_passes_validation():
  experiment_config.validate_pretrain_config(_config(), num_devices=8)


def test_labels_outside_num_classes_are_rejected():
  config = _config()
  config.data.num_classes = 5
  with pytest.raises(ValueError, match=r"config.data.num_classes.*must lie in \[0, 5\)"):
    experiment.DataSource(config.data, config.evaluation, experiment.Views(
        num_large=2, large_size=16, large_scale=(0.08, 1.0)))


@pytest.fixture(scope="module")
def tiny_experiment():
  config = _config()
  return experiment.Experiment("train", jax.random.PRNGKey(0), config)


@pytest.mark.slow
def test_hidden_labels_of_unlabelled_images_never_reach_the_update(tiny_experiment):
  exp = tiny_experiment
  for step in range(3):  # Fill the queues so that pseudo-labels exist.
    exp.step(global_step=step, rng=None)
  step_fn = exp._train_step  # pylint: disable=protected-access
  batch = exp._data.train_batch(3)  # pylint: disable=protected-access
  num_classes = exp.config.data.num_classes
  # The true hidden labels, then every image "labelled" c for each class c in turn.
  variants = [batch] + [dict(batch, unlabelled_labels=np.full_like(batch["unlabelled_labels"], c))
                        for c in range(num_classes)]
  from semppl_jax import parallel  # pylint: disable=g-import-not-at-top
  first_state, first_aux, accuracies = None, None, []
  for b in variants:
    state = jax.tree_util.tree_map(jnp.copy, exp._train_state)  # pylint: disable=protected-access
    with jax.set_mesh(exp._mesh):  # pylint: disable=protected-access
      new_state, aux = step_fn(state, parallel.host_local_to_global(b, exp._mesh),  # pylint: disable=protected-access
                               jax.random.PRNGKey(3))
    new_state, aux = jax.device_get(new_state), jax.device_get(aux)
    if first_state is None:
      first_state, first_aux = new_state, aux
      continue
    assert aux["loss"] == first_aux["loss"]
    for a, b_leaf in zip(jax.tree_util.tree_leaves(first_state), jax.tree_util.tree_leaves(new_state)):
      np.testing.assert_array_equal(a, b_leaf)
    accuracies.append(float(aux["pseudo_label_accuracy"]))
  # The monitor does read them (it is their only reader): every covered image's pseudo-label is
  # exactly one class, so the per-class "accuracies" sum to the coverage.
  assert first_aux["pseudo_label_coverage"] == 1.0
  np.testing.assert_allclose(sum(accuracies), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_run_trains_and_reports_window_means_and_train_state_round_trips(tiny_experiment):
  """The public loop (``run``) and state (``train_state``) scripts use instead of privates."""
  exp = tiny_experiment
  logs = []
  last = exp.run(6, on_log=lambda done, means: logs.append((done, means)), start=3, log_every=2)
  assert [done for done, _ in logs] == [4, 6]
  assert last == logs[-1][1] and np.isfinite(last["loss"]) and "queue_fill" in last
  saved = jax.device_get(exp.train_state)
  assert exp.run(6, start=6) == {}  # Nothing left to run.
  exp.run(7, start=6)
  exp.train_state = saved  # Placed again, with the experiment's shardings.
  placed = exp.train_state
  assert placed.queue.labels.sharding.spec == jax.sharding.PartitionSpec(None, "data")
  for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(placed)):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.slow
def test_queue_knn_monitor_queries_like_the_labeller():
  """With semppl.knn_query='target' the evaluation's queue-kNN monitor votes with the target
  projections of the test images, as the training labeller does."""
  from semppl_jax import knn  # pylint: disable=g-import-not-at-top
  from semppl_jax import losses  # pylint: disable=g-import-not-at-top
  config = _config()
  config.semppl.knn_query = "target"
  exp = experiment.Experiment("train", jax.random.PRNGKey(0), config)
  for step in range(2):
    exp.step(global_step=step, rng=None)
  results = exp.evaluate(global_step=2, rng=None)
  state = exp.train_state
  images, labels = [], []
  for batch in exp._data.eval_batches("test"):  # pylint: disable=protected-access
    images.append(np.asarray(batch["images"])[np.asarray(batch["mask"])])
    labels.append(np.asarray(batch["labels"])[np.asarray(batch["mask"])])
  images, labels = np.concatenate(images), np.concatenate(labels)
  nets = exp._nets  # pylint: disable=protected-access
  from semppl_jax import evaluation  # pylint: disable=g-import-not-at-top
  views = evaluation.eval_view(jnp.asarray(images), images.shape[1])
  proj, _ = nets.target.apply(state.target_params, state.target_state, None, views, False)
  queries = jnp.broadcast_to(losses.l2_normalize(proj), (2,) + proj.shape)
  pseudo = knn.pseudo_labels(jax.device_get(queries), jax.device_get(state.queue),
                             k=config.semppl.knn_k, num_classes=config.data.num_classes)
  np.testing.assert_allclose(results["queue_knn_top1"], np.mean(np.asarray(pseudo) == labels),
                             atol=1e-6)
  # The online predictions' vote scores differently here, so the check above can fail.
  (_, _, pred), _ = nets.online.apply(state.online_params, state.online_state, None, views, False)
  by_prediction = knn.pseudo_labels(
      jnp.broadcast_to(losses.l2_normalize(pred), (2,) + pred.shape), jax.device_get(state.queue),
      k=config.semppl.knn_k, num_classes=config.data.num_classes)
  assert np.mean(np.asarray(by_prediction) == labels) != results["queue_knn_top1"]


def test_tiny_option_of_the_demo_config():
  from experiments import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config("tiny")
  c = config.experiment_kwargs.config
  assert config.training_steps == c.training_steps == 4  # One shared reference.
  assert c.data.labelled_batch_size == 8 and c.views.large_size == 16 and c.queue.size == 64
  experiment_config.validate_pretrain_config(c, num_devices=8)
  assert fashion_mnist.get_config().training_steps == 1000  # The demo is untouched.
  with pytest.raises(ValueError, match="unknown preset; known: '', 'smoke', 'tiny'"):
    fashion_mnist.get_config("huge")


@pytest.mark.slow
def test_imagenet_data_path_trains_and_evaluates_on_mock_data():
  """The experiment's ImageNet branch (tf.data batches, tfds eval splits) on tfds mock data."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _config()
  config.data.update(dict(dataset="imagenet", num_classes=1000, image_size=32,
                          label_percent=10))
  config.views.update(dict(large_size=16, small_size=8))
  config.evaluation.update(dict(batch_size=32, max_examples=0))
  with tfds.testing.mock_data(num_examples=64):
    exp = experiment.Experiment("train", jax.random.PRNGKey(0), config)
    scalars = [exp.step(global_step=s, rng=None) for s in range(2)]
    results = exp.evaluate(global_step=2, rng=None)
  assert all(np.isfinite(s["loss"]) for s in scalars)
  assert scalars[1]["queue_fill"] == 8 / 64  # Measured before that step's enqueue.
  for key in ("probe_top1", "knn_top1_k5", "queue_knn_top1"):
    assert 0.0 <= results[key] <= 1.0


@pytest.mark.slow
def test_relic_runs_its_knn_monitor_every_knn_monitor_every_steps():
  """relic with semppl.knn_monitor_every=2: the kNN monitors (and queue_fill) come from
  train.knn_monitor at steps 0, 2, ... only; the window mean averages those steps."""
  config = _config()
  config.objective = "relic"
  config.semppl.knn_monitor_every = 2
  config.log_every_steps = 4  # One window over the four steps.
  exp = experiment.Experiment("train", jax.random.PRNGKey(0), config)
  monitors = {"pseudo_label_accuracy", "pseudo_label_coverage", "queue_fill"}
  for step in range(4):
    metrics = exp.step(global_step=step, rng=None)
    assert monitors & set(metrics) == (monitors if step % 2 == 0 else set()), step
  assert float(jax.device_get(metrics["loss"])) > 0
  # Step 2 saw the 2 x 8 labelled items of steps 0 and 1 in each 64-slot queue.
  assert exp.recent_mean("queue_fill") == pytest.approx((0.0 + 0.25) / 2)
  assert np.isfinite(exp.recent_mean("pseudo_label_coverage"))
  exp._check_finite()  # pylint: disable=protected-access
