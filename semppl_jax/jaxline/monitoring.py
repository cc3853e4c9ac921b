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


class TrainingMonitors:
  """Periodic weighted-kNN evaluation, TensorBoard images and PNG plots of a pre-training run."""


  def _begin_run(self, config, start_step: int) -> None:
    """Run directory, the history of the run so far (resumed runs), the summary batch."""
    c = self.config
    self._plots_dir = _join(config.checkpoint_dir, "plots")
    self._history = {"train": [], "eval": []}
    self._confusion = None  # (step, int [C, C]) of the latest periodic evaluation.
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
    if mesh_experiment.is_main_process() and done % max(1, c.log_every_steps) == 0:
      with jax.transfer_guard("allow"):
        self._history["train"].append(dict(summaries.window_means(self._recent), step=done))
    if c.evaluation.every_steps and done % c.evaluation.every_steps == 0:
      self.periodic_evaluation(done, writer)
    if self._summary_inputs is not None and done % c.summaries.images_every_steps == 0:
      self._image_summaries(done, writer)
    if (mesh_experiment.is_main_process() and c.summaries.plots
        and done % max(1, c.log_every_steps) == 0):
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
            confusion=self._confusion[1], class_names=self._class_names())
      mesh_experiment.say(f"[plots] wrote {', '.join(paths)}")

  def _class_names(self):
    if self.config.data.dataset == "fashion_mnist":
      return summaries.FASHION_MNIST_CLASS_NAMES
    labelled = getattr(self._data, "_labelled", None)
    return tuple(labelled.class_names) if labelled is not None else None

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
        writer.write_images(step, {"eval/knn_confusion_matrix":
                                   summaries.confusion_matrix_image(confusion)[None]})
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
    images = {"views/large_and_small": summaries.view_grid(out.large, out.small, index)[None]}
    if train.OBJECTIVES[self.config.objective].contrastive:
      images["semantic_positives"] = summaries.figure_to_array(
          summaries.semantic_positives_figure(out, self._class_names(),
                                              self.config.summaries.num_images))[None]
    writer.write_images(step, images)
    mesh_experiment.say(f"[images@{step}] {', '.join(images)} | {time.time() - start:.2f} s")


def _join(directory: str, name: str) -> str:
  """``directory/name`` for a local path or a URL (``gs://...``)."""
  return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)
