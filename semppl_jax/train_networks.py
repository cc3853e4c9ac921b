"""The networks and optimisers that a :class:`~semppl_jax.train_config.TrainConfig` describes.

The online, target and probe Haiku functions (:func:`build_networks`), and the online network's
LARS on its warm-up + cosine schedule and the probe's Adam. Re-exported by
:mod:`semppl_jax.train`, whose state and step use them.
"""
from typing import Any, NamedTuple

import haiku as hk
import jax.numpy as jnp
import optax

from semppl_jax import evaluation
from semppl_jax import networks
from semppl_jax import optim
from semppl_jax.train_config import NetworkConfig, TrainConfig

PyTree = Any


class Networks(NamedTuple):
  """The transformed Haiku functions of pre-training.

  The encoder sits at the top level, so its parameter names match the released checkpoints
  (``res_net50/~/...``); the target's names are a subset of the online ones (no predictor).
  """
  online: hk.TransformedWithState   # images, is_training -> (embedding, projection, prediction)
  target: hk.TransformedWithState   # images, is_training -> projection
  probe: hk.Transformed             # embedding -> logits


def compute_dtype(name: str) -> jnp.dtype:
  """'float32' / 'bfloat16' -> the jnp dtype."""
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def encoder_fn(network: NetworkConfig):
  """``images, is_training -> embedding`` (to be called inside a Haiku transform)."""
  return networks.make_encoder(network.encoder, width_multiplier=network.width_multiplier,
                               small_images=network.small_images,
                               compute_dtype=compute_dtype(network.compute_dtype),
                               remat=network.remat)


def build_networks(network: NetworkConfig, num_classes: int) -> Networks:
  """Online, target and probe functions for ``network`` and ``num_classes`` classes."""

  def encoder_and_projector(images, is_training):
    embedding = encoder_fn(network)(images, is_training)
    projection = networks.MLP(network.projector_hidden_size, network.projection_size,
                              name="projector")(embedding, is_training)
    return embedding, projection

  def online_fn(images, is_training):
    embedding, projection = encoder_and_projector(images, is_training)
    prediction = networks.MLP(network.predictor_hidden_size, network.projection_size,
                              name="predictor")(projection, is_training)
    return embedding, projection, prediction

  def target_fn(images, is_training):
    return encoder_and_projector(images, is_training)[1]

  return Networks(hk.transform_with_state(online_fn), hk.transform_with_state(target_fn),
                  evaluation.linear_head(num_classes, name="classifier"))


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Warm-up + cosine schedule of the online network (``base * B / 256`` at the peak)."""
  return optim.learning_rate_schedule(
      base_learning_rate=config.optim.base_learning_rate, batch_size=config.batch_size,
      total_steps=config.training_steps, warmup_steps=config.optim.warmup_steps)


def online_optimizer(config: TrainConfig, online_params: PyTree) -> optax.GradientTransformation:
  """LARS (bias / BatchNorm excluded) on the schedule; ``online_params`` gives the masks."""
  o = config.optim
  return optim.lars(learning_rate_schedule(config), online_params,
                    weight_decay=o.weight_decay, momentum=o.momentum,
                    trust_coefficient=o.trust_coefficient)


def probe_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Adam for the online probe."""
  return optax.adam(config.optim.probe_learning_rate)


# ----------------------------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------------------------
