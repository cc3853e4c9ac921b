"""Training monitors of the pre-training experiment: periodic evaluation, image summaries and
end-of-run plots (the pure pieces are in ``semppl_jax/jaxline/summaries.py``).

A mixin of jaxline glue: ``MeshExperiment.train_loop`` calls ``_begin_run``, ``_after_step`` and
``_end_run`` on every process (the computations are collective); only process 0 prints, writes
TensorBoard events and files under ``<checkpoint_dir>/plots``. It reads the experiment's
``config``, ``_mesh``, ``_data``, ``_train_state``, ``_train_config``, ``_root_key``,
``_recent`` and ``_embed_split``.
"""
import functools
import os
import time
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from semppl_jax import knn
from semppl_jax.jaxline import mesh_experiment
from semppl_jax import parallel
from semppl_jax.jaxline import summaries
from semppl_jax import train


VIEW_GRID_MIN_CELL = 112  # Pixels per view in the TensorBoard view grid, at least.


class TrainingMonitors:
  """Periodic weighted-kNN evaluation, TensorBoard images and PNG plots of a pre-training run."""


  def _begin_run(self, config, start_step: int) -> None:
    """Run directory, the history of the run so far (resumed runs), the summary batch."""
    c = self.config
    self._plots_dir = _join(config.checkpoint_dir, "plots")
    self._history = {"train": [], "eval": []}
    self._confusion = None  # (step, int [C, C]) of the latest periodic evaluation.
    self._total_steps = int(config.training_steps)
    self._evaluations_compiled = False
    if mesh_experiment.is_main_process():
      with jax.transfer_guard("allow"):
        history = summaries.read_history(_join(self._plots_dir, "history.json"))
      # Entries after the resumed checkpoint belong to steps that are run again.
      self._history = {part: [h for h in entries if h["step"] <= start_step]
                       for part, entries in history.items()}
    self._summary_inputs = None
    if c.summaries.images_every_steps:
      self._summary_inputs = self._make_summary_inputs(start_step)

  def _make_summary_inputs(self, step: int):
    """(config, replicated batch, key) of the image summaries: the first images of the run's
    first batch (process 0's, on every process), and a fixed key, so every summary shows the
    same images under the same augmentation as the network learns."""
    c = self.config
    local = self._data.train_batch(step)
    num_labelled = min(32, len(local["labels"]))
    num_unlabelled = min(c.summaries.num_images, len(local["unlabelled_labels"]))
    batch = summaries.slice_batch(local, num_labelled, num_unlabelled)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      batch = multihost_utils.broadcast_one_to_all(batch)
    replicated = parallel.replicated_sharding(self._mesh)
    with jax.transfer_guard("allow"):
      batch = {k: jax.make_array_from_process_local_data(replicated, v)
               for k, v in batch.items()}
    config = summaries.summary_config(self._train_config, num_labelled, num_unlabelled)
    fn = jax.jit(functools.partial(summaries.semantic_positives, config),
                 out_shardings=replicated)
    return fn, batch, jax.random.fold_in(self._root_key, 2**31 - 1)

  def _after_step(self, done: int, writer) -> None:
    """Records the logging window's means; periodic evaluation and images when due."""
    c = self.config
    # Every logging window, and the last step (its window may overlap the one before).
    logged = done % max(1, c.log_every_steps) == 0 or done == self._total_steps
    if mesh_experiment.is_main_process() and logged:
      with jax.transfer_guard("allow"):
        self._history["train"].append(dict(summaries.window_means(self._recent), step=done))
    if c.evaluation.every_steps and done % c.evaluation.every_steps == 0:
      self.periodic_evaluation(done, writer)
    if self._summary_inputs is not None and done % c.summaries.images_every_steps == 0:
      self._image_summaries(done, writer)
    if mesh_experiment.is_main_process() and c.summaries.plots and logged:
      with jax.transfer_guard("allow"):
        summaries.write_history(_join(self._plots_dir, "history.json"), self._history)

  def _end_run(self, done: int, writer) -> None:
    """A last periodic evaluation (for the confusion matrix), then the PNG plots."""
    c = self.config
    if not c.summaries.plots:
      return
    if self._confusion is None or self._confusion[0] != done:
      self.periodic_evaluation(done, writer)
    if mesh_experiment.is_main_process():
      with jax.transfer_guard("allow"):
        summaries.write_history(_join(self._plots_dir, "history.json"), self._history)
        paths = summaries.write_training_plots(
            self._plots_dir, self._history["train"], self._history["eval"],
            confusion=self._confusion[1], class_names=self._class_names(),
            confusion_title=self._confusion_title(self._confusion[0]))
      mesh_experiment.say(f"[plots] wrote {', '.join(paths)}")

  def _class_names(self):
    if self.config.data.dataset == "fashion_mnist":
      return summaries.FASHION_MNIST_CLASS_NAMES
    labelled = getattr(self._data, "_labelled", None)
    return tuple(labelled.class_names) if labelled is not None else None

  def _confusion_title(self, step: int) -> str:
    """What the confusion matrix was computed from (the periodic evaluation's subset)."""
    c = self.config
    subset = c.evaluation.subset
    images = f"first {subset} test images" if subset else "all test images"
    bank = f"first {subset} labelled images" if subset else "all labelled images"
    return (f"weighted kNN (k={c.evaluation.knn_ks[0]}) at step {step}: {images}, bank of "
            f"{bank}")

  def periodic_evaluation(self, step: int, writer=None) -> Dict[str, float]:
    """Cheap evaluation during training: weighted kNN (first ``evaluation.knn_ks``) and online
    probe top-1 on the first ``evaluation.subset`` test images, with the first
    ``evaluation.subset`` labelled images as the kNN bank (0 = all), and their kNN confusion
    matrix. Collective (every process calls it); process 0 prints, writes ``eval/*`` scalars
    and a confusion-matrix image, and keeps the results for the plots.

    Returns:
      ``{'knn_top1_k{k}': float, 'probe_top1': float}``.
    """
    c = self.config
    if not self._evaluations_compiled:
      self._evaluations_compiled = True
      # The first one compiles the embedding and the kNN (about a minute on 2 CPU cores).
      mesh_experiment.say(f"[eval@{step}] (compiling) weighted kNN and probe on the test "
                          "subset...")
    start = time.time()
    subset, k = c.evaluation.subset, c.evaluation.knn_ks[0]
    with jax.transfer_guard("allow"):
      (emb, _, logits), labels, mask = self._embed_split("test", max_examples=subset)
      (bank, _, _), bank_labels, bank_mask = self._embed_split("bank", max_examples=subset)
      with jax.set_mesh(self._mesh):
        knn_top1, probe_top1, confusion = self._periodic_scores(
            emb, logits, labels, mask, bank, bank_labels, bank_mask)
      results = {f"knn_top1_k{k}": float(knn_top1), "probe_top1": float(probe_top1)}
      confusion = parallel.global_to_host_local(confusion)
    self._confusion = (step, confusion)
    if mesh_experiment.is_main_process():
      self._history["eval"] = [h for h in self._history["eval"] if h["step"] != step]
      self._history["eval"].append(dict(results, step=step))
      if writer is not None:
        writer.write_scalars(step, {f"eval/{name}": v for name, v in results.items()})
        figure = summaries.plot_confusion_matrix(confusion, self._class_names(),
                                                 self._confusion_title(step))
        writer.write_images(step, {"eval/knn_confusion_matrix":
                                   summaries.figure_to_array(figure)[None]})
      mesh_experiment.say(
          f"[eval@{step}] weighted kNN top-1 (k={k}) {100 * results[f'knn_top1_k{k}']:.2f}% | "
          f"online probe {100 * results['probe_top1']:.2f}% | {int(confusion.sum())} test "
          f"images | {time.time() - start:.2f} s")
    return results

  def _periodic_scores(self, *arrays):
    """Jitted once: (kNN top-1, probe top-1, kNN confusion matrix), replicated."""
    if getattr(self, "_periodic_jit", None) is None:
      c = self.config
      k, num_classes = c.evaluation.knn_ks[0], c.data.num_classes

      def scores(emb, logits, labels, mask, bank, bank_labels, bank_mask):
        votes = knn.weighted_knn_scores(
            emb, bank, jnp.where(bank_mask, bank_labels, -1), k=min(k, bank.shape[0]),
            num_classes=num_classes, temperature=c.evaluation.knn_temperature)
        predictions = jnp.argmax(votes, -1)
        weight = mask.astype(jnp.float32)
        top1 = lambda p: jnp.sum((p == labels) * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        return (top1(predictions), top1(jnp.argmax(logits, -1)),
                summaries.confusion_matrix(predictions, labels, mask, num_classes))

      self._periodic_jit = jax.jit(scores,
                                   out_shardings=parallel.replicated_sharding(self._mesh))
    return self._periodic_jit(*arrays)

  def _image_summaries(self, step: int, writer) -> None:
    """One image's large and small views; unlabelled anchors next to their semantic
    positives (``summaries.semantic_positives`` on the fixed summary batch)."""
    fn, batch, key = self._summary_inputs
    start = time.time()
    with jax.transfer_guard("allow"):
      with jax.set_mesh(self._mesh):
        out = fn(self._train_state, batch, key)
      out = parallel.global_to_host_local(out)
    if not mesh_experiment.is_main_process() or writer is None:
      return
    unlabelled = np.flatnonzero(~out.is_labelled)
    index = int(unlabelled[0]) if len(unlabelled) else 0
    # Upscaled (nearest neighbour) so that a 28 px view is at least 4x its size on screen.
    scale = max(4, -(-VIEW_GRID_MIN_CELL // out.large.shape[2]))
    images = {"train/views": summaries.view_grid(out.large, out.small, index, scale=scale)[None]}
    if train.OBJECTIVES[self.config.objective].contrastive:
      images["monitor/semantic_positives"] = summaries.figure_to_array(
          summaries.semantic_positives_figure(out, self._class_names(),
                                              self.config.summaries.num_images))[None]
    writer.write_images(step, images)
    mesh_experiment.say(f"[images@{step}] {', '.join(images)} | {time.time() - start:.2f} s")


# TensorBoard groups: every scalar and image goes under one of these, one tag per quantity
# (train/ is the rest: loss terms, learning rates, EMA decay, steps/s, ...).
MONITOR_METRICS = ("pseudo_label_accuracy", "pseudo_label_coverage", "semantic_positive_purity",
                   "semantic_valid_fraction", "queue_fill", "probe_train_top1")
# End-of-run results (the whole test split; pre-training and evaluation experiments).
FINAL_PREFIXES = ("probe_top1", "knn_top1", "queue_knn_top1", "fine_tune_top1", "linear_top1",
                  "num_test_examples")
# Monitor means over the last logging window, reported with the final results.
_FINAL_WINDOW_PREFIX = "train_"
_DROPPED = ("global_step",)  # The step is the event's own step.


def tensorboard_tag(name: str):
  """The grouped tag of a scalar the experiments write, or None for one that is dropped.

  ``train/``: losses and optimiser quantities of a step (a fine-tune's ``*_loss`` too);
  ``monitor/``: pseudo-label and queue monitors; ``eval/``: periodic evaluations (written with
  their prefix); ``final/``: the end-of-run evaluation on the whole test split. A tag that already
  has a group is kept.
  """
  if "/" in name:
    return name
  if name in _DROPPED:
    return None
  if name.startswith(_FINAL_WINDOW_PREFIX) and name[len(_FINAL_WINDOW_PREFIX):] in (
      MONITOR_METRICS):
    return f"final/{name[len(_FINAL_WINDOW_PREFIX):]}_last_window"
  if name.startswith(FINAL_PREFIXES):
    return f"final/{name}"
  if name in MONITOR_METRICS:
    return f"monitor/{name}"
  return f"train/{name}"


class GroupedWriter:
  """Wraps jaxline's writer: tags as :func:`tensorboard_tag` groups them."""

  def __init__(self, writer):
    self._writer = writer

  def write_scalars(self, global_step: int, scalars) -> None:
    grouped = {}
    for name, value in scalars.items():
      if name == "knn_top1" and any(k.startswith("knn_top1_k") for k in scalars):
        continue  # The evaluation experiment's alias of knn_top1_k{first k}: one tag suffices.
      tag = tensorboard_tag(name)
      if tag is not None:
        grouped[tag] = value
    if grouped:
      self._writer.write_scalars(global_step, grouped)

  def write_images(self, global_step: int, images) -> None:
    self._writer.write_images(global_step, {tensorboard_tag(k) or k: v
                                            for k, v in images.items()})

  def __getattr__(self, name):  # Anything else (e.g. close) is the wrapped writer's.
    return getattr(self._writer, name)


class WandbWriter:
  """A jaxline writer that logs to Weights & Biases (``pip install semppl_jax[wandb]``).

  Scalars go to ``wandb.log`` at the event's step; images (``[N, H, W, 3]`` uint8, as for
  TensorBoard) as ``wandb.Image`` of the first one. ``WANDB_MODE=offline`` writes the run
  under ``<dir>/wandb`` without network (``wandb sync`` uploads it later).
  """

  def __init__(self, config, mode: str, *, project: str, directory: str):
    import wandb  # pylint: disable=g-import-not-at-top
    self._wandb = wandb
    os.makedirs(directory, exist_ok=True)
    self._run = wandb.init(project=project, dir=directory, job_type=mode,
                           name=os.path.basename(os.path.normpath(directory)) or None,
                           config=config.to_dict() if hasattr(config, "to_dict") else None,
                           reinit=True)

  def write_scalars(self, global_step: int, scalars) -> None:
    self._run.log({k: float(v) for k, v in scalars.items()}, step=int(global_step))

  def write_images(self, global_step: int, images) -> None:
    self._run.log({k: self._wandb.Image(np.asarray(v)[0] if np.ndim(v) == 4 else np.asarray(v))
                   for k, v in images.items()}, step=int(global_step))

  def close(self) -> None:
    self._run.finish()


def wandb_writer_factory(project: str):
  """``create_writer(config, mode)`` for jaxline: a :class:`WandbWriter` writing under the
  run directory (local paths; a bucket run keeps its W&B files under ./wandb)."""
  def factory(config, mode):
    root = config.checkpoint_dir
    directory = os.path.abspath("." if "://" in root else root)
    return WandbWriter(config, mode, project=project, directory=directory)
  return factory


def grouped_writer_factory(create_writer):
  """``create_writer(config, mode)`` whose writers group their tags (None stays None)."""
  def factory(config, mode):
    writer = create_writer(config, mode)
    return None if writer is None else GroupedWriter(writer)
  return factory


def _join(directory: str, name: str) -> str:
  """``directory/name`` for a local path or a URL (``gs://...``)."""
  return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)
