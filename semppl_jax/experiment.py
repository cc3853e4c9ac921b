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
import os
import time
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from semppl_jax import augmentations
from semppl_jax import config_rules as rules
from semppl_jax import evaluation
from semppl_jax import knn
from semppl_jax import losses
from semppl_jax import mesh_experiment
from semppl_jax import networks
from semppl_jax import parallel
from semppl_jax import summaries
from semppl_jax import train
from semppl_jax.data_source import DataSource, Views

DATASETS = ("fashion_mnist", "imagenet", "image_folder")
_EXAMPLE = "experiments/fashion_mnist.py"


def validate_config(config: config_dict.ConfigDict, *, num_devices: int,
                    num_processes: int = 1) -> None:
  """Checks every field of a pre-training config before anything loads or compiles.

  Args:
    config: ``experiment_kwargs.config`` of a launch config.
    num_devices: global number of devices on the data axis.
    num_processes: number of processes (hosts).

  Raises:
    ValueError: ``config.<field>: ...`` naming the field and what is allowed.
  """
  objective = rules.one_of(config, "objective", tuple(train.OBJECTIVES))
  steps = rules.integer(config, "training_steps", low=1)
  rules.integer(config, "log_every_steps", low=1)
  rules.boolean(config, "evaluate_at_end")
  dataset = rules.one_of(config, "data.dataset", DATASETS)
  rules.integer(config, "data.num_classes", low=1)
  image_size = rules.integer(config, "data.image_size", low=1)
  rules.integer(config, "data.seed", low=0)
  rules.one_of(config, "data.eval_split", ("test", "validation"))
  rules.boolean(config, "data.skip_corrupt_images")
  if dataset in ("fashion_mnist", "imagenet"):
    rules.one_of(config, "data.label_percent", (1, 10))
  for field in ("data.labelled_batch_size", "data.unlabelled_batch_size"):
    if field.endswith("unlabelled_batch_size") and rules.get(config, field) == 0:
      continue  # No unlabelled images is allowed (the supervised baseline's data).
    rules.batch_divisible(config, field, num_devices=num_devices, num_processes=num_processes)

  large = rules.integer(config, "views.num_large", low=1)
  small = rules.integer(config, "views.num_small", low=0)
  if objective != "supervised" and large + small < 2:
    rules.fail("views.num_small", "the invariance term needs at least two views in total "
               f"(num_large + num_small >= 2), got {large} + {small}.")
  large_size = rules.integer(config, "views.large_size", low=1, high=image_size)
  sizes = [large_size]
  if small:
    sizes.append(rules.integer(config, "views.small_size", low=1, high=large_size))
  rules.interval(config, "views.large_scale", 0.0, 1.0, low_open=True)
  rules.interval(config, "views.small_scale", 0.0, 1.0, low_open=True)
  v = config.views
  if len(v.blur_probability) != len(v.solarize_probability) or not v.blur_probability:
    rules.fail("views.blur_probability", "views.blur_probability and "
               "views.solarize_probability must have the same number (>= 1) of entries, one "
               f"per alternating preset; got {list(v.blur_probability)} and "
               f"{list(v.solarize_probability)}.")
  for field in ("color_jitter_probability", "grayscale_probability"):
    rules.number(config, f"views.{field}", 0.0, 1.0)
  for name in ("blur_probability", "solarize_probability"):
    for i in range(len(v[name])):
      rules.number({"views": {name: {str(i): v[name][i]}}}, f"views.{name}.{i}", 0.0, 1.0)
  rules.interval(config, "views.blur_sigma_range", 0.0, 100.0, low_open=True)

  rules.one_of(config, "network.encoder", networks.ENCODER_NAMES)
  rules.integer(config, "network.width_multiplier", low=1)
  rules.one_of(config, "network.compute_dtype", ("float32", "bfloat16"))
  rules.one_of(config, "network.remat", networks.REMAT_POLICIES)
  for field in ("projector_hidden_size", "projection_size", "predictor_hidden_size"):
    rules.integer(config, f"network.{field}", low=1)
  if rules.boolean(config, "network.small_images") and max(sizes) > 64:
    rules.fail("network.small_images", "the small-image stem (3x3 stride 1, no max-pool) is for "
               f"inputs of at most 64 px, got views of {max(sizes)} px; set it to False.")
  if not config.network.small_images and min(sizes) < 32:
    rules.fail("network.small_images", "the ImageNet stem downsamples by 32 and needs views of "
               f"at least 32 px, got {min(sizes)} px; set it to True.")

  labelled = config.data.labelled_batch_size
  queue = rules.multiple_of(config, "queue.size", num_devices, "the global number of devices")
  if queue < labelled:
    rules.fail("queue.size", f"{queue} is smaller than the labelled items written per step "
               f"(data.labelled_batch_size={labelled}).")
  rules.integer(config, "semppl.knn_k", low=1, high=queue)
  rules.integer(config, "semppl.num_semantic_positives", low=1)
  rules.number(config, "semppl.temperature", 0.0, low_open=True)
  for field in ("contrastive_weight", "semantic_weight", "invariance_weight"):
    rules.number(config, f"semppl.{field}", 0.0)
  batch = labelled + config.data.unlabelled_batch_size
  if rules.integer(config, "semppl.num_negatives", low=0):
    rules.integer(config, "semppl.num_negatives", low=1, high=batch - 1)
  # Ablation switches (optional fields: configs without them run DESIGN.md §2 as written).
  for field in _LOSS_SWITCHES:
    if field in config.semppl:
      if isinstance(_LOSS_SWITCH_DEFAULTS[field], bool):
        rules.boolean(config, f"semppl.{field}")
      else:
        rules.integer(config, f"semppl.{field}", low=0)

  rules.number(config, "optimizer.base_learning_rate", 0.0)
  rules.number(config, "optimizer.weight_decay", 0.0)
  rules.number(config, "optimizer.momentum", 0.0, 1.0, high_open=True)
  rules.number(config, "optimizer.trust_coefficient", 0.0, low_open=True)
  rules.integer(config, "optimizer.warmup_steps", low=0, high=steps)
  rules.number(config, "target.base_decay", 0.0, 1.0)
  rules.number(config, "probe.learning_rate", 0.0, low_open=True)

  rules.batch_divisible(config, "evaluation.batch_size", num_devices=num_devices,
                        num_processes=num_processes)
  rules.int_tuple(config, "evaluation.knn_ks", low=1)
  rules.number(config, "evaluation.knn_temperature", 0.0, low_open=True)
  rules.integer(config, "evaluation.max_examples", low=0)
  # Periodic evaluation, image summaries and end-of-run plots (semppl_jax/summaries.py).
  rules.integer(config, "evaluation.every_steps", low=0)
  rules.integer(config, "evaluation.subset", low=0)
  rules.integer(config, "summaries.images_every_steps", low=0)
  rules.integer(config, "summaries.num_images", low=1)
  rules.boolean(config, "summaries.plots")


_LOSS_SWITCHES = ("mask_same_class_negatives", "semantic_ramp_steps",
                  "bn_stats_from_large_views_only")
_LOSS_SWITCH_DEFAULTS = {f: getattr(train.LossConfig(), f) for f in _LOSS_SWITCHES}


def data_description(data: config_dict.ConfigDict) -> str:
  """'fashion_mnist 10% labels' or 'image_folder <labelled_dir>' (setup lines)."""
  if data.dataset == "image_folder":
    return f"image_folder {data.labelled_dir}"
  return f"{data.dataset} {data.label_percent}% labels"


def train_config(config: config_dict.ConfigDict, num_shards: int) -> train.TrainConfig:
  """The typed hyper-parameters of a (validated) pre-training config."""
  v, n, s, o = config.views, config.network, config.semppl, config.optimizer
  presets = tuple(
      augmentations.ViewPreset(
          blur_probability=blur, solarize_probability=solarize,
          blur_sigma_range=tuple(v.blur_sigma_range),
          color_jitter_probability=v.color_jitter_probability,
          grayscale_probability=v.grayscale_probability)
      for blur, solarize in zip(v.blur_probability, v.solarize_probability))
  return train.TrainConfig(
      objective=config.objective, num_classes=config.data.num_classes,
      labelled_batch_size=config.data.labelled_batch_size,
      unlabelled_batch_size=config.data.unlabelled_batch_size, queue_size=config.queue.size,
      training_steps=config.training_steps, num_shards=num_shards,
      views=train.ViewConfig(
          num_large=v.num_large, num_small=v.num_small, large_size=v.large_size,
          small_size=v.small_size, large_scale=tuple(v.large_scale),
          small_scale=tuple(v.small_scale), presets=presets),
      network=train.NetworkConfig(
          encoder=n.encoder, width_multiplier=n.width_multiplier, small_images=n.small_images,
          compute_dtype=n.compute_dtype, remat=n.remat,
          projector_hidden_size=n.projector_hidden_size,
          projection_size=n.projection_size, predictor_hidden_size=n.predictor_hidden_size),
      loss=train.LossConfig(
          knn_k=s.knn_k, num_semantic_positives=s.num_semantic_positives,
          temperature=s.temperature, contrastive_weight=s.contrastive_weight,
          semantic_weight=s.semantic_weight, invariance_weight=s.invariance_weight,
          num_negatives=s.num_negatives,
          **{f: s.get(f, _LOSS_SWITCH_DEFAULTS[f]) for f in _LOSS_SWITCHES}),
      optim=train.OptimConfig(
          base_learning_rate=o.base_learning_rate, weight_decay=o.weight_decay,
          momentum=o.momentum, trust_coefficient=o.trust_coefficient,
          warmup_steps=o.warmup_steps, probe_learning_rate=config.probe.learning_rate,
          target_base_decay=config.target.base_decay))


class Experiment(mesh_experiment.MeshExperiment):
  """SemPPL pre-training (see the module docstring)."""

  def __init__(self, mode: str, init_rng: jax.Array, config: config_dict.ConfigDict):
    super().__init__(mode=mode, init_rng=init_rng)
    self.config = config
    self._mesh = parallel.make_mesh()
    num_devices = self._mesh.shape["data"]
    validate_config(config, num_devices=num_devices, num_processes=jax.process_count())
    self._train_config = train_config(config, num_devices)
    self._nets = train.build_networks(self._train_config.network, config.data.num_classes)
    init_key, self._root_key = jax.random.split(jnp.asarray(init_rng))
    v = config.views
    self._data = DataSource(config.data, config.evaluation, Views(
        num_large=v.num_large, large_size=v.large_size, large_scale=tuple(v.large_scale),
        num_small=v.num_small, small_size=v.small_size, small_scale=tuple(v.small_scale)))
    self._train_state = self._place(train.init_train_state(self._train_config, init_key))
    self._shardings = train.train_state_shardings(self._train_state, self._mesh)
    self._train_step = jax.jit(
        functools.partial(train.train_step, self._train_config),
        in_shardings=(self._shardings, parallel.data_sharding(self._mesh), None),
        out_shardings=(self._shardings, None), donate_argnums=(0,))
    self._embed = None
    c, t = config, self._train_config
    mesh_experiment.say(
        f"[setup] SemPPL pre-training | objective={c.objective} | "
        f"{data_description(c.data)} | {c.training_steps} steps of {c.data.labelled_batch_size}"
        f" labelled + {c.data.unlabelled_batch_size} unlabelled images | {t.views.num_large}x"
        f"{t.views.large_size}px + {t.views.num_small}x{t.views.small_size}px views | "
        f"{c.network.encoder} x{c.network.width_multiplier} | queue {c.queue.size} | "
        f"{num_devices} device(s), {jax.process_count()} process(es)")
    self._prefetched = None  # (step, global batch) built while the previous step ran.

  def _state_tree(self) -> Dict[str, Any]:
    return self._train_state.to_dict()

  def _place(self, tree) -> train.TrainState:
    state = tree if isinstance(tree, train.TrainState) else train.TrainState.from_dict(tree)
    return jax.device_put(state, train.train_state_shardings(state, self._mesh))

  def _check_finite(self) -> None:
    """Raises ``FloatingPointError`` naming the step and the first non-finite check if the
    train step's guard refused an update (``train.guard_nonfinite``); fetches two int32 [].
    """
    with jax.transfer_guard_device_to_host("allow"):
      step, check = (int(x) for x in jax.device_get(
          (self._train_state.nonfinite_step, self._train_state.nonfinite_check)))
    if step < 0:
      return
    names = train.nonfinite_check_names(self._recent[-1] if self._recent else ())
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
    with jax.set_mesh(self._mesh):
      self._train_state, metrics = self._train_step(self._train_state, batch, key)
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

      def embed(params, state, probe_params, images):
        x = augmentations.normalize(evaluation.preprocess(images))
        (embedding, _, prediction), _ = nets.online.apply(params, state, None, x, False)
        logits = nets.probe.apply(probe_params, None, embedding)
        return losses.l2_normalize(embedding), losses.l2_normalize(prediction), logits

      replicated = parallel.replicated_sharding(self._mesh)
      data = parallel.data_sharding(self._mesh)
      self._embed = jax.jit(embed, in_shardings=(replicated,) * 3 + (data,),
                            out_shardings=(data, data, data))
    s = self._train_state
    fn = lambda images: self._embed(s.online_params, s.online_state, s.probe_params, images)
    return evaluation.embed_batches(fn, self._data.eval_batches(split), self._mesh,
                                    max_examples=max_examples)

  def evaluate(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """On the test split: online-probe top-1, weighted-kNN top-1 (the labelled training images
    as the bank) and queue-kNN top-1 (the pseudo-labeller applied to test images); plus the
    training monitors averaged over the last logging window."""
    del rng, writer
    c = self.config
    (emb, pred, logits), labels, mask = self._embed_split("test")
    (bank, _, _), bank_labels, bank_mask = self._embed_split("bank")
    results = {"probe_top1": evaluation.top1(jnp.argmax(logits, -1), labels, mask)}
    results.update(evaluation.knn_top1(
        emb, labels, mask, bank, bank_labels, bank_mask, ks=tuple(c.evaluation.knn_ks),
        num_classes=c.data.num_classes, temperature=c.evaluation.knn_temperature,
        mesh=self._mesh))
    objective = train.OBJECTIVES[c.objective]
    if objective.contrastive:
      queries = jnp.broadcast_to(pred, (c.views.num_large,) + pred.shape)
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

  # --- periodic evaluation, image summaries, end-of-run plots (semppl_jax/summaries.py) -------
  # Called by MeshExperiment.train_loop on every process (the computations are collective);
  # only process 0 writes TensorBoard events and files under <checkpoint_dir>/plots.

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


def _join(directory: str, name: str) -> str:
  """``directory/name`` for a local path or a URL (``gs://...``)."""
  return f"{directory.rstrip('/')}/{name}" if "://" in directory else os.path.join(directory, name)
