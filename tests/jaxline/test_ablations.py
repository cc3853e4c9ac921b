"""Tests for the SemPPL ablation switches of semppl_jax.train.LossConfig and their config wiring.

Each switch defaults to docs/design.md §2 as written; the tests check what each one changes in
``train.objective_loss`` on a tiny configuration (tiny ResNet, 12 px / 8 px views, batch 4 + 4).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import augmentations
from semppl_jax.jaxline import experiment_config
from semppl_jax import queue as queue_lib
from semppl_jax import train

NUM_CLASSES = 4


def _config(**loss):
  return train.TrainConfig(
      objective="semppl", num_classes=NUM_CLASSES, labelled_batch_size=4,
      unlabelled_batch_size=4, queue_size=16, training_steps=10, num_shards=1,
      views=train.ViewConfig(num_large=2, num_small=1, large_size=12, small_size=8,
                             large_scale=(0.5, 1.0), small_scale=(0.3, 0.6)),
      network=train.NetworkConfig(encoder="tiny_resnet", small_images=True,
                                  projector_hidden_size=16, projection_size=8,
                                  predictor_hidden_size=16),
      loss=train.LossConfig(**loss),
      optim=train.OptimConfig(base_learning_rate=1.0, warmup_steps=2))


def _batch():
  rng = np.random.RandomState(0)
  return jax.tree_util.tree_map(jnp.asarray, {
      "labelled_images": rng.randint(0, 256, (4, 16, 16, 1)).astype(np.uint8),
      "labels": rng.randint(0, NUM_CLASSES, (4,)).astype(np.int32),
      "unlabelled_images": rng.randint(0, 256, (4, 16, 16, 1)).astype(np.uint8),
      "unlabelled_labels": rng.randint(0, NUM_CLASSES, (4,)).astype(np.int32),
  })


@pytest.fixture(scope="module")
def state():
  config = _config()
  s = train.init_train_state(config, jax.random.PRNGKey(0))
  rng = np.random.RandomState(1)
  emb = rng.randn(2, 16, 8).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  labels = np.tile(np.arange(16) % NUM_CLASSES, (2, 1)).astype(np.int32)
  return s._replace(queue=queue_lib.Queue(jnp.asarray(emb), jnp.asarray(labels),
                                          jnp.zeros((), jnp.int32)))


def _loss(config, state, key=jax.random.PRNGKey(5)):
  return train.objective_loss(config, state.online_params, state.probe_params,
                              state.target_params, state, _batch(), key)


def test_defaults_are_design_as_written():
  c = train.LossConfig()
  assert (c.mask_same_class_negatives, c.semantic_ramp_steps,
          c.bn_stats_from_large_views_only) == (False, 0, False)


@pytest.mark.slow
def test_semantic_ramp_scales_the_semantic_terms_by_step(state):
  plain_loss, plain = _loss(_config(), state)
  assert float(plain.metrics["semantic_scale"]) == 1.0
  ramp = _config(semantic_ramp_steps=4)
  for step, scale in ((0, 0.0), (2, 0.5), (4, 1.0), (9, 1.0)):
    s = state._replace(step=jnp.asarray(step, jnp.int32))
    loss, fwd = _loss(ramp, s)
    assert float(fwd.metrics["semantic_scale"]) == scale
    m, lc = plain.metrics, ramp.loss  # Defaults: α = 5, λ_sem = 0.
    semantic = 0.3 * lc.semantic_weight * float(m["semantic_contrastive"]) + (
        lc.semantic_invariance_weight * float(m["semantic_invariance"]))
    np.testing.assert_allclose(float(plain_loss) - float(loss), (1 - scale) * semantic,
                               rtol=1e-4, atol=1e-6)


def test_same_class_masking_changes_only_the_semantic_terms(state):
  _, plain = _loss(_config(), state)
  _, masked = _loss(_config(mask_same_class_negatives=True), state)
  for key in ("augm_contrastive", "augm_invariance", "pseudo_label_accuracy"):
    assert float(masked.metrics[key]) == float(plain.metrics[key])
  # Fewer negatives of the anchor's own class: the semantic cross-entropy drops.
  assert float(masked.metrics["semantic_contrastive"]) < float(
      plain.metrics["semantic_contrastive"])


def test_bn_statistics_from_large_views_only(state):
  config = _config(bn_stats_from_large_views_only=True)
  key = jax.random.PRNGKey(5)
  _, fwd = _loss(config, state, key)
  _, fwd_default = _loss(_config(), state, key)
  # The same views and large-view pass as objective_loss, without the small views.
  nets = train.build_networks(config.network, NUM_CLASSES)
  k_views = jax.random.split(key, 3)[0]
  large, _ = train.make_views(config, _batch(), k_views, 1)
  # Batch-major, as the step flattens its views (train.forward).
  flat = augmentations.normalize(jnp.swapaxes(large, 0, 1).reshape((-1,) + large.shape[2:]))
  _, large_only = nets.online.apply(state.online_params, state.online_state, None, flat, True)
  leaves = jax.tree_util.tree_leaves
  for got, want in zip(leaves(fwd.online_state), leaves(large_only)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(np.asarray(a), np.asarray(b))
             for a, b in zip(leaves(fwd_default.online_state), leaves(large_only)))


def test_experiment_config_wiring():
  from experiments import fashion_mnist  # pylint: disable=g-import-not-at-top
  c = fashion_mnist.get_experiment_config(100)
  c.optimizer.warmup_steps = 10
  c.semppl.mask_same_class_negatives = True
  c.semppl.semantic_ramp_steps = 50
  c.semppl.bn_stats_from_large_views_only = True
  experiment_config.validate_pretrain_config(c, num_devices=8)
  loss = experiment_config.train_config(c, 8).loss
  assert (loss.mask_same_class_negatives, loss.semantic_ramp_steps,
          loss.bn_stats_from_large_views_only) == (True, 50, True)
  c.semppl.semantic_ramp_steps = -1
  with pytest.raises(ValueError, match="config.semppl.semantic_ramp_steps"):
    experiment_config.validate_pretrain_config(c, num_devices=8)
  c.semppl.semantic_ramp_steps = 0
  del c.semppl["mask_same_class_negatives"]
  c.semppl.mask_same_class_negatives = 1
  with pytest.raises(ValueError, match="config.semppl.mask_same_class_negatives"):
    experiment_config.validate_pretrain_config(c, num_devices=8)
  # Configs without the switches run docs/design.md §2 as written.
  d = fashion_mnist.get_experiment_config(100)
  d.optimizer.warmup_steps = 10
  for field in ("mask_same_class_negatives", "semantic_ramp_steps",
                "bn_stats_from_large_views_only"):
    if field in d.semppl:
      del d.semppl[field]
  assert experiment_config.train_config(d, 8).loss == train.LossConfig(
      knn_k=d.semppl.knn_k, num_semantic_positives=3, temperature=0.2, contrastive_weight=0.3,
      semantic_weight=5.0, invariance_weight=5.0, num_negatives=0)
