"""TensorBoard tag groups and the optional W&B writer (semppl_jax/jaxline/monitoring.py)."""
import sys
import types

import numpy as np
import pytest
from ml_collections import config_dict

from semppl_jax.jaxline import monitoring


@pytest.mark.parametrize("name, tag", [
    ("loss", "train/loss"), ("augm_contrastive", "train/augm_contrastive"),
    ("learning_rate", "train/learning_rate"), ("steps_per_sec", "train/steps_per_sec"),
    ("fine_tune_loss", "train/fine_tune_loss"),
    ("pseudo_label_accuracy", "monitor/pseudo_label_accuracy"),
    ("queue_fill", "monitor/queue_fill"),
    ("semantic_valid_fraction", "monitor/semantic_valid_fraction"),
    ("knn_top1_k20", "final/knn_top1_k20"), ("probe_top1", "final/probe_top1"),
    ("queue_knn_top1", "final/queue_knn_top1"), ("linear_top1", "final/linear_top1"),
    ("train_pseudo_label_accuracy", "final/pseudo_label_accuracy_last_window"),
    ("eval/knn_top1_k20", "eval/knn_top1_k20"), ("train/views", "train/views"),
    ("global_step", None),
])
def test_tensorboard_tags_are_grouped(name, tag):
  assert monitoring.tensorboard_tag(name) == tag


class _Recorder:
  def __init__(self):
    self.scalars, self.images = [], []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_images(self, step, images):
    self.images.append((step, dict(images)))


def test_grouped_writer_renames_and_drops():
  inner = _Recorder()
  factory = monitoring.grouped_writer_factory(lambda config, mode: inner)
  writer = factory(None, "train")
  writer.write_scalars(3, {"loss": 1.0, "global_step": 3.0, "queue_fill": 0.5})
  writer.write_scalars(4, {"global_step": 4.0})  # Nothing left: nothing written.
  writer.write_scalars(5, {"knn_top1": 0.5, "knn_top1_k20": 0.5})  # An alias: written once.
  writer.write_images(3, {"train/views": np.zeros((1, 4, 4, 3), np.uint8)})
  assert inner.scalars == [(3, {"train/loss": 1.0, "monitor/queue_fill": 0.5}),
                           (5, {"final/knn_top1_k20": 0.5})]
  assert list(inner.images[0][1]) == ["train/views"]
  assert monitoring.grouped_writer_factory(lambda config, mode: None)(None, "train") is None


def _run_config(tmp_path):
  return config_dict.ConfigDict(dict(checkpoint_dir=str(tmp_path / "run"), training_steps=2))


def test_wandb_writer_logs_at_the_step(tmp_path, monkeypatch):
  """Against a stand-in for the wandb module: what is logged, at which step."""
  logged, finished = [], []
  run = types.SimpleNamespace(log=lambda data, step: logged.append((step, data)),
                              finish=lambda: finished.append(True))
  fake = types.SimpleNamespace(init=lambda **kw: (logged.append(("init", kw)), run)[1],
                               Image=lambda array: ("image", np.asarray(array).shape))
  monkeypatch.setitem(sys.modules, "wandb", fake)
  writer = monitoring.grouped_writer_factory(monitoring.wandb_writer_factory("proj"))(
      _run_config(tmp_path), "train")
  writer.write_scalars(2, {"loss": np.float32(1.5), "global_step": 2})
  writer.write_images(2, {"train/views": np.zeros((1, 8, 16, 3), np.uint8)})
  writer.close()
  init = logged[0][1]
  assert init["project"] == "proj" and init["dir"] == str(tmp_path / "run")
  assert init["config"]["training_steps"] == 2
  assert logged[1] == (2, {"train/loss": 1.5})
  assert logged[2] == (2, {"train/views": ("image", (8, 16, 3))})
  assert finished == [True]


def test_wandb_writer_offline(tmp_path, monkeypatch):
  """The real wandb in offline mode (skipped when the `wandb` extra is not installed)."""
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  writer = monitoring.wandb_writer_factory("semppl_jax_test")(_run_config(tmp_path), "train")
  writer.write_scalars(1, {"train/loss": 2.0})
  writer.write_scalars(2, {"train/loss": 1.0})
  writer.write_images(2, {"train/views": np.zeros((1, 8, 8, 3), np.uint8)})
  writer.close()
  runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
  assert len(runs) == 1, list((tmp_path / "run").rglob("*"))
  assert list(runs[0].glob("*.wandb"))
