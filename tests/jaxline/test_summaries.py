"""Tests of semppl_jax/jaxline/summaries.py and of the pre-training run's pictures, periodic evaluations
and end-of-run plots (the launcher in a subprocess with the tiny config)."""
import copy
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from semppl_jax.jaxline import experiment_config
from semppl_jax import knn
from semppl_jax import losses
from semppl_jax import queue as queue_lib
from semppl_jax.jaxline import summaries
from semppl_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny_fashion_mnist.py")
sys.path.insert(0, os.path.join(ROOT, "tests", "configs"))
import tiny_fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


# ----------------------------------------------------------------------------------------------
# Image grids and the confusion matrix.
# ----------------------------------------------------------------------------------------------

def test_image_grid_places_each_image_row_by_row():
  images = np.stack([np.full((3, 4, 1), 10 * (i + 1), np.uint8) for i in range(5)])
  grid = summaries.image_grid(images, columns=2, pad=1, background=255)
  assert grid.shape == (3 * (3 + 1) + 1, 2 * (4 + 1) + 1, 3) and grid.dtype == np.uint8
  for i in range(5):
    r, c = divmod(i, 2)
    tile = grid[1 + r * 4:1 + r * 4 + 3, 1 + c * 5:1 + c * 5 + 4]
    assert np.all(tile == 10 * (i + 1)), i
  assert np.all(grid[9:12, 6:10] == 255)  # The empty sixth cell.
  assert np.all(grid[0] == 255) and np.all(grid[:, 5] == 255)  # Padding.


def test_to_uint8_scales_floats_and_broadcasts_grey():
  x = np.array([[[[0.0], [0.5], [1.2]]]], np.float32)
  out = summaries.to_uint8(x)
  assert out.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(out[0, 0, :, 0], [0, 128, 255])
  with pytest.raises(ValueError, match="1 or 3 channels"):
    summaries.to_uint8(np.zeros((2, 2, 2)))


def test_view_grid_shows_large_views_then_small_views_centred():
  large = np.zeros((2, 3, 8, 8, 3), np.float32)
  small = np.ones((1, 3, 4, 4, 3), np.float32)
  large[1, 2] = 0.5
  grid = summaries.view_grid(large, small, index=2, pad=2)
  assert grid.shape == (8 + 4, 3 * (8 + 2) + 2, 3)
  np.testing.assert_array_equal(grid[2:10, 2:10], 0)          # large view 0
  np.testing.assert_array_equal(grid[2:10, 12:20], 128)       # large view 1 of image 2
  cell = grid[2:10, 22:30]
  np.testing.assert_array_equal(cell[2:6, 2:6], 255)          # the small view, centred
  assert np.all(cell[:2] == 255) and np.all(cell[6:] == 255)  # white around it
  # Scaled: every pixel becomes a 4 x 4 block (a 28 px view is then 112 px on screen).
  big = summaries.view_grid(large, small, index=2, pad=2, scale=4)
  assert big.shape == (4 * grid.shape[0], 4 * grid.shape[1], 3)
  np.testing.assert_array_equal(big[::4, ::4], grid)
  np.testing.assert_array_equal(big[3::4, 1::4], grid)


def test_confusion_matrix_counts_unmasked_pairs_like_numpy():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 50)
  predictions = rng.integers(-1, 5, 50)  # -1 and 4: outside [0, 4), no column.
  mask = rng.random(50) < 0.8
  got = np.asarray(summaries.confusion_matrix(predictions, labels, mask, 4))
  want = np.zeros((4, 4), np.int64)
  for p, t, m in zip(predictions, labels, mask):
    if m and 0 <= p < 4:
      want[t, p] += 1
  np.testing.assert_array_equal(got, want)
  image = summaries.confusion_matrix_image(want, cell=3)
  assert image.shape == (12, 12, 3) and image.dtype == np.uint8
  # Each row is normalised: the darkest cell of a row is its largest share.
  for t in range(4):
    if want[t].sum():
      assert np.argmin(image[3 * t, ::3, 0]) == np.argmax(want[t])


# ----------------------------------------------------------------------------------------------
# Histories and PNG plots.
# ----------------------------------------------------------------------------------------------

def _png_size(path):
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.size


def test_write_training_plots_and_history_round_trip(tmp_path):
  history = [{"step": s, "loss": 5.0 - s / 10, "augm_contrastive": 3.0, "semantic_contrastive": 0.0,
              "pseudo_label_accuracy": 0.1 * s / 10, "semantic_positive_purity": 0.5}
             for s in range(10, 60, 10)]
  evals = [{"step": 20, "knn_top1_k20": 0.5, "probe_top1": 0.3},
           {"step": 40, "knn_top1_k20": 0.6, "probe_top1": 0.4}]
  confusion = np.array([[5, 1], [2, 7]])
  paths = summaries.write_training_plots(str(tmp_path / "plots"), history, evals, confusion,
                                         ("a", "b"))
  assert [os.path.basename(p) for p in paths] == list(summaries.PLOT_FILES)
  for path in paths:
    width, height = _png_size(path)
    assert width > 200 and height > 200
  # The confusion matrix names its classes and axes and says what it counted.
  fig = summaries.plot_confusion_matrix(confusion, ("a", "b"), "kNN at step 7: 15 test images")
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
  assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
  assert ax.get_title() == "kNN at step 7: 15 test images\n15 images, top-1 80.0%"
  summaries.figure_png(fig)
  assert "window mean" in summaries.plot_losses(history).axes[0].get_ylabel()
  # Without evaluations or confusion matrix only the training curves are drawn.
  paths = summaries.write_training_plots(str(tmp_path / "p2"), history)
  assert [os.path.basename(p) for p in paths] == ["losses.png", "pseudo_labels.png"]

  path = str(tmp_path / "h" / "history.json")
  assert summaries.read_history(path) == {"train": [], "eval": []}
  summaries.write_history(path, {"train": history, "eval": evals})
  assert summaries.read_history(path) == {"train": history, "eval": evals}
  steps, values = summaries.series(history, "pseudo_label_accuracy")
  np.testing.assert_array_equal(steps, [10, 20, 30, 40, 50])
  np.testing.assert_allclose(values, [0.1, 0.2, 0.3, 0.4, 0.5])


def test_window_means_averages_device_scalars():
  window = [{"loss": jnp.float32(1.0), "a": jnp.float32(2.0)}, {"loss": jnp.float32(3.0)}]
  assert summaries.window_means(window) == {"a": 2.0, "loss": 2.0}


# ----------------------------------------------------------------------------------------------
# Views and semantic positives of a fixed batch.
# ----------------------------------------------------------------------------------------------

def _tiny_train_config(num_labelled, num_unlabelled):
  c = tiny_fashion_mnist.get_config().experiment_kwargs.config
  return summaries.summary_config(experiment_config.train_config(c, 1), num_labelled, num_unlabelled)


@pytest.mark.slow
def test_semantic_positives_recomputes_views_pseudo_labels_and_positives():
  nl, nu = 6, 4
  config = _tiny_train_config(nl, nu)
  rng = np.random.default_rng(0)
  batch = {"labelled_images": rng.integers(0, 256, (nl, 28, 28, 1), np.uint8),
           "labels": np.array([0, 1, 2, 0, 1, 2], np.int32),
           "unlabelled_images": rng.integers(0, 256, (nu, 28, 28, 1), np.uint8),
           "unlabelled_labels": np.array([0, 1, 2, 5], np.int32)}
  state = train.init_train_state(config, jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(7)
  fn = jax.jit(lambda s, b, k: summaries.semantic_positives(config, s, b, k))

  # The queues hold the target projections of the labelled rows' view 0 (classes 0 and 1
  # only): every drawn positive is one of them, so its proxy is exact (cosine 1).
  first = fn(state, batch, key)
  large, small = jax.jit(lambda b, k: train.make_views(config, b, k, 1))(
      batch, jax.random.split(key, 3)[0])
  # Separately jitted: the same views up to float rounding of differently fused ops.
  np.testing.assert_allclose(first.large, large, atol=1e-5)
  np.testing.assert_allclose(first.small, small, atol=1e-5)
  large = first.large  # The reference computations below see the summary's own views.
  nets = train.build_networks(config.network, config.num_classes)
  target = jax.jit(nets.target.apply, static_argnums=4)
  online = jax.jit(nets.online.apply, static_argnums=4)
  proj, _ = target(state.target_params, state.target_state, None, _normalized(large[0, :nl]),
                   False)
  proj = losses.l2_normalize(proj)
  keep = np.array([0, 1, 3, 4])  # rows of classes 0 and 1
  q = queue_lib.init(config.views.num_large, config.queue_size, proj.shape[-1])
  q = queue_lib.enqueue(q, jnp.broadcast_to(proj[keep], (config.views.num_large, 4,
                                                         proj.shape[-1])),
                        jnp.asarray(batch["labels"][keep]), num_shards=1)
  out = jax.device_get(fn(state._replace(queue=q), batch, key))

  np.testing.assert_array_equal(out.labels, [0, 1, 2, 0, 1, 2, 0, 1, 2, 5])
  np.testing.assert_array_equal(out.is_labelled, [True] * nl + [False] * nu)
  # Pseudo-labels and neighbours as knn computes them from the labeller's queries: the target
  # projections by default (LossConfig.knn_query), the online predictions as first built.
  flat_large = _normalized(large.reshape((-1,) + large.shape[2:]))
  if config.loss.knn_query == "prediction":
    (_, _, pred), _ = online(state.online_params, state.online_state, None, flat_large, False)
  else:
    pred, _ = target(state.target_params, state.target_state, None, flat_large, False)
  queries = losses.l2_normalize(pred.reshape(config.views.num_large, nl + nu, -1))
  # Only the unlabelled rows are queried (as in training); labelled rows hold -1.
  np.testing.assert_array_equal(
      out.pseudo_labels[nl:],
      knn.pseudo_labels(queries, q, k=config.loss.knn_k, num_classes=10)[nl:])
  assert (np.asarray(out.pseudo_labels[:nl]) == -1).all()
  assert set(np.asarray(out.pseudo_labels[nl:])) <= {0, 1}
  top = knn.top_k_entries(queries[0], q.embeddings[0], q.labels[0], k=config.loss.knn_k)
  np.testing.assert_array_equal(out.neighbour_labels, top.labels)
  # Positives: valid exactly where the (pseudo-)label is in the queue; proxies exact.
  labels_star = np.where(out.is_labelled, out.labels, out.pseudo_labels)
  valid = np.isin(labels_star, [0, 1])
  np.testing.assert_array_equal(out.positive_valid, np.broadcast_to(valid, out.positive_valid.shape))
  sims = out.positive_similarity[out.positive_valid]
  np.testing.assert_allclose(sims, 1.0, atol=1e-5)
  proxy_labels = batch["labels"][out.positive_proxy]
  np.testing.assert_array_equal(proxy_labels[out.positive_valid],
                                np.broadcast_to(labels_star, proxy_labels.shape)[out.positive_valid])

  fig = summaries.semantic_positives_figure(out, summaries.FASHION_MNIST_CLASS_NAMES, max_rows=3)
  image = summaries.figure_to_array(fig)
  assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
  assert image.shape[0] > 200 and image.std() > 0


def _normalized(x):
  from semppl_jax import augmentations  # pylint: disable=g-import-not-at-top
  return augmentations.normalize(x)


def test_slice_batch_cuts_labelled_and_unlabelled_rows_separately():
  batch = {"labelled_large": np.zeros((8, 2, 4, 4, 3)), "labels": np.arange(8),
           "unlabelled_large": np.zeros((16, 2, 4, 4, 3)), "unlabelled_labels": np.arange(16)}
  out = summaries.slice_batch(batch, 3, 5)
  assert out["labelled_large"].shape[0] == 3 and out["labels"].tolist() == [0, 1, 2]
  assert out["unlabelled_large"].shape[0] == 5 and out["unlabelled_labels"].shape == (5,)


# ----------------------------------------------------------------------------------------------
# Config fields.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("evaluation.every_steps", -1, r"evaluation.every_steps: must be in \[0, inf\], got -1"),
    ("evaluation.subset", -3, r"evaluation.subset: must be in \[0, inf\], got -3"),
    ("summaries.images_every_steps", -2, r"summaries.images_every_steps: must be in \[0"),
    ("summaries.num_images", 0, r"summaries.num_images: must be in \[1, inf\], got 0"),
    ("summaries.plots", "yes", "summaries.plots: must be True or False, got 'yes'"),
])
def test_new_config_fields_are_validated(field, value, message):
  config = copy.deepcopy(tiny_fashion_mnist.get_config().experiment_kwargs.config)
  section, name = field.split(".")
  with config.ignore_type():
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    experiment_config.validate_pretrain_config(config, num_devices=8)


# ----------------------------------------------------------------------------------------------
# A run writes image summaries, periodic evaluations and end-of-run plots.
# ----------------------------------------------------------------------------------------------

def _events(directory):
  """{tag: [(step, kind)]} of the TensorBoard event files under ``directory``."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  found = {}
  for name in os.listdir(directory):
    for event in tf.compat.v1.train.summary_iterator(os.path.join(directory, name)):
      for value in event.summary.value:
        tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
        found.setdefault(value.tag, []).append((event.step, tensor))
  return found


@pytest.mark.e2e
def test_run_writes_image_summaries_periodic_evaluations_and_plots(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", SEMPPL_TEST_RUN_DIR=str(tmp_path))
  c = "--config.experiment_kwargs.config"
  # Logging every 3 of 4 steps: the history must still end at the last step.
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "experiments", "launch.py"), f"--config={TINY_CONFIG}",
       f"{c}.evaluation.every_steps=2", f"{c}.summaries.images_every_steps=2",
       f"{c}.summaries.plots=True", f"{c}.log_every_steps=3"],
      env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
  stdout = out.stdout
  # The first evaluation says that it compiles, before it starts; the later ones do not.
  lines = stdout.splitlines()
  first = lines.index("[eval@2] (compiling) weighted kNN and probe on the test subset...")
  assert lines[first + 1].startswith("[eval@2] weighted kNN"), lines[first:first + 2]
  assert stdout.count("(compiling)") == 1
  # The end of the run: where the checkpoint is and what to run next.
  assert f"[done] checkpoint: {tmp_path}/checkpoints/latest" in stdout
  assert "[next] evaluate: python experiments/launch.py --config=experiments/" in stdout
  assert f"[next] label images: python experiments/label.py --checkpoint={tmp_path}" in stdout
  # Library warnings (Orbax, absl) go to the log file, not the console.
  # (A normal run has no warning of its own; absl's warning lines start with "W<mmdd> ".)
  assert not [l for l in out.stderr.splitlines() if re.match(r"W\d{4} ", l)], out.stderr

  # Periodic evaluations at steps 2 and 4, on the 256-image subset; the plots at the end.
  printed = {}
  for step in (2, 4):
    line = next(l for l in stdout.splitlines() if l.startswith(f"[eval@{step}] weighted"))
    assert "| 256 test images |" in line, line
    printed[step] = float(line.split("top-1 (k=5) ")[1].split("%")[0])
  for step in (2, 4):
    assert f"[images@{step}] train/views, monitor/semantic_positives | " in stdout
  plots = tmp_path / "plots"
  for name in summaries.PLOT_FILES:
    assert f"{plots / name}" in stdout
    width, height = _png_size(plots / name)
    assert width > 200 and height > 200

  history = json.loads((plots / "history.json").read_text())
  assert [h["step"] for h in history["train"]] == [3, 4]
  for h in history["train"]:
    for name in ("loss", "augm_contrastive", "pseudo_label_accuracy",
                 "semantic_positive_purity", "queue_fill"):
      assert np.isfinite(h[name]), (name, h)
  assert history["train"][-1]["queue_fill"] > history["train"][0]["queue_fill"]
  assert [h["step"] for h in history["eval"]] == [2, 4]
  for h in history["eval"]:
    assert round(100 * h["knn_top1_k5"], 2) == printed[h["step"]]
    assert 0.0 <= h["probe_top1"] <= 1.0

  events = _events(tmp_path / "train")
  for tag in ("train/views", "monitor/semantic_positives", "eval/knn_confusion_matrix"):
    assert [s for s, _ in events[tag]] == [2, 4], tag
  # Every tag in one group, one tag per quantity.
  assert {t.split("/")[0] for t in events if "/" in t} == {"train", "monitor", "eval", "final"}
  assert all("/" in t for t in events), sorted(events)
  for tag in ("train/loss", "train/learning_rate", "monitor/pseudo_label_accuracy",
              "monitor/queue_fill", "final/knn_top1_k5", "final/probe_top1",
              "final/queue_knn_top1", "final/pseudo_label_accuracy_last_window"):
    assert tag in events, (tag, sorted(events))
  assert "final/global_step" not in events
  # Image summaries are [width, height, encoded PNG...] string tensors; 16 px views are
  # scaled 7x (at least 112 px each): 2 large views + 1 small.
  width, height = (int(x) for x in events["train/views"][0][1][:2])
  assert (width, height) == (7 * (3 * (16 + 2) + 2), 7 * (16 + 4))
  for step, value in events["eval/knn_top1_k5"]:
    assert round(100 * float(value), 2) == printed[step]
