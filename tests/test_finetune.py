"""Tests for semppl_jax.finetune: the fine-tune and linear protocols' pure step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import augmentations
from semppl_jax import finetune
from semppl_jax import train

NETWORK = train.NetworkConfig(encoder="tiny_resnet", small_images=True)


def _config(protocol, **kwargs):
  return finetune.FineTuneConfig(protocol=protocol, num_classes=3, network=NETWORK,
                                 batch_size=8, training_steps=4, crop_size=12,
                                 crop_scale=(0.5, 1.0), head_base_learning_rate=1.0,
                                 encoder_base_learning_rate=0.5, **kwargs)


@pytest.fixture(scope="module")
def encoder_and_batch():
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randint(0, 256, (8, 16, 16, 1)).astype(np.uint8))
  labels = jnp.asarray(rng.randint(0, 3, (8,)).astype(np.int32))
  params, state = finetune.encoder(NETWORK).init(jax.random.PRNGKey(1),
                                                 jnp.zeros((2, 12, 12, 3)), True)
  return params, state, images, labels


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


@pytest.mark.slow
def test_linear_keeps_the_encoder_and_matches_a_numpy_head(encoder_and_batch):
  params, state, images, labels = encoder_and_batch
  config = _config("linear", flip=False)
  s0 = finetune.init_state(config, params, state, jax.random.PRNGKey(2))
  key = jax.random.PRNGKey(3)
  s1, metrics = jax.jit(finetune.train_step, static_argnums=0)(config, s0, images, labels, key,
                                                               jnp.int32(1))
  assert _leaves_equal(s1["encoder_params"], params)
  assert _leaves_equal(s1["encoder_state"], state)
  assert set(s1["opt_state"]) == {"head"}
  # The loss is the head's cross-entropy on the frozen, inference-mode embedding.
  k_crop, _ = jax.random.split(key)
  x = augmentations.random_resized_crop(images.astype(jnp.float32) / 255.0, k_crop,
                                        output_size=12, scale=(0.5, 1.0))
  x = augmentations.normalize(jnp.broadcast_to(x, x.shape[:-1] + (3,)))
  emb = np.asarray(finetune.encoder(NETWORK).apply(params, state, None, x, False)[0])
  w = np.asarray(s0["head_params"]["linear"]["w"])
  b = np.asarray(s0["head_params"]["linear"]["b"])
  logits = emb @ w + b
  logits -= logits.max(-1, keepdims=True)
  ce = -(logits[np.arange(8), labels] - np.log(np.exp(logits).sum(-1)))
  np.testing.assert_allclose(float(metrics["linear_loss"]), ce.mean(), rtol=1e-5)
  # Warm-up 0, cosine over 4 steps, base 1.0 x 8/256 at step 1.
  expected_lr = 8 / 256 * 0.5 * (1 + np.cos(np.pi * 1 / 4))
  np.testing.assert_allclose(float(metrics["linear_head_learning_rate"]), expected_lr, rtol=1e-6)
  assert not _leaves_equal(s1["head_params"], s0["head_params"])


@pytest.mark.slow
def test_fine_tune_trains_encoder_and_its_batchnorm(encoder_and_batch):
  params, state, images, labels = encoder_and_batch
  config = _config("fine_tune")
  s0 = finetune.init_state(config, params, state, jax.random.PRNGKey(2))
  s1, metrics = finetune.train_step(config, s0, images, labels, jax.random.PRNGKey(3),
                                    jnp.int32(0))
  assert set(metrics) == {"fine_tune_loss", "fine_tune_train_top1",
                          "fine_tune_head_learning_rate", "fine_tune_encoder_learning_rate"}
  assert float(metrics["fine_tune_encoder_learning_rate"]) == 0.5 * 8 / 256
  assert not _leaves_equal(s1["encoder_params"], params)
  assert not _leaves_equal(s1["encoder_state"], state)


def test_host_crops_skip_the_device_crop(encoder_and_batch):
  params, state, _, labels = encoder_and_batch
  views = jnp.asarray(np.random.RandomState(4).randint(0, 256, (8, 12, 12, 3)).astype(np.uint8))
  config = _config("linear", host_crops=True)
  s0 = finetune.init_state(config, params, state, jax.random.PRNGKey(2))
  _, metrics = finetune.train_step(config, s0, views, labels, jax.random.PRNGKey(3),
                                   jnp.int32(0))
  assert np.isfinite(float(metrics["linear_loss"]))
  # Without host_crops the same 12 px input would be cropped again: a different loss.
  _, other = finetune.train_step(dataclasses.replace(config, host_crops=False), s0, views,
                                 labels, jax.random.PRNGKey(3), jnp.int32(0))
  assert float(other["linear_loss"]) != float(metrics["linear_loss"])


def test_bad_protocol_is_refused():
  with pytest.raises(ValueError, match="protocol: got 'knn', allowed: fine_tune, linear"):
    _config("knn")
