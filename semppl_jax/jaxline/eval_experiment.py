"""jaxline Experiment: evaluation of a pre-trained encoder (fine-tune, linear, kNN).

Three protocols, kept apart and named in every reported number (``config.protocol``):

* ``'fine_tune'``: every encoder weight plus a linear head trained on the labelled subset only
  (the paper's 1 % / 10 % protocol); BatchNorm in training mode; SGD with Nesterov momentum,
  cosine learning rate; the encoder and the head have their own learning rates.
* ``'linear'``: frozen encoder, BatchNorm in inference mode, a linear head on the stop-gradient
  embedding, trained on the labelled subset (the release's protocol).
* ``'knn'``: frozen embeddings, cosine kNN with temperature-weighted votes over a bank of the
  labelled training images; no training step (``training_steps`` may be 0).

Training views: random resized crop + flip on device. Evaluation views: the whole image, resized
to ``augmentation.crop_size``. The encoder comes from ``config.checkpoint``: ``source='pretrain'``
(a pre-training run's ``<checkpoint_dir>/checkpoints``), ``'release'`` (a released ``.pkl``) or
``'none'`` (random initialisation); it must match ``config.network`` name for name
(``semppl_jax.encoders``). Metrics (test split): ``'{protocol}_top1'``; for kNN
``'knn_top1_k{k}'`` for every ``k`` in ``evaluation.knn_ks`` and ``'knn_top1'`` (the first).
Complete config: ``experiments/eval_fashion_mnist.py``.
"""
from typing import Any, Dict, Mapping

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from semppl_jax import checkpointing
from semppl_jax import encoders
from semppl_jax import evaluation
from semppl_jax.jaxline import experiment_config
from semppl_jax import finetune
from semppl_jax.jaxline import mesh_experiment
from semppl_jax import parallel
from semppl_jax import train
from semppl_jax.jaxline.data_source import DataSource, Views


class EvalExperiment(mesh_experiment.MeshExperiment):
  """Fine-tune / linear / kNN evaluation of an encoder (see the module docstring).

  Train state (all replicated): ``encoder_params``, ``encoder_state``, and for fine_tune /
  linear ``head_params`` (``{'linear': {'w': [F, C], 'b': [C]}}``) and ``opt_state``
  (``{'head': ..., 'encoder': ...}``; ``'encoder'`` for fine_tune only).
  """

  def __init__(self, mode: str, init_rng: jax.Array, config: config_dict.ConfigDict):
    super().__init__(mode=mode, init_rng=init_rng)
    self.config = config
    self._mesh = parallel.make_mesh()
    experiment_config.validate_eval_config(config, num_devices=self._mesh.shape["data"],
                                           num_processes=jax.process_count())
    self._protocol = config.protocol
    self._PROGRESS_PREFIX = config.protocol  # pylint: disable=invalid-name
    init_key, self._root_key = jax.random.split(jnp.asarray(init_rng))
    n = config.network
    self._network = train.NetworkConfig(
        encoder=n.encoder, width_multiplier=n.width_multiplier, small_images=n.small_images,
        compute_dtype=n.compute_dtype)
    self._encoder = finetune.encoder(self._network)
    a = config.augmentation
    self._data = DataSource(self._data_source_config(), _without_max_examples(config.evaluation),
                            Views(num_large=1, large_size=a.crop_size,
                                  large_scale=tuple(a.crop_scale)))
    self._source_info = ""
    self._train_state = self._place(self._init_state(init_key))
    self._train_step = None
    self._embed = None
    mesh_experiment.say(
        f"[setup] evaluation | protocol={config.protocol} | "
        f"{experiment_config.data_description(config.data)} | encoder {config.network.encoder} "
        f"x{config.network.width_multiplier} from {self._source_info} | "
        f"{self._mesh.shape['data']} device(s), {jax.process_count()} process(es)")

  def _data_source_config(self) -> config_dict.ConfigDict:
    """The DataSource's data config: labelled batches of ``data.batch_size`` images."""
    d = self.config.data
    cfg = config_dict.ConfigDict(d.to_dict())
    cfg.labelled_batch_size = d.batch_size
    # DataSource always builds a semi-supervised stream; one unlabelled image per host is the
    # smallest it accepts. Those images never leave the host.
    cfg.unlabelled_batch_size = jax.process_count()
    cfg.unlabelled_dir = d.labelled_dir
    return cfg

  def _place(self, tree):
    return jax.device_put(tree, parallel.replicated_sharding(self._mesh))

  # --- encoder and state ---------------------------------------------------------------------

  def _load_encoder(self, key, expected_params, expected_state):
    c = self.config.checkpoint
    if c.source == "none":
      self._source_info = ("random initialisation (BatchNorm statistics of the first labelled "
                           "batch)")
      return self._random_encoder(key)
    try:
      params, state, self._source_info, _ = encoders.read_encoder(
          c.path, kind=c.source, encoder_prefix=c.encoder_prefix or None)
    except checkpointing.CheckpointError as e:
      raise checkpointing.CheckpointError(f"config.checkpoint.path: {e}") from e
    encoders.check_encoder(
        params, state, expected_params, expected_state,
        f"config.checkpoint.path={c.path!r} "
        f"({'release' if c.source == 'release' else 'pre-training'} checkpoint)",
        self.config.network)
    cast = lambda tree, like: {m: {k: jnp.asarray(v, like[m][k].dtype) for k, v in leaves.items()}
                               for m, leaves in tree.items()}
    return cast(params, expected_params), cast(state, expected_state)

  def _random_encoder(self, key: jax.Array):
    """Random weights, and BatchNorm statistics from one training-mode pass over the first
    labelled batch: Haiku's fresh running averages are zero, which would make an
    inference-mode (linear, kNN) baseline divide by sqrt(eps)."""
    images = parallel.host_local_to_global(_labelled_images(self._data.train_batch(0)),
                                           self._mesh)
    size = self.config.augmentation.crop_size

    def init(key, images):
      x = evaluation.eval_view(images, size)
      params, state = self._encoder.init(key, x, True)
      return params, self._encoder.apply(params, state, None, x, True)[1]

    replicated = parallel.replicated_sharding(self._mesh)
    with jax.set_mesh(self._mesh):
      return jax.jit(init, in_shardings=(replicated, parallel.data_sharding(self._mesh)),
                     out_shardings=replicated)(key, images)

  def _finetune_config(self) -> finetune.FineTuneConfig:
    c, a, o = self.config, self.config.augmentation, self.config.optimizer
    return finetune.FineTuneConfig(
        protocol=c.protocol, num_classes=c.data.num_classes, network=self._network,
        batch_size=c.data.batch_size, training_steps=c.training_steps, crop_size=a.crop_size,
        crop_scale=tuple(a.crop_scale), flip=a.flip,
        host_crops=c.data.dataset != "fashion_mnist",
        encoder_base_learning_rate=o.encoder_base_learning_rate,
        head_base_learning_rate=o.head_base_learning_rate, momentum=o.momentum,
        nesterov=o.nesterov, weight_decay=o.weight_decay, warmup_steps=o.warmup_steps)

  def _init_state(self, key: jax.Array) -> Dict[str, Any]:
    k_encoder, k_head = jax.random.split(key)
    size = self.config.augmentation.crop_size
    dummy = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    expected = jax.eval_shape(lambda k, x: self._encoder.init(k, x, True), k_encoder, dummy)
    params, state = self._load_encoder(k_encoder, *expected)
    if self._protocol == "knn":
      return {"encoder_params": params, "encoder_state": state}
    return finetune.init_state(self._finetune_config(), params, state, k_head)

  # --- training ------------------------------------------------------------------------------

  def _make_train_step(self):
    config = self._finetune_config()

    def train_step(state, images, labels, step):
      return finetune.train_step(config, state, images, labels,
                                 jax.random.fold_in(self._root_key, step), step)

    replicated = parallel.replicated_sharding(self._mesh)
    data = parallel.data_sharding(self._mesh)
    return jax.jit(train_step, in_shardings=(replicated, data, data, None),
                   out_shardings=(replicated, None), donate_argnums=(0,))

  def step(self, *, global_step, rng, writer=None) -> Dict[str, jax.Array]:
    """One training step on a labelled batch.

    Returns:
      Device scalars ``'{protocol}_loss'``, ``'{protocol}_train_top1'`` and
      ``'{protocol}_{head|encoder}_learning_rate'`` (nothing is fetched).
    """
    del rng, writer  # Keys are fold_in(root, step).
    if self._protocol == "knn":
      raise ValueError("config.protocol: 'knn' has no training step; set training_steps=0.")
    step = mesh_experiment.as_int(global_step)
    if self._train_step is None:
      self._train_step = self._make_train_step()
    batch = self._data.train_batch(step)
    # Only the labelled images: every protocol trains on the labelled subset only.
    g = parallel.host_local_to_global(
        {"images": _labelled_images(batch), "labels": batch["labels"]}, self._mesh)
    with jax.set_mesh(self._mesh):
      self._train_state, metrics = self._train_step(self._train_state, g["images"], g["labels"],
                                                    jnp.int32(step))
    self._remember(metrics)
    return metrics

  def should_run_step(self, global_step: int, config: config_dict.ConfigDict) -> bool:
    """jaxline's rule (``global_step < training_steps``); never for kNN, which has no steps."""
    return self._protocol != "knn" and super().should_run_step(global_step, config)

  # --- evaluation ----------------------------------------------------------------------------

  def embed_split(self, split: str, max_examples: int = 0):
    """``(embeddings [N, F], logits [N, C] or [N, 0], labels [N], mask [N])`` of a split
    (``'test'`` or ``'bank'``), BatchNorm in inference mode, as global arrays sharded along
    ``N``; ``max_examples`` as in ``evaluation.embed_batches``."""
    if self._embed is None:
      with_head = self._protocol != "knn"
      head = evaluation.linear_head(self.config.data.num_classes)

      def forward(weights, views):
        encoder_params, encoder_state, head_params = weights
        embedding, _ = self._encoder.apply(encoder_params, encoder_state, None, views, False)
        logits = (head.apply(head_params, None, embedding) if with_head
                  else embedding[:, :0])
        return embedding, logits

      self._embed = encoders.make_embedder(forward, self._mesh,
                                           image_size=self.config.augmentation.crop_size)
    s = self._train_state
    weights = (s["encoder_params"], s["encoder_state"], s.get("head_params", {}))
    fn = lambda images: self._embed(weights, images)
    (emb, logits), labels, mask = evaluation.embed_batches(
        fn, self._data.eval_batches(split), self._mesh, max_examples)
    return emb, logits, labels, mask

  def evaluate(self, *, global_step, rng, writer=None) -> Dict[str, float]:
    """Top-1 of the protocol on the test split (module docstring), plus
    ``num_test_examples`` and ``global_step``."""
    del rng, writer
    c = self.config
    emb, logits, labels, mask = self.embed_split("test", c.evaluation.max_examples)
    if self._protocol == "knn":
      bank, _, bank_labels, bank_mask = self.embed_split("bank")
      results = evaluation.knn_top1(
          emb, labels, mask, bank, bank_labels, bank_mask, ks=tuple(c.evaluation.knn_ks),
          num_classes=c.data.num_classes, temperature=c.evaluation.knn_temperature,
          mesh=self._mesh)
      results["knn_top1"] = results[f"knn_top1_k{c.evaluation.knn_ks[0]}"]
    else:
      results = {f"{self._protocol}_top1": evaluation.top1(jnp.argmax(logits, -1), labels, mask)}
    results["num_test_examples"] = float(jnp.sum(mask))
    results["global_step"] = float(mesh_experiment.as_int(global_step))
    return results

  def _progress(self, scalars: Mapping[str, Any]) -> str:
    p = self._protocol
    return " | ".join(f"{k[len(p) + 1:]} {float(v):.4g}" for k, v in scalars.items())

  def _report(self, results: Mapping[str, float]) -> None:
    c, p, say = self.config, self._protocol, mesh_experiment.say
    say(f"[eval {p}] protocol={p} dataset={c.data.dataset} labels={c.data.label_percent}% "
        f"encoder={c.network.encoder} x{c.network.width_multiplier} "
        f"step={int(results['global_step'])}")
    say(f"[eval {p}] encoder from {self._source_info}")
    examples = int(results["num_test_examples"])
    for key, value in results.items():
      if key in ("global_step", "num_test_examples", "knn_top1"):
        continue
      label = {"fine_tune_top1": "fine-tune top-1", "linear_top1": "linear top-1"}.get(key, key)
      if key.startswith("knn_top1_k"):
        label = (f"kNN top-1 (k={key[len('knn_top1_k'):]}, "
                 f"τ={c.evaluation.knn_temperature}, labelled train bank)")
      say(f"[eval {p}]   {label} (test, {examples} images): {100 * value:.2f}%")


def _without_max_examples(eval_config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """``evaluation.max_examples`` applies to the test split only (in ``embed_split``), so the
  DataSource, which would also cut the kNN bank, gets 0."""
  cfg = config_dict.ConfigDict(eval_config.to_dict())
  cfg.max_examples = 0
  return cfg


def _labelled_images(batch: Mapping[str, Any]) -> Any:
  """The labelled images of a training batch: whole images (Fashion-MNIST) or the one view the
  host pipeline cropped from each full image (ImageNet, image folders)."""
  if "labelled_images" in batch:
    return batch["labelled_images"]
  return batch["labelled_large"][:, 0]
