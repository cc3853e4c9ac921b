"""Supervised heads on a pre-trained encoder as pure functions: fine-tune and linear protocols.

* ``fine_tune``: every encoder weight plus a linear head trained on the labelled images
  (BatchNorm in training mode), each with its own learning rate;
* ``linear``: frozen encoder (BatchNorm in inference mode, no gradient), linear head.

Both use SGD (Nesterov momentum by default) on a warm-up + cosine schedule, with weight decay on
weights only. The evaluation experiment (``semppl_jax/jaxline/eval_experiment.py``) jits
:func:`train_step` over its mesh; everything here is an argument.
"""
import dataclasses
from typing import Any, Dict, Mapping, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from semppl_jax import augmentations
from semppl_jax import evaluation
from semppl_jax import networks
from semppl_jax import optim
from semppl_jax import train

PyTree = Any
PROTOCOLS = ("fine_tune", "linear")


@dataclasses.dataclass(frozen=True)
class FineTuneConfig:
  """Hyper-parameters of one protocol run (frozen, hashable).

  Attributes:
    protocol: 'fine_tune' or 'linear'.
    num_classes: C.
    network: the encoder (``train.NetworkConfig``; heads unused).
    batch_size: global labelled images per step (scales the learning rates: ``base * B/256``).
    training_steps: length of the cosine schedules.
    crop_size / crop_scale / flip: training views (random resized crop + flip).
    host_crops: the batch holds views already cropped on the host (flip only on device).
    encoder_base_learning_rate / head_base_learning_rate: per 256 images.
    momentum / nesterov / weight_decay / warmup_steps: SGD settings.
  """
  protocol: str
  num_classes: int
  network: train.NetworkConfig
  batch_size: int
  training_steps: int
  crop_size: int
  crop_scale: Tuple[float, float] = (0.08, 1.0)
  flip: bool = True
  host_crops: bool = False
  encoder_base_learning_rate: float = 0.01
  head_base_learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 0.0
  warmup_steps: int = 0

  def __post_init__(self):
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"protocol: got {self.protocol!r}, allowed: {', '.join(PROTOCOLS)}.")


def encoder(network: train.NetworkConfig) -> hk.TransformedWithState:
  """``images, is_training -> embedding`` with the release's top-level parameter names."""
  return hk.transform_with_state(
      lambda images, is_training: train.encoder_fn(network)(images, is_training))


def schedules(config: FineTuneConfig) -> Dict[str, optax.Schedule]:
  """Learning rates of what trains: ``'head'``, and ``'encoder'`` for fine_tune."""
  names = ("head", "encoder") if config.protocol == "fine_tune" else ("head",)
  base = {"head": config.head_base_learning_rate,
          "encoder": config.encoder_base_learning_rate}
  return {name: optim.learning_rate_schedule(
      base_learning_rate=base[name], batch_size=config.batch_size,
      total_steps=max(config.training_steps, 1), warmup_steps=config.warmup_steps)
          for name in names}


def optimizers(config: FineTuneConfig) -> Dict[str, optax.GradientTransformation]:
  """SGD per trained part; weight decay on weights only (not biases / BatchNorm)."""
  return {name: optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=optim.lars_mask),
      optax.sgd(schedule, momentum=config.momentum or None,
                nesterov=config.nesterov and config.momentum > 0))
          for name, schedule in schedules(config).items()}


def init_state(config: FineTuneConfig, encoder_params: PyTree, encoder_state: PyTree,
               key: jax.Array) -> Dict[str, Any]:
  """``{'encoder_params', 'encoder_state', 'head_params', 'opt_state'}`` for a fresh head."""
  width = networks.embedding_size(config.network.encoder, config.network.width_multiplier)
  head_params = evaluation.linear_head(config.num_classes).init(
      key, jnp.zeros((1, width), jnp.float32))
  trainable = {"head": head_params, "encoder": encoder_params}
  return {"encoder_params": encoder_params, "encoder_state": encoder_state,
          "head_params": head_params,
          "opt_state": {name: tx.init(trainable[name])
                        for name, tx in optimizers(config).items()}}


def train_step(config: FineTuneConfig, state: Mapping[str, Any], images: jax.Array,
               labels: jax.Array, key: jax.Array, step: jax.Array
               ) -> Tuple[Dict[str, Any], Dict[str, jax.Array]]:
  """One SGD step on a labelled batch.

  Args:
    config: the hyper-parameters.
    state: from :func:`init_state`.
    images: uint8 or float ``[B, H, W, C]`` (whole images, or host crops with ``host_crops``).
    labels: int32 ``[B]`` in ``[0, C)``.
    key: this step's PRNG key.
    step: int32 [] (the schedules' position).

  Returns:
    ``(new_state, metrics)``: float32 [] device scalars ``'{protocol}_loss'``,
    ``'{protocol}_train_top1'`` and ``'{protocol}_{head|encoder}_learning_rate'``.
  """
  p = config.protocol
  fine_tune = p == "fine_tune"
  enc, head = encoder(config.network), evaluation.linear_head(config.num_classes)
  k_crop, k_flip = jax.random.split(key)
  x = evaluation.preprocess(images)
  if not config.host_crops:
    x = augmentations.random_resized_crop(x, k_crop, output_size=config.crop_size,
                                          scale=config.crop_scale)
  x = augmentations.normalize(augmentations.random_flip(x, k_flip) if config.flip else x)

  def loss_fn(trainable):
    if fine_tune:
      embedding, encoder_state = enc.apply(trainable["encoder"], state["encoder_state"], None,
                                           x, True)
    else:  # Frozen: inference-mode BatchNorm, state untouched, no gradient.
      embedding = jax.lax.stop_gradient(enc.apply(
          state["encoder_params"], state["encoder_state"], None, x, False)[0])
      encoder_state = state["encoder_state"]
    loss, logits = evaluation.classifier_loss(head, trainable["head"], embedding, labels)
    return loss, (encoder_state, logits)

  trainable = {"head": state["head_params"]}
  if fine_tune:
    trainable["encoder"] = state["encoder_params"]
  (loss, (encoder_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  new_state = dict(state, opt_state=dict(state["opt_state"]))
  for name, tx in optimizers(config).items():
    updates, new_state["opt_state"][name] = tx.update(grads[name], state["opt_state"][name],
                                                      trainable[name])
    trainable[name] = optax.apply_updates(trainable[name], updates)
  new_state["head_params"] = trainable["head"]
  if fine_tune:
    new_state.update(encoder_params=trainable["encoder"], encoder_state=encoder_state)
  metrics = {f"{p}_loss": loss, f"{p}_train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}
  metrics.update({f"{p}_{name}_learning_rate": schedule(step)
                  for name, schedule in schedules(config).items()})
  return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
