"""Tests for semppl_jax.optim against closed-form values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from semppl_jax import optim


def _params():
  return {
      "res_net18/~/initial_conv": {"w": jnp.ones((3, 3, 3, 4))},
      "res_net18/~/initial_batchnorm": {"scale": jnp.ones((1, 1, 1, 4)),
                                         "offset": jnp.ones((1, 1, 1, 4))},
      "projector/~/linear": {"w": jnp.ones((4, 2)), "b": jnp.ones((2,))},
  }


def test_learning_rate_schedule_values():
  sched = optim.learning_rate_schedule(
      base_learning_rate=0.3, batch_size=512, total_steps=100, warmup_steps=10)
  peak = 0.3 * 512 / 256
  np.testing.assert_allclose(sched(0), 0.0)
  np.testing.assert_allclose(sched(5), peak * 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10), peak, rtol=1e-6)
  # Cosine from the end of warm-up to the last step.
  np.testing.assert_allclose(
      sched(55), peak * 0.5 * (1 + math.cos(math.pi * 45 / 90)), rtol=1e-5)
  np.testing.assert_allclose(sched(100), 0.0, atol=1e-7)


@pytest.mark.parametrize("kwargs, field", [
    (dict(total_steps=0, warmup_steps=0, batch_size=8), "total_steps"),
    (dict(total_steps=10, warmup_steps=11, batch_size=8), "warmup_steps"),
    (dict(total_steps=10, warmup_steps=1, batch_size=0), "batch_size"),
])
def test_learning_rate_schedule_rejects_bad_values(kwargs, field):
  with pytest.raises(ValueError, match=field):
    optim.learning_rate_schedule(base_learning_rate=0.1, **kwargs)


def test_target_ema_decay_schedule():
  np.testing.assert_allclose(optim.target_ema_decay(0, base_decay=0.99, total_steps=50), 0.99,
                             rtol=1e-6)
  np.testing.assert_allclose(optim.target_ema_decay(25, base_decay=0.99, total_steps=50), 0.995,
                             rtol=1e-6)
  np.testing.assert_allclose(optim.target_ema_decay(50, base_decay=0.99, total_steps=50), 1.0)
  with pytest.raises(ValueError, match="base_decay"):
    optim.target_ema_decay(0, base_decay=1.5, total_steps=5)


def test_target_ema_update():
  online = {"m": {"w": jnp.full((2,), 3.0)}}
  target = {"m": {"w": jnp.full((2,), 1.0)}}
  new = optim.target_ema(online, target, jnp.float32(0.75))
  np.testing.assert_allclose(new["m"]["w"], 0.75 * 1.0 + 0.25 * 3.0)


def _ema_trees(seed):
  rng = np.random.default_rng(seed)
  tree = lambda: {"enc/~/conv": {"w": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
                  "head/linear": {"w": rng.normal(size=(4, 5)).astype(np.float32),
                                  "b": rng.normal(size=(5,)).astype(np.float32)}}
  return tree(), tree()


def test_target_ema_matches_numpy_over_steps_with_the_byol_schedule():
  # Ten EMA steps with the cosine decay schedule, each against the online values of that step.
  online_steps = [_ema_trees(seed)[0] for seed in range(10)]
  target = _ema_trees(100)[1]
  expected = jax.tree_util.tree_map(lambda x: x.astype(np.float64), target)
  update = jax.jit(optim.target_ema)
  for step, online in enumerate(online_steps):
    decay = optim.target_ema_decay(step, base_decay=0.9, total_steps=10)
    target = update(online, target, decay)
    d = float(decay)
    expected = jax.tree_util.tree_map(lambda t, o: d * t + (1.0 - d) * o, expected, online)
  for got, want in zip(jax.tree_util.tree_leaves(target), jax.tree_util.tree_leaves(expected)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_target_ema_endpoints_and_dtypes():
  online, target = _ema_trees(0)
  kept = optim.target_ema(online, target, jnp.float32(1.0))
  copied = optim.target_ema(online, target, jnp.float32(0.0))
  for k, c, o, t in zip(*map(jax.tree_util.tree_leaves, (kept, copied, online, target))):
    np.testing.assert_array_equal(np.asarray(k), t)
    np.testing.assert_array_equal(np.asarray(c), o)
  # A bfloat16 target stays bfloat16 under a float32 decay.
  target16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), target)
  new16 = optim.target_ema(online, target16, jnp.float32(0.5))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(new16))


def test_lars_mask_excludes_bias_and_batchnorm():
  mask = optim.lars_mask(_params())
  assert mask["res_net18/~/initial_conv"]["w"] is True
  assert mask["res_net18/~/initial_batchnorm"]["scale"] is False
  assert mask["res_net18/~/initial_batchnorm"]["offset"] is False
  assert mask["projector/~/linear"]["w"] is True
  assert mask["projector/~/linear"]["b"] is False


def test_lars_leaves_bias_and_batchnorm_untouched_by_weight_decay():
  params = _params()
  # Zero gradients: only weight decay can move a parameter.
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  tx = optim.lars(0.1, params, weight_decay=0.5, momentum=0.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for module, name in [("res_net18/~/initial_batchnorm", "scale"),
                       ("res_net18/~/initial_batchnorm", "offset"),
                       ("projector/~/linear", "b")]:
    np.testing.assert_array_equal(new[module][name], params[module][name])
  # Adapted weights shrink: w - lr * trust * (wd * w), trust = eta * |w| / |wd * w| = eta / wd.
  w = params["projector/~/linear"]["w"]
  expected = w - 0.1 * (1e-3 / 0.5) * 0.5 * w
  np.testing.assert_allclose(new["projector/~/linear"]["w"], expected, rtol=1e-5)


def test_lars_unadapted_parameters_get_plain_sgd():
  params = _params()
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 2.0), params)
  tx = optim.lars(0.1, params, weight_decay=0.5, momentum=0.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["projector/~/linear"]["b"], -0.1 * 2.0)
