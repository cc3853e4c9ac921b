"""Tests for semppl_jax.jaxline.eval_experiment: fine-tune / linear / kNN evaluation on Fashion-MNIST.

Tiny setting throughout: tiny_resnet (small-image stem), 16 px views, 1 % labels (600 labelled
images), 32 labelled images per step, 200 test images, 8 fake CPU devices. The encoders under
test are random numpy trees written as a pre-training Orbax checkpoint and as a release .pkl, so
loading is checked value for value without any pre-training compile.
"""
import copy
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from semppl_jax import checkpointing as ck
from semppl_jax import encoders
from semppl_jax.jaxline import eval_experiment as ev
from semppl_jax.jaxline import compat as jaxline_compat
from semppl_jax.jaxline import experiment_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from experiments import eval_fashion_mnist  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import eval_imagenet  # pylint: disable=g-import-not-at-top,wrong-import-position

jaxline_compat.install()
from jaxline import base_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxline import train  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_TEST = 200


# ----------------------------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------------------------


def _tiny_config(protocol, steps, source="none", path=""):
  """The Fashion-MNIST eval config shrunk to test size."""
  c = eval_fashion_mnist.get_experiment_config(steps, protocol)
  c.checkpoint.source = source
  c.checkpoint.path = path
  c.data.label_percent = 1
  c.data.batch_size = 32
  c.augmentation.crop_size = 16
  c.evaluation.batch_size = NUM_TEST
  c.evaluation.max_examples = NUM_TEST
  c.log_every_steps = 1
  return c


def _host(tree):
  return jax.tree_util.tree_map(lambda x: np.array(jax.device_get(x)), tree)


def _assert_trees_equal(a, b):
  a, b = _host(a), _host(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _all_leaves_differ(a, b):
  """True when every float leaf of a differs somewhere from b's."""
  a, b = _host(a), _host(b)
  return all(not np.array_equal(x, y) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
             if x.dtype.kind == "f")


@pytest.fixture(scope="module")
def encoder():
  """Random (params, state) numpy trees of tiny_resnet (small images, width 1): He-scaled
  weights, BatchNorm statistics with positive variances (usable in inference mode)."""
  shapes_p, shapes_s = ck.expected_tree("tiny_resnet", small_images=True)
  rng = np.random.RandomState(0)

  def leaf(module, name, sd):
    if name == "w":
      return (rng.normal(size=sd.shape) * np.sqrt(2.0 / np.prod(sd.shape[:-1]))).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.normal(size=sd.shape)).astype(np.float32)
    if name == "counter":
      return np.asarray(rng.randint(1, 1000), np.int32)
    if module.endswith("var_ema"):
      return rng.uniform(0.5, 1.5, size=sd.shape).astype(np.float32)
    return (0.1 * rng.normal(size=sd.shape)).astype(np.float32)

  tree = lambda shapes: {m: {n: leaf(m, n, sd) for n, sd in leaves.items()}
                         for m, leaves in shapes.items()}
  return tree(shapes_p), tree(shapes_s)


@pytest.fixture(scope="module")
def heads():
  """Pre-training head modules (names as in semppl_jax.train.build_networks)."""
  rng = np.random.RandomState(1)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  params = {"projector/linear": {"w": f(32, 8), "b": f(8)},
            "projector/batch_norm": {"scale": f(8), "offset": f(8)},
            "projector/linear_1": {"w": f(8, 4)},
            "predictor/linear": {"w": f(4, 8), "b": f(8)},
            "classifier": {"w": f(32, 10), "b": f(10)}}
  state = {"projector/batch_norm/~/mean_ema": {"counter": np.int32(3), "hidden": f(8),
                                                "average": f(8)}}
  return params, state


class _FakePretrain:
  """Stands in for the pre-training experiment: its snapshot layout, no compile."""

  def __init__(self, encoder, heads):
    params = {**encoder[0], **heads[0]}
    state = {**encoder[1], **heads[1]}
    self.train_state = {
        "online_params": params, "online_state": state,
        "target_params": copy.deepcopy(encoder[0]), "target_state": copy.deepcopy(encoder[1]),
        "opt_state": {"trace": jax.tree_util.tree_map(np.zeros_like, params)},
        "classifier_params": heads[0]["classifier"],
        "queue": {"embeddings": np.zeros((2, 16, 4), np.float32),
                  "labels": np.full((2, 16), -1, np.int32), "position": np.int32(0)}}

  def snapshot_state(self):
    return {"train_state": self.train_state}


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory, encoder, heads):
  """``<checkpoint_dir>/checkpoints`` of a fake pre-training run at global step 123, written by
  the launcher's checkpointer (two saves; the newest must be read)."""
  directory = str(tmp_path_factory.mktemp("pretrain") / "checkpoints")
  checkpointer = ck.OrbaxCheckpointer(directory, max_to_keep=2)
  state = checkpointer.get_experiment_state("latest")
  state.experiment_module = _FakePretrain(
      jax.tree_util.tree_map(lambda x: x + 1, encoder), heads)
  state.global_step = 7
  checkpointer.save("latest")
  state.experiment_module = _FakePretrain(encoder, heads)
  state.global_step = 123
  state.train_step_rng = np.zeros((2,), np.uint32)
  checkpointer.save("latest")
  checkpointer.close()
  return directory


@pytest.fixture(scope="module")
def release_pkl(tmp_path_factory, encoder, heads):
  """A release-format .pkl (replica axis, heads included) of the fake encoder."""
  path = str(tmp_path_factory.mktemp("release") / "semppl_tiny.pkl")
  ck.export_release_checkpoint(path, encoder[0], encoder[1], step=5, rng=np.zeros(2, np.uint32),
                               head_params=heads[0], head_state=heads[1], replica_axis=True)
  return path


@pytest.fixture(scope="module")
def jaxline_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _jaxline_config(experiment_config, checkpoint_dir, steps):
  config = base_config.get_base_config()
  config.training_steps = steps
  config.interval_type = "steps"
  config.save_checkpoint_interval = 1
  config.log_tensors_interval = 1000
  config.log_train_data_interval = None
  config.random_seed = 0
  config.checkpoint_dir = checkpoint_dir
  config.experiment_kwargs = {"config": experiment_config}
  return config


def _run_jaxline(experiment_config, directory, steps):
  checkpointer = ck.OrbaxCheckpointer(os.path.join(directory, "checkpoints"), max_to_keep=3)
  train.train(ev.EvalExperiment, _jaxline_config(experiment_config, directory, steps),
              checkpointer, None)
  state = checkpointer.get_experiment_state("latest")
  checkpointer.close()
  return state


def _eval_lines(text, protocol):
  return [l for l in text.splitlines() if l.startswith(f"[eval {protocol}]")]


# ----------------------------------------------------------------------------------------------
# Numpy references.
# ----------------------------------------------------------------------------------------------


def _reference_linear_top1(emb, w, b, labels, mask):
  pred = np.argmax(emb.astype(np.float64) @ w.astype(np.float64) + b, axis=-1)
  return np.sum((pred == labels) & mask) / np.sum(mask)


def _reference_knn_predictions(queries, bank, bank_labels, k, num_classes, temperature):
  norm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sims = norm(queries.astype(np.float64)) @ norm(bank.astype(np.float64)).T
  sims[:, bank_labels < 0] = -np.inf
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  scores = np.zeros((queries.shape[0], num_classes))
  for i in range(queries.shape[0]):
    for j in order[i]:
      if bank_labels[j] >= 0:
        scores[i, bank_labels[j]] += np.exp(sims[i, j] / temperature)
  return np.argmax(scores, axis=1)


# ----------------------------------------------------------------------------------------------
# Protocols end to end.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, pretrain_dir, jaxline_flags):
  """The linear protocol through jaxline's train (2 steps, a checkpoint per step), then a
  second launch on the same directory, which must resume instead of retraining."""
  directory = str(tmp_path_factory.mktemp("linear"))
  config = _tiny_config("linear", 2, source="pretrain", path=pretrain_dir)
  import contextlib
  import io  # pylint: disable=g-import-not-at-top,multiple-imports
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    first = _run_jaxline(config, directory, 2)
  first_train_state = _host(first.experiment_module._train_state)  # pylint: disable=protected-access
  out2 = io.StringIO()
  with contextlib.redirect_stdout(out2):
    second = _run_jaxline(config, directory, 2)
  return first, first_train_state, out.getvalue(), second, out2.getvalue()


@pytest.mark.slow
def test_linear_end_to_end_reports_named_metric(linear_run):
  first, _, out, _, _ = linear_run
  lines = _eval_lines(out, "linear")
  assert any("protocol=linear" in l for l in lines)
  assert any("pre-training checkpoint" in l and "(step 123)" in l for l in lines)
  top1 = [l for l in lines if "linear top-1 (test, 200 images)" in l]
  assert len(top1) == 1
  assert re.search(r"\[linear\] step 2/2 \|", out)
  assert first.global_step == 2


@pytest.mark.slow
def test_linear_keeps_encoder_params_and_bn_state_exactly(linear_run, encoder):
  _, state, _, _, _ = linear_run
  _assert_trees_equal(state["encoder_params"], encoder[0])
  _assert_trees_equal(state["encoder_state"], encoder[1])
  assert "encoder" not in state["opt_state"]


@pytest.mark.slow
def test_linear_metric_matches_numpy_reference(linear_run):
  first, state, _, _, _ = linear_run
  experiment = first.experiment_module
  results = experiment.evaluate(global_step=2, rng=None)
  assert set(results) == {"linear_top1", "num_test_examples", "global_step"}
  assert 0.0 <= results["linear_top1"] <= 1.0
  assert results["num_test_examples"] == NUM_TEST
  emb, logits, labels, mask = _host(experiment.embed_split("test", NUM_TEST))
  head = state["head_params"]["linear"]
  np.testing.assert_allclose(logits, emb @ head["w"] + head["b"], rtol=1e-4, atol=1e-4)
  ref = _reference_linear_top1(emb, head["w"], head["b"], labels, mask)
  assert results["linear_top1"] == pytest.approx(ref, abs=1e-6)
  assert mask.sum() == NUM_TEST


@pytest.mark.slow
def test_linear_resumes_from_its_checkpoint(linear_run):
  _, first_state, _, second, out2 = linear_run
  # The second launch restored step 2 and only evaluated: no training line, same head.
  assert second.global_step == 2
  assert "[linear] step" not in out2
  assert _eval_lines(out2, "linear")
  _assert_trees_equal(second.experiment_module._train_state, first_state)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def fine_tune(release_pkl):
  """A fine-tune experiment on the release .pkl encoder, in process."""
  return ev.EvalExperiment("train", jax.random.PRNGKey(0),
                           _tiny_config("fine_tune", 3, source="release", path=release_pkl))


def test_release_pkl_encoder_loads_exactly(fine_tune, encoder):
  # First check before any step: the loaded encoder is the exported one, value for value.
  state = fine_tune._train_state  # pylint: disable=protected-access
  _assert_trees_equal(state["encoder_params"], encoder[0])
  _assert_trees_equal(state["encoder_state"], encoder[1])


def test_fine_tune_changes_encoder_and_resumes_exactly(fine_tune, encoder):
  scalars = fine_tune.step(global_step=0, rng=None)
  assert set(scalars) == {"fine_tune_loss", "fine_tune_train_top1",
                          "fine_tune_head_learning_rate", "fine_tune_encoder_learning_rate"}
  assert np.isfinite(scalars["fine_tune_loss"])
  snapshot = _host(fine_tune.snapshot_state())
  fine_tune.step(global_step=1, rng=None)
  after = _host(fine_tune.snapshot_state())
  # Restored at step 1 and re-run: bit-identical (fold_in(root, step) keys, data by step).
  fine_tune.restore_from_snapshot(snapshot)
  fine_tune.step(global_step=1, rng=None)
  _assert_trees_equal(fine_tune.snapshot_state(), after)
  state = after["train_state"]
  assert _all_leaves_differ(state["encoder_params"], encoder[0])
  bn_stats = {m: v for m, v in state["encoder_state"].items()}
  assert _all_leaves_differ(bn_stats, encoder[1])
  results = fine_tune.evaluate(global_step=2, rng=None)
  assert set(results) == {"fine_tune_top1", "num_test_examples", "global_step"}
  assert 0.0 <= results["fine_tune_top1"] <= 1.0


@pytest.mark.slow
def test_knn_with_zero_steps_through_jaxline(tmp_path, jaxline_flags, capsys):
  config = _tiny_config("knn", 0)
  state = _run_jaxline(config, str(tmp_path), 0)
  out = capsys.readouterr().out
  lines = _eval_lines(out, "knn")
  assert any("random initialisation" in l for l in lines)
  for k in (20, 200):
    assert sum(f"kNN top-1 (k={k}," in l for l in lines) == 1
  assert os.listdir(tmp_path / "checkpoints" / "latest")  # The final checkpoint.
  experiment = state.experiment_module
  results = experiment.evaluate(global_step=0, rng=None)
  assert set(results) == {"knn_top1", "knn_top1_k20", "knn_top1_k200", "num_test_examples",
                          "global_step"}
  assert results["knn_top1"] == results["knn_top1_k20"]
  emb, _, labels, mask = _host(experiment.embed_split("test", NUM_TEST))
  bank, _, bank_labels, bank_mask = _host(experiment.embed_split("bank"))
  assert bank_mask.sum() == 600  # The 1 % labelled split.
  bank_labels = np.where(bank_mask, bank_labels, -1)
  for k in (20, 200):
    assert 0.0 <= results[f"knn_top1_k{k}"] <= 1.0
    pred = _reference_knn_predictions(emb, bank, bank_labels, k, 10, 0.07)
    ref = np.sum((pred == labels) & mask) / np.sum(mask)
    assert results[f"knn_top1_k{k}"] == pytest.approx(ref, abs=1e-6)


@pytest.mark.e2e
def test_launcher_runs_knn_on_a_pretraining_checkpoint(tmp_path, pretrain_dir):
  """experiments/launch.py with the Fashion-MNIST eval config and command-line overrides."""
  prefix = "--config.experiment_kwargs.config."
  cmd = [sys.executable, os.path.join(REPO, "experiments", "launch.py"),
         "--config=" + os.path.join(REPO, "experiments", "eval_fashion_mnist.py"),
         f"{prefix}protocol=knn",  # training_steps stays 300: kNN ignores it.
         f"{prefix}checkpoint.path={pretrain_dir}", f"{prefix}data.label_percent=1",
         f"{prefix}augmentation.crop_size=16", f"{prefix}evaluation.batch_size={NUM_TEST}",
         f"{prefix}evaluation.max_examples={NUM_TEST}", f"--config.checkpoint_dir={tmp_path}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _eval_lines(proc.stdout, "knn")
  assert any("(step 123)" in l for l in lines)
  values = [float(m) for l in lines for m in re.findall(r": ([0-9.]+)%$", l)]
  assert len(values) == 2 and all(0 <= v <= 100 for v in values)
  assert "[knn] step" not in proc.stdout
  assert os.listdir(tmp_path / "checkpoints" / "latest")


# ----------------------------------------------------------------------------------------------
# Encoder sources and mismatches.
# ----------------------------------------------------------------------------------------------


def test_load_pretrain_encoder_takes_encoder_modules_of_newest(pretrain_dir, encoder):
  params, state, step = encoders.load_pretrain_encoder(pretrain_dir)
  assert step == 123
  _assert_trees_equal(params, encoder[0])
  _assert_trees_equal(state, encoder[1])
  # A series directory or a single checkpoint directory work too.
  p2, _, _ = encoders.load_pretrain_encoder(os.path.join(pretrain_dir, "latest"))
  _assert_trees_equal(p2, encoder[0])


def test_encoder_modules_drops_heads():
  tree = {"tiny_res_net/~/initial_conv": 1, "projector/linear": 2, "predictor/linear_1": 3,
          "classifier": 4, "classifier_probe/linear": 5}
  assert encoders.encoder_modules(tree) == {"tiny_res_net/~/initial_conv": 1}


def test_mismatched_release_architecture_lists_differences(release_pkl):
  config = _tiny_config("knn", 0, source="release", path=release_pkl)
  config.network.width_multiplier = 2
  with pytest.raises(ck.CheckpointError) as info:
    ev.EvalExperiment("train", jax.random.PRNGKey(0), config)
  message = str(info.value)
  assert "config.checkpoint.path" in message and "width_multiplier=2" in message
  assert "params: tiny_res_net/~/initial_conv/w has shape (3, 3, 3, 16), expected (3, 3, 3, 32)" \
      in message
  assert re.search(r"\d+ difference\(s\)", message)


def test_mismatched_pretrain_architecture_lists_differences(pretrain_dir):
  config = _tiny_config("linear", 2, source="pretrain", path=pretrain_dir)
  config.network.encoder = "resnet18"
  with pytest.raises(ValueError) as info:  # CheckpointError is a ValueError.
    ev.EvalExperiment("train", jax.random.PRNGKey(0), config)
  message = str(info.value)
  assert "pre-training checkpoint" in message and "encoder='resnet18'" in message
  assert re.search(r"\d+ difference\(s\) \(\d+ missing, \d+ unexpected, 0 of another shape\)",
                   message)
  assert "params: missing res_net18/~/block_group_0/~/block_0/~/conv_0/w (expected shape " \
         "(3, 3, 64, 64))" in message
  assert "more" in message  # Long lists are cut.


def test_missing_checkpoint_paths_raise(tmp_path):
  with pytest.raises(ck.CheckpointError, match="is not a directory"):
    encoders.load_pretrain_encoder(str(tmp_path / "nope"))
  with pytest.raises(ck.CheckpointError, match="no complete checkpoint"):
    encoders.load_pretrain_encoder(str(tmp_path))
  config = _tiny_config("knn", 0, source="release", path=str(tmp_path / "missing.pkl"))
  with pytest.raises(ck.CheckpointError, match="config.checkpoint.path: .* does not exist"):
    ev.EvalExperiment("train", jax.random.PRNGKey(0), config)


# ----------------------------------------------------------------------------------------------
# Config validation and the config files.
# ----------------------------------------------------------------------------------------------


def _set(config, field, value):
  node = config
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


@pytest.mark.parametrize("field,value,expected", [
    ("protocol", "finetune", "'fine_tune', 'linear', 'knn'"),
    ("training_steps", 0, "must be in [1, inf], got 0"),
    ("checkpoint.source", "orbax", "'pretrain', 'release', 'none'"),
    ("checkpoint.path", "", "required with checkpoint.source='release'"),
    ("data.dataset", "mnist", "allowed: 'fashion_mnist'"),
    ("data.label_percent", 5, "allowed: 1, 10"),
    ("data.batch_size", 12, "not divisible by the number of devices (8)"),
    ("evaluation.batch_size", 100, "not divisible by the number of devices (8)"),
    ("augmentation.crop_size", 32, "must be in [1, 28], got 32"),
    ("augmentation.crop_scale", (0.5, 0.2), "0.0 < a <= b <= 1.0"),
    ("network.encoder", "resnet7", "allowed: 'tiny_resnet'"),
    ("network.small_images", False, "set it to True"),
    ("network.compute_dtype", "float16", "'float32', 'bfloat16'"),
    ("optimizer.momentum", 1.0, "[0.0, 1.0)"),
    ("optimizer.head_base_learning_rate", -0.1, "[0.0, inf]"),
    ("optimizer.head_base_learning_rate", float("nan"), "must be a finite number"),
    ("optimizer.warmup_steps", 9, "must be in [0, 2], got 9"),
    ("evaluation.knn_ks", (20, 0), "ints >= 1"),
    ("evaluation.knn_ks", (), "non-empty tuple"),
    ("evaluation.knn_temperature", 0.0, "(0.0, inf]"),
    ("evaluation.max_examples", -1, "must be in [0, inf], got -1"),
])
def test_bad_config_values_raise_naming_the_field(field, value, expected):
  config = _tiny_config("linear", 2, source="release", path="x.pkl")
  _set(config, field, value)
  with pytest.raises(ValueError) as info:
    experiment_config.validate_eval_config(config, num_devices=8)
  assert str(info.value).startswith(f"config.{field}: ")
  assert expected in str(info.value)


def test_missing_fields_are_listed_and_constructor_validates_first():
  config = _tiny_config("knn", 0)
  del config.evaluation["knn_ks"]
  del config["augmentation"]
  with pytest.raises(ValueError, match=r"missing the field\(s\) augmentation\.crop_size, "
                     r"augmentation\.crop_scale, augmentation\.flip, evaluation\.knn_ks"):
    experiment_config.validate_eval_config(config, num_devices=8)
  config = _tiny_config("knn", 0)
  config.protocol = "probe"
  with pytest.raises(ValueError, match="config.protocol: got 'probe'"):
    ev.EvalExperiment("train", jax.random.PRNGKey(0), config)


def test_config_files_validate_and_keep_protocols_apart():
  config = eval_fashion_mnist.get_config()
  assert config.experiment_class == "eval"
  experiment_config.validate_eval_config(config.experiment_kwargs.config, num_devices=8)
  assert config.checkpoint_dir == "runs/fashion_mnist_eval_fine_tune"
  config.experiment_kwargs.config.protocol = "linear"
  assert config.checkpoint_dir == "runs/fashion_mnist_eval_linear"
  config.training_steps = 0
  assert config.experiment_kwargs.config.training_steps == 0
  config.experiment_kwargs.config.protocol = "knn"
  experiment_config.validate_eval_config(config.experiment_kwargs.config, num_devices=8)

  config = eval_imagenet.get_config()
  c = config.experiment_kwargs.config
  assert (c.network.encoder, c.network.width_multiplier, c.augmentation.crop_size) == (
      "resnet50", 1, 224)
  with pytest.raises(ValueError, match="config.checkpoint.path: is required"):
    experiment_config.validate_eval_config(c, num_devices=8)
  c.checkpoint.path = "/ckpts/semppl_r50_1pct.pkl"
  experiment_config.validate_eval_config(c, num_devices=8)
  c.data.label_percent = 10
  experiment_config.validate_eval_config(c, num_devices=8)
  assert "68.5" in eval_imagenet.__doc__ and "76.0" in eval_imagenet.__doc__
