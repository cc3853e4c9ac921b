"""jaxline Experiment: SemPPL pre-training with an online probe, monitors and evaluation.

Thin glue: the config becomes a typed :class:`semppl_jax.train.TrainConfig`, the data source's
host-local batches become global arrays, and :func:`semppl_jax.train.train_step` runs as one
``jax.jit`` on a 1-D ``Mesh`` named ``'data'`` (batch sharded, parameters replicated, queues
sharded along their entries; no pmap). Randomness for step ``k`` is ``fold_in(root, k)``: a
resumed run repeats the uninterrupted one.

Objectives (``config.objective``): ``'semppl'``, ``'relic'``, ``'supervised'``
(``semppl_jax.train.OBJECTIVES``).
"""
import functools
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from semppl_jax import encoders
from semppl_jax import evaluation
from semppl_jax.jaxline import experiment_config
from semppl_jax import knn
from semppl_jax import losses
from semppl_jax import nonfinite_guard
from semppl_jax.jaxline import mesh_experiment
from semppl_jax.jaxline import monitoring
from semppl_jax import parallel
from semppl_jax import train
from semppl_jax.jaxline.data_source import DataSource, Views


class Experiment(monitoring.TrainingMonitors, mesh_experiment.MeshExperiment):
  """SemPPL pre-training (see the module docstring)."""

  def __init__(self, mode: str, init_rng: jax.Array, config: config_dict.ConfigDict):
    super().__init__(mode=mode, init_rng=init_rng)
    self.config = config
    self._mesh = parallel.make_mesh()
    num_devices = self._mesh.shape["data"]
    experiment_config.validate_pretrain_config(config, num_devices=num_devices,
                                               num_processes=jax.process_count())
    self._train_config = experiment_config.train_config(config, num_devices)
    self._nets = train.build_networks(self._train_config.network, config.data.num_classes)
    init_key, self._root_key = jax.random.split(jnp.asarray(init_rng))
    v = config.views
    self._data = DataSource(config.data, config.evaluation, Views(
        num_large=v.num_large, large_size=v.large_size, large_scale=tuple(v.large_scale),
        num_small=v.num_small, small_size=v.small_size, small_scale=tuple(v.small_scale),
        antialias=v.get("antialias", False)))
    self._train_state = self._place(train.init_train_state(self._train_config, init_key))
    self._shardings = train.train_state_shardings(self._train_state, self._mesh)
    self._train_step = jax.jit(
        functools.partial(train.train_step, self._train_config),
        in_shardings=(self._shardings, parallel.data_sharding(self._mesh), None),
        out_shardings=(self._shardings, None), donate_argnums=(0,))
    # Objectives whose kNN only feeds monitors (relic) run it every knn_monitor_every steps,
    # outside the step (train.knn_in_step).
    self._knn_monitor = None
    if self._train_config.loss.knn_monitor_every > 1 and not train.knn_in_step(
        self._train_config) and train.OBJECTIVES[config.objective].contrastive:
      self._knn_monitor = jax.jit(
          functools.partial(train.knn_monitor, self._train_config),
          in_shardings=(self._shardings, parallel.data_sharding(self._mesh), None))
    self._embed = None
    c, t = config, self._train_config
    mesh_experiment.say(
        f"[setup] SemPPL pre-training | objective={c.objective} | "
        f"{experiment_config.data_description(c.data)} | {c.training_steps} steps of "
        f"{c.data.labelled_batch_size} labelled + {c.data.unlabelled_batch_size} unlabelled "
        f"images | {t.views.num_large}x"
        f"{t.views.large_size}px + {t.views.num_small}x{t.views.small_size}px views | "
        f"{c.network.encoder} x{c.network.width_multiplier} | queue {c.queue.size} | "
        f"{num_devices} device(s), {jax.process_count()} process(es)" + _oracle_note(t))
    self._prefetched = None  # (step, global batch) built while the previous step ran.

  def _state_tree(self) -> Dict[str, Any]:
    return self._train_state.to_dict()

  def _place(self, tree) -> train.TrainState:
    state = tree if isinstance(tree, train.TrainState) else train.TrainState.from_dict(tree)
    return jax.device_put(state, train.train_state_shardings(state, self._mesh))

  def _check_finite(self) -> None:
    """Raises ``FloatingPointError`` naming the step and the first non-finite check if the
    train step refused an update (``nonfinite_guard.guard_nonfinite``); fetches two int32 [].
    """
    with jax.transfer_guard_device_to_host("allow"):
      step, check = (int(x) for x in jax.device_get(
          (self._train_state.nonfinite_step, self._train_state.nonfinite_check)))
    if step < 0:
      return
    last = self._recent[-1] if self._recent else {}
    if self._knn_monitor is not None:  # Names of the step's own metrics only.
      last = [k for k in last if k not in train.KNN_MONITORS]
    names = nonfinite_guard.nonfinite_check_names(last)
    what = names[check] if 0 <= check < len(names) else f"check #{check}"
    raise FloatingPointError(
        f"step {step}: non-finite {what} (optimizer.base_learning_rate="
        f"{self.config.optimizer.base_learning_rate}); the update of step {step} and all later "
        "ones were refused and nothing non-finite was saved: the newest checkpoint holds the "
        f"last finite state (at most {step - 1} steps). Resume from it with a lower learning "
        "rate, or check the data of that step.")

  def step(self, *, global_step, rng, writer=None) -> Dict[str, jax.Array]:
    """One training step; returns its metrics as device scalars (nothing is fetched)."""
    del rng, writer  # Keys are fold_in(root, step).
    step = mesh_experiment.as_int(global_step)
    batch = self._global_batch(step)
    key = jax.random.fold_in(self._root_key, step)
    monitors = {}
    with jax.set_mesh(self._mesh):
      if self._knn_monitor is not None and step % self._train_config.loss.knn_monitor_every == 0:
        # Before the step, which donates the state: the monitors of this step's own state.
        monitors = self._knn_monitor(self._train_state, batch, key)
      self._train_state, metrics = self._train_step(self._train_state, batch, key)
    metrics = dict(metrics, **monitors)
    # Device prefetch: the call above only dispatched step k, so step k + 1's batch is read and
    # its (asynchronous) transfer started while step k runs.
    if step + 1 < self.config.training_steps:
      self._prefetched = (step + 1, self._global_batch(step + 1))
    self._remember(metrics)
    return metrics

  def _global_batch(self, step: int) -> Dict[str, jax.Array]:
    """Step ``step``'s global batch: the prefetched one, or read and placed now."""
    prefetched, self._prefetched = self._prefetched, None
    if prefetched is not None and prefetched[0] == step:
      return prefetched[1]
    return parallel.host_local_to_global(self._data.train_batch(step), self._mesh)

  def _evaluate_at_end(self) -> bool:
    return self.config.evaluate_at_end

  def _embed_split(self, split: str, max_examples: int = 0):
    if self._embed is None:
      nets = self._nets

      by_target = self._train_config.loss.knn_query == "target"

      def forward(weights, views):
        params, state, probe_params, target_params, target_state = weights
        (embedding, _, query), _ = nets.online.apply(params, state, None, views, False)
        if by_target:  # The labeller's query is the target projection (LossConfig.knn_query).
          query, _ = nets.target.apply(target_params, target_state, None, views, False)
        logits = nets.probe.apply(probe_params, None, embedding)
        return losses.l2_normalize(embedding), losses.l2_normalize(query), logits

      # Evaluation images at their own size (the data pipeline sized them).
      self._embed = encoders.make_embedder(forward, self._mesh)
    s = self._train_state
    weights = (s.online_params, s.online_state, s.probe_params, s.target_params, s.target_state)
    fn = lambda images: self._embed(weights, images)
    return evaluation.embed_batches(fn, self._data.eval_batches(split), self._mesh,
                                    max_examples=max_examples)

  def evaluate(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """On the test split: online-probe top-1, weighted-kNN top-1 (the labelled training images
    as the bank) and queue-kNN top-1 (the pseudo-labeller applied to test images); plus the
    training monitors averaged over the last logging window."""
    del rng, writer
    c = self.config
    (emb, query, logits), labels, mask = self._embed_split("test")
    (bank, _, _), bank_labels, bank_mask = self._embed_split("bank")
    results = {"probe_top1": evaluation.top1(jnp.argmax(logits, -1), labels, mask)}
    results.update(evaluation.knn_top1(
        emb, labels, mask, bank, bank_labels, bank_mask, ks=tuple(c.evaluation.knn_ks),
        num_classes=c.data.num_classes, temperature=c.evaluation.knn_temperature,
        mesh=self._mesh))
    objective = train.OBJECTIVES[c.objective]
    if objective.contrastive:
      # The pseudo-labeller applied to test images, with its own query (semppl.knn_query).
      queries = jnp.broadcast_to(query, (c.views.num_large,) + query.shape)
      with jax.set_mesh(self._mesh):
        pseudo = knn.pseudo_labels(queries, self._train_state.queue, k=c.semppl.knn_k,
                                   num_classes=c.data.num_classes)
      results["queue_knn_top1"] = evaluation.top1(pseudo, labels, mask)
      monitors = ["pseudo_label_accuracy"] + (["semantic_positive_purity"]
                                              if objective.semantic else [])
      for key in monitors:
        results[f"train_{key}"] = self.recent_mean(key)
    results["global_step"] = float(mesh_experiment.as_int(global_step))
    return results

  def _progress(self, scalars: Mapping[str, Any]) -> str:
    return " | ".join(f"{k} {float(scalars[k]):.4g}" for k in _PROGRESS_KEYS if k in scalars)

  def _report(self, results: Mapping[str, float]) -> None:
    c = self.config
    say = mesh_experiment.say
    say(f"[eval] objective={c.objective} dataset={c.data.dataset} "
        f"labels={c.data.label_percent}% step={int(results['global_step'])}")
    for key, value in results.items():
      if key == "global_step":
        continue
      label = _RESULT_NAMES.get(key, key)
      if key.startswith("knn_top1_k"):
        label = (f"weighted kNN top-1 (test, k={key[len('knn_top1_k'):]}, "
                 "labelled train bank)")
      say(f"[eval]   {label}: {100 * value:.2f}%")


_PROGRESS_KEYS = ("loss", "augm_contrastive", "semantic_contrastive", "augm_invariance",
                  "probe_loss", "pseudo_label_accuracy", "queue_fill", "learning_rate")
_RESULT_NAMES = {
    "probe_top1": "online-probe top-1 (test)",
    "queue_knn_top1": "queue-kNN top-1 (test; the pseudo-labeller)",
    "train_pseudo_label_accuracy": "pseudo-label accuracy (unlabelled train, last steps)",
    "train_semantic_positive_purity": "semantic-positive purity (train, last steps)",
}


def _oracle_note(config: train.TrainConfig) -> str:
  """' | ORACLE ...' on the setup line when y* comes from hidden labels (never a real result)."""
  loss = config.loss
  if config.objective != "semppl" or loss.pseudo_labels == "knn":
    return ""
  accuracy = 1.0 if loss.pseudo_labels == "oracle" else loss.oracle_accuracy
  return (f" | ORACLE pseudo-labels ({loss.pseudo_labels}, accuracy {accuracy:g}): hidden labels"
          " reach the loss, a research measurement, not SemPPL")
