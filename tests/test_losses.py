"""Tests for semppl_jax.losses against independent float64 numpy references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import losses

V, L, N, B, D = 3, 2, 2, 6, 5
TAU = 0.3
WEIGHTS = dict(contrastive_weight=0.7, semantic_weight=0.4, invariance_weight=1.5)


# ----------------------------------------------------------------------------- numpy reference


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def np_kl(log_p_b, log_p_a):
  return float(np.sum(np.exp(log_p_b) * (log_p_b - log_p_a)))


def np_candidate_set(anchors, candidates, col_valid, tau, candidate_lists=None):
  """Explicit loops over rows and views. Returns per-entry CE, per-row invariance, top-1 lists.

  anchors [V, B, D], candidates [B, D], col_valid [B]; candidate_lists[i] (optional) = the
  row indices that are row i's candidates (default: all rows).
  """
  num_views, batch, _ = anchors.shape
  ce, inv, top1 = [], [], []
  for i in range(batch):
    if not col_valid[i]:
      continue
    pool = range(batch) if candidate_lists is None else candidate_lists[i]
    cols = [j for j in pool if col_valid[j]]
    log_ps = []
    for a in range(num_views):
      logits = np.array([anchors[a, i] @ candidates[j] / tau for j in cols])
      log_p = np_log_softmax(logits)
      log_ps.append(log_p)
      ce.append(-log_p[cols.index(i)])
      top1.append(float(cols[int(np.argmax(logits))] == i))
    pair_kls = [np_kl(log_ps[b], log_ps[a])
                for a in range(num_views) for b in range(num_views) if a != b]
    inv.append(np.mean(pair_kls) if pair_kls else 0.0)
  return ce, inv, top1


def np_semppl(online, target, semantic, valid, *, temperature, contrastive_weight,
              semantic_weight, invariance_weight):
  o, t, z = np_normalize(online), np_normalize(target), np_normalize(semantic)
  augm_ce, augm_inv, augm_top1 = [], [], []
  for l in range(t.shape[0]):
    ce, inv, top1 = np_candidate_set(o, t[l], np.ones(o.shape[1], bool), temperature)
    augm_ce += ce
    augm_inv += inv
    augm_top1 += top1
  sem_ce, sem_inv, sem_top1 = [], [], []
  for l in range(z.shape[0]):
    for s in range(z.shape[1]):
      ce, inv, top1 = np_candidate_set(o, z[l, s], valid[l, s], temperature)
      sem_ce += ce
      sem_inv += inv
      sem_top1 += top1
  mean = lambda xs: float(np.mean(xs)) if xs else 0.0
  out = dict(augm_contrastive=mean(augm_ce), semantic_contrastive=mean(sem_ce),
             augm_invariance=mean(augm_inv), semantic_invariance=mean(sem_inv),
             augm_top1=mean(augm_top1), semantic_top1=mean(sem_top1),
             semantic_valid_fraction=float(np.mean(valid)))
  out["loss"] = (contrastive_weight * (out["augm_contrastive"]
                                       + semantic_weight * out["semantic_contrastive"])
                 + invariance_weight * (out["augm_invariance"] + out["semantic_invariance"]))
  return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  # Unnormalised on purpose: semppl_loss normalises inside.
  online = rng.normal(size=(V, B, D)).astype(np.float32) * 2.0
  target = rng.normal(size=(L, B, D)).astype(np.float32)
  # Correlate the positives with the anchors so the losses are not all near log(B).
  target = target + 1.5 * online[:L]
  semantic = rng.normal(size=(L, N, B, D)).astype(np.float32) + online[:1, None]
  valid = rng.random(size=(L, N, B)) > 0.35
  valid[0, 0, :] = False  # one (l, s) with no valid row at all
  valid[1, 1, :] = True
  return online, target, semantic, valid


def _loss_fn(**kwargs):
  return jax.jit(functools.partial(losses.semppl_loss, **kwargs))


# ----------------------------------------------------------------------------- contrastive


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(1)
  a = np_normalize(rng.normal(size=(B, D))).astype(np.float32)
  p = np_normalize(rng.normal(size=(B, D))).astype(np.float32)
  loss, logits = losses.contrastive_loss(a, p, temperature=TAU)
  ref_logits = a.astype(np.float64) @ p.T.astype(np.float64) / TAU
  ref_loss = -np.diagonal(np_log_softmax(ref_logits))
  assert loss.shape == (B,) and loss.dtype == jnp.float32
  assert logits.shape == (B, B) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-5)

  mask = np.array([True, False, True, True, False, True])
  loss_m, logits_m = losses.contrastive_loss(a, p, temperature=TAU, column_mask=mask)
  cols = np.flatnonzero(mask)
  for i in range(B):
    if mask[i]:
      expected = -np_log_softmax(ref_logits[i, cols])[list(cols).index(i)]
      np.testing.assert_allclose(loss_m[i], expected, rtol=1e-5, atol=1e-5)
    else:
      assert loss_m[i] == 0.0
  assert np.all(np.asarray(logits_m)[:, ~mask] == losses.MASKED_LOGIT)
  assert np.all(np.isfinite(logits_m))


def test_contrastive_loss_one_hot_closed_form():
  num, tau = 4, 0.5
  eye = np.eye(num, dtype=np.float32)
  loss, _ = losses.contrastive_loss(eye, eye, temperature=tau)
  expected = -np.log(np.exp(1 / tau) / (np.exp(1 / tau) + (num - 1)))
  np.testing.assert_allclose(loss, np.full(num, expected), rtol=1e-6)
  # Masking one column leaves B - 2 negatives for the others and loss 0 for that row.
  mask = np.array([True, True, False, True])
  loss_m, _ = losses.contrastive_loss(eye, eye, temperature=tau, column_mask=mask)
  expected_m = -np.log(np.exp(1 / tau) / (np.exp(1 / tau) + (num - 2)))
  np.testing.assert_allclose(loss_m, np.where(mask, expected_m, 0.0), rtol=1e-6)
  # A fully masked batch is finite (and 0).
  loss_0, _ = losses.contrastive_loss(eye, eye, temperature=tau,
                                      column_mask=np.zeros(num, bool))
  np.testing.assert_array_equal(loss_0, np.zeros(num))


def test_sample_negative_indices():
  key = jax.random.PRNGKey(3)
  idx = np.asarray(losses.sample_negative_indices(key, 7, 4))
  assert idx.shape == (7, 4) and idx.dtype == np.int32
  for i, row in enumerate(idx):
    assert i not in row and len(set(row)) == 4 and row.min() >= 0 and row.max() < 7
  np.testing.assert_array_equal(idx, losses.sample_negative_indices(key, 7, 4))
  # Valid columns are taken before invalid ones.
  mask = np.array([True, True, False, True, False, True, True])
  idx_m = np.asarray(losses.sample_negative_indices(key, 7, 3, column_mask=mask))
  for i, row in enumerate(idx_m):
    assert i not in row and len(set(row)) == 3
    num_valid_others = int(mask.sum()) - int(mask[i])
    assert mask[row].sum() == min(3, num_valid_others)
  # All other rows when K = B - 1.
  full = np.asarray(losses.sample_negative_indices(key, 5, 4))
  for i, row in enumerate(full):
    assert sorted(row) == [j for j in range(5) if j != i]
  for bad in (0, 7, 9, 2.0, True):
    with pytest.raises(ValueError, match="num_negatives"):
      losses.sample_negative_indices(key, 7, bad)


def test_sampled_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(2)
  a = np_normalize(rng.normal(size=(B, D))).astype(np.float32)
  p = np_normalize(rng.normal(size=(B, D))).astype(np.float32)
  neg = np.asarray(losses.sample_negative_indices(jax.random.PRNGKey(0), B, 3))
  mask = np.array([True, True, False, True, True, True])
  loss, logits = losses.sampled_contrastive_loss(a, p, neg, temperature=TAU, column_mask=mask)
  assert loss.shape == (B,) and logits.shape == (B, 4)
  for i in range(B):
    cand = [i] + list(neg[i])
    ref = np.array([a[i].astype(np.float64) @ p[j] / TAU for j in cand])
    np.testing.assert_allclose(np.asarray(logits)[i][mask[cand]], ref[mask[cand]],
                               rtol=1e-5, atol=1e-5)
    if mask[i]:
      np.testing.assert_allclose(loss[i], -np_log_softmax(ref[mask[cand]])[0],
                                 rtol=1e-5, atol=1e-5)
    else:
      assert loss[i] == 0.0


# ----------------------------------------------------------------------------- invariance


def test_invariance_loss_matches_numpy_and_properties():
  rng = np.random.default_rng(4)
  la = rng.normal(size=(B, 7)).astype(np.float32) * 3
  lb = rng.normal(size=(B, 7)).astype(np.float32) * 3
  kl = losses.invariance_loss(la, lb)
  ref = [np_kl(np_log_softmax(lb[i]), np_log_softmax(la[i])) for i in range(B)]
  assert kl.shape == (B,) and kl.dtype == jnp.float32
  np.testing.assert_allclose(kl, ref, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(kl) > 0)
  np.testing.assert_array_equal(losses.invariance_loss(la, la), np.zeros(B))
  # Shift invariance of softmax: same distribution, zero KL (up to rounding).
  np.testing.assert_allclose(losses.invariance_loss(la + 5.0, la), np.zeros(B), atol=1e-5)
  # Stop-gradient on the b side; gradient reaches a.
  grad_a, grad_b = jax.grad(lambda x, y: jnp.sum(losses.invariance_loss(x, y)),
                            argnums=(0, 1))(la, lb)
  assert np.all(np.asarray(grad_b) == 0) and np.any(np.asarray(grad_a) != 0)
  # Masked candidates (MASKED_LOGIT on both sides) contribute nothing.
  la_m = np.concatenate([la, np.full((B, 2), losses.MASKED_LOGIT, np.float32)], axis=1)
  lb_m = np.concatenate([lb, np.full((B, 2), losses.MASKED_LOGIT, np.float32)], axis=1)
  np.testing.assert_allclose(losses.invariance_loss(la_m, lb_m), kl, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- semppl_loss


def test_semppl_loss_matches_numpy_reference(inputs):
  online, target, semantic, valid = inputs
  loss, aux = _loss_fn(temperature=TAU, **WEIGHTS)(online, target, semantic, valid)
  ref = np_semppl(online, target, semantic, valid, temperature=TAU, **WEIGHTS)
  assert loss.shape == () and loss.dtype == jnp.float32
  for name, value in ref.items():
    assert aux[name].shape == () and aux[name].dtype == jnp.float32, name
    np.testing.assert_allclose(aux[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
  np.testing.assert_allclose(loss, ref["loss"], rtol=2e-5)
  assert aux["loss"] == loss
  assert ref["semantic_invariance"] > 0 and ref["augm_invariance"] > 0
  np.testing.assert_allclose(
      aux["contrastive"], ref["augm_contrastive"] + 0.4 * ref["semantic_contrastive"],
      rtol=2e-5)
  # Defaults: c = 0.3, alpha = 0.2, lambda = 5, tau = 0.2.
  _, aux_default = losses.semppl_loss(online, target, semantic, valid)
  ref_default = np_semppl(online, target, semantic, valid, temperature=0.2,
                          contrastive_weight=0.3, semantic_weight=0.2, invariance_weight=5.0)
  np.testing.assert_allclose(aux_default["loss"], ref_default["loss"], rtol=2e-5)


def test_semppl_loss_normalises_inputs(inputs):
  online, target, semantic, valid = inputs
  fn = _loss_fn(temperature=TAU, **WEIGHTS)
  scale = lambda x, seed: x * np.random.default_rng(seed).uniform(
      0.5, 3.0, size=x.shape[:-1] + (1,)).astype(np.float32)
  loss, _ = fn(online, target, semantic, valid)
  loss_scaled, _ = fn(scale(online, 0), scale(target, 1), scale(semantic, 2), valid)
  np.testing.assert_allclose(loss_scaled, loss, rtol=1e-5)


def test_semppl_gradients_reach_only_online(inputs):
  online, target, semantic, valid = inputs
  grad_fn = jax.jit(jax.grad(
      lambda o, t, z: losses.semppl_loss(o, t, z, valid, temperature=TAU, **WEIGHTS)[0],
      argnums=(0, 1, 2)))
  g_online, g_target, g_semantic = grad_fn(online, target, semantic)
  assert np.all(np.asarray(g_target) == 0)
  assert np.all(np.asarray(g_semantic) == 0)
  assert np.all(np.isfinite(g_online)) and np.any(np.asarray(g_online) != 0)
  # Every online view (small views too) receives gradient.
  assert all(np.any(np.asarray(g_online[v]) != 0) for v in range(V))


def test_invalid_semantic_rows_are_ignored(inputs):
  online, target, semantic, valid = inputs
  fn = jax.jit(jax.value_and_grad(
      lambda o, z: losses.semppl_loss(o, target, z, valid, temperature=TAU, **WEIGHTS)[0],
      argnums=0))
  loss, grad = fn(online, semantic)
  changed = np.where(valid[..., None], semantic,
                     np.random.default_rng(9).normal(size=semantic.shape) * 10)
  changed = changed.astype(np.float32)
  changed[0, 0] = 0.0  # zero vectors (an empty draw) must stay finite too
  loss_c, grad_c = fn(online, changed)
  np.testing.assert_array_equal(loss_c, loss)
  np.testing.assert_array_equal(grad_c, grad)


def test_all_invalid_semantic_is_finite_and_zero(inputs):
  online, target, semantic, _ = inputs
  none_valid = np.zeros((L, N, B), bool)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda o: losses.semppl_loss(o, target, semantic * 0, none_valid, temperature=TAU,
                                   **WEIGHTS), has_aux=True))
  (loss, aux), grad = value_and_grad(online)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  for name in ("semantic_contrastive", "semantic_invariance", "semantic_top1",
               "semantic_valid_fraction"):
    assert aux[name] == 0.0, name
  np.testing.assert_allclose(
      loss, 0.7 * aux["augm_contrastive"] + 1.5 * aux["augm_invariance"], rtol=1e-6)
  # N = 0 draws behaves the same.
  loss_n0, aux_n0 = losses.semppl_loss(online, target, np.zeros((L, 0, B, D), np.float32),
                                       np.zeros((L, 0, B), bool), temperature=TAU, **WEIGHTS)
  np.testing.assert_allclose(loss_n0, loss, rtol=1e-6)
  assert aux_n0["semantic_contrastive"] == 0.0


def test_single_view_has_no_invariance(inputs):
  online, target, semantic, valid = inputs
  _, aux = losses.semppl_loss(online[:1], target[:1], semantic[:1], valid[:1],
                              temperature=TAU, **WEIGHTS)
  assert aux["augm_invariance"] == 0.0 and aux["semantic_invariance"] == 0.0
  ref = np_semppl(online[:1], target[:1], semantic[:1], valid[:1], temperature=TAU, **WEIGHTS)
  np.testing.assert_allclose(aux["loss"], ref["loss"], rtol=2e-5)


def test_identical_views_give_zero_invariance_and_known_loss():
  # One-hot embeddings, every view identical to the target: closed-form contrastive loss.
  eye = np.eye(4, dtype=np.float32)
  online = np.stack([eye] * 3)
  target = np.stack([eye] * 2)
  semantic = np.stack([np.stack([eye] * 2)] * 2)
  valid = np.ones((2, 2, 4), bool)
  _, aux = losses.semppl_loss(online, target, semantic, valid, temperature=0.5)
  expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 3))
  np.testing.assert_allclose(aux["augm_contrastive"], expected, rtol=1e-6)
  np.testing.assert_allclose(aux["semantic_contrastive"], expected, rtol=1e-6)
  assert aux["augm_invariance"] == 0.0 and aux["semantic_invariance"] == 0.0
  assert aux["augm_top1"] == 1.0 and aux["semantic_top1"] == 1.0


# ----------------------------------------------------------------------------- num_negatives


@pytest.mark.slow
def test_num_negatives_path(inputs):
  online, target, semantic, valid = inputs
  key = jax.random.PRNGKey(7)
  fn = _loss_fn(temperature=TAU, num_negatives=3, **WEIGHTS)
  loss, aux = fn(online, target, semantic, valid, key=key)
  assert loss.shape == () and np.isfinite(loss)
  assert all(np.isfinite(v) and v.shape == () for v in aux.values())
  loss_again, _ = fn(online, target, semantic, valid, key=key)
  np.testing.assert_array_equal(loss_again, loss)
  losses_other_keys = [fn(online, target, semantic, valid, key=jax.random.PRNGKey(k))[0]
                       for k in range(3)]
  assert len({float(x) for x in losses_other_keys + [loss]}) > 1
  # Fewer candidates can only lower each row's cross-entropy (logsumexp over a subset).
  _, aux_full = _loss_fn(temperature=TAU, **WEIGHTS)(online, target, semantic, valid)
  assert aux["augm_contrastive"] < aux_full["augm_contrastive"]
  assert aux["semantic_contrastive"] <= aux_full["semantic_contrastive"] + 1e-6
  # Gradients still reach only the online projections.
  grads = jax.grad(lambda o, t, z: fn(o, t, z, valid, key=key)[0], argnums=(0, 1, 2))(
      online, target, semantic)
  assert np.all(np.asarray(grads[1]) == 0) and np.all(np.asarray(grads[2]) == 0)
  assert np.all(np.isfinite(grads[0])) and np.any(np.asarray(grads[0]) != 0)


def test_num_negatives_all_others_equals_full_loss(inputs):
  online, target, semantic, valid = inputs
  _, aux_full = _loss_fn(temperature=TAU, **WEIGHTS)(online, target, semantic, valid)
  _, aux_sampled = _loss_fn(temperature=TAU, num_negatives=B - 1, **WEIGHTS)(
      online, target, semantic, valid, key=jax.random.PRNGKey(1))
  for name, value in aux_full.items():
    if name.endswith("top1"):
      continue  # argmax ties could resolve to a different column after reordering
    np.testing.assert_allclose(aux_sampled[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise(inputs):
  online, target, semantic, valid = inputs
  call = lambda **kw: losses.semppl_loss(
      kw.get("online", online), kw.get("target", target), kw.get("semantic", semantic),
      kw.get("semantic_valid", valid), temperature=kw.get("temperature", TAU),
      num_negatives=kw.get("num_negatives"), key=kw.get("key"))
  cases = [
      (dict(online=online[0]), "online"),
      (dict(target=np.concatenate([target, target])), "target"),  # L = 4 > V = 3
      (dict(target=target[:, :, :3]), "target"),                   # D differs
      (dict(target=target[:, :4]), "target"),                      # B differs
      (dict(semantic=semantic[:1]), "semantic"),
      (dict(semantic=semantic[:, :, :4]), "semantic"),
      (dict(semantic_valid=valid[:, :1]), "semantic_valid"),
      (dict(semantic_valid=valid.astype(np.float32)), "semantic_valid"),
      (dict(temperature=0.0), "temperature"),
      (dict(temperature=-0.1), "temperature"),
      (dict(num_negatives=B), "num_negatives"),
      (dict(num_negatives=0), "num_negatives"),
      (dict(num_negatives=2), "key"),
  ]
  for kwargs, name in cases:
    with pytest.raises(ValueError, match=name):
      call(**kwargs)
  a = np.eye(4, dtype=np.float32)
  with pytest.raises(ValueError, match="positives"):
    losses.contrastive_loss(a, a[:3], temperature=0.1)
  with pytest.raises(ValueError, match="temperature"):
    losses.contrastive_loss(a, a, temperature=0)
  with pytest.raises(ValueError, match="column_mask"):
    losses.contrastive_loss(a, a, temperature=0.1, column_mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="column_mask"):
    losses.contrastive_loss(a, a, temperature=0.1, column_mask=np.ones(4))
  with pytest.raises(ValueError, match="logits_b"):
    losses.invariance_loss(a, a[:, :3])
  with pytest.raises(ValueError, match="negative_indices"):
    losses.sampled_contrastive_loss(a, a, np.zeros((3, 2), np.int32), temperature=0.1)


# ----------------------------------------------------------------------------- ablation switches


def test_pair_mask_removes_candidates_per_row_and_keeps_the_positive():
  rng = np.random.default_rng(5)
  a = np_normalize(rng.normal(size=(B, D))).astype(np.float32)
  p = np_normalize(rng.normal(size=(B, D))).astype(np.float32)
  pair = rng.random(size=(B, B)) > 0.4
  pair[np.arange(B), np.arange(B)] = False  # Ignored: the own positive always stays.
  loss, logits = losses.contrastive_loss(a, p, temperature=TAU, pair_mask=pair)
  ref_logits = a.astype(np.float64) @ p.T.astype(np.float64) / TAU
  for i in range(B):
    cols = [i] + [j for j in range(B) if j != i and pair[i, j]]
    np.testing.assert_allclose(loss[i], -np_log_softmax(ref_logits[i, cols])[0],
                               rtol=1e-5, atol=1e-5)
    dropped = [j for j in range(B) if j != i and not pair[i, j]]
    assert np.all(np.asarray(logits)[i, dropped] == losses.MASKED_LOGIT)
  # Sampled negatives: the same rule on the sampled columns.
  neg = np.asarray(losses.sample_negative_indices(jax.random.PRNGKey(1), B, 4))
  loss_s, logits_s = losses.sampled_contrastive_loss(a, p, neg, temperature=TAU, pair_mask=pair)
  for i in range(B):
    cols = [i] + [j for j in neg[i] if pair[i, j]]
    np.testing.assert_allclose(loss_s[i], -np_log_softmax(ref_logits[i, cols])[0],
                               rtol=1e-5, atol=1e-5)
    assert np.asarray(logits_s)[i, 0] != losses.MASKED_LOGIT
  with pytest.raises(ValueError, match="pair_mask must have shape"):
    losses.contrastive_loss(a, p, temperature=TAU, pair_mask=pair[:, :3])
  with pytest.raises(ValueError, match="pair_mask must be bool"):
    losses.contrastive_loss(a, p, temperature=TAU, pair_mask=pair.astype(np.int32))


def test_mask_same_class_negatives_matches_numpy_reference(inputs):
  online, target, semantic, valid = inputs
  labels = np.array([0, 1, 0, 2, 1, 0], np.int32)
  loss, aux = _loss_fn(temperature=TAU, mask_same_class_negatives=True, **WEIGHTS)(
      online, target, semantic, valid, semantic_labels=labels)
  o, z = np_normalize(online), np_normalize(semantic)
  lists = [[i] + [m for m in range(B) if labels[m] != labels[i]] for i in range(B)]
  sem_ce, sem_inv = [], []
  for l in range(L):
    for s in range(N):
      ce, inv, _ = np_candidate_set(o, z[l, s], valid[l, s], TAU, candidate_lists=lists)
      sem_ce += ce
      sem_inv += inv
  default = np_semppl(online, target, semantic, valid, temperature=TAU, **WEIGHTS)
  np.testing.assert_allclose(aux["semantic_contrastive"], np.mean(sem_ce), rtol=1e-5)
  np.testing.assert_allclose(aux["semantic_invariance"], np.mean(sem_inv), rtol=1e-4,
                             atol=1e-6)
  # The augmentation term does not change.
  np.testing.assert_allclose(aux["augm_contrastive"], default["augm_contrastive"], rtol=1e-5)
  expected = (WEIGHTS["contrastive_weight"] * (default["augm_contrastive"]
                                               + WEIGHTS["semantic_weight"] * np.mean(sem_ce))
              + WEIGHTS["invariance_weight"] * (default["augm_invariance"] + np.mean(sem_inv)))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="semantic_labels must have shape"):
    losses.semppl_loss(online, target, semantic, valid, temperature=TAU,
                       mask_same_class_negatives=True)


def test_same_class_mask_removes_the_duplicate_positive():
  # Rows 0 and 1 share a class and drew the very same queue entry as semantic positive: by
  # default row 0's positive also appears as its negative (loss >= log 2); masked, it does not.
  e = np.eye(4, dtype=np.float32)
  drawn = np.stack([e[0], e[0], e[2], e[3]])
  online = np.stack([drawn, drawn])                           # [V=2, B=4, D=4]
  target = e[None]                                            # [L=1, B, D]
  semantic = drawn[None, None]                                # [1, 1, B, D]
  valid = np.ones((1, 1, 4), bool)
  labels = np.array([0, 0, 1, 2], np.int32)
  _, plain = losses.semppl_loss(online, target, semantic, valid, temperature=0.1)
  _, masked = losses.semppl_loss(online, target, semantic, valid, temperature=0.1,
                                 semantic_labels=labels, mask_same_class_negatives=True)
  # Rows 0 and 1 each see two equal top logits (log 2), rows 2 and 3 none: mean log(2) / 2.
  np.testing.assert_allclose(plain["semantic_contrastive"], np.log(2) / 2, rtol=1e-3)
  assert float(masked["semantic_contrastive"]) < 1e-3


def test_semantic_scale_scales_both_semantic_terms(inputs):
  online, target, semantic, valid = inputs
  fn = _loss_fn(temperature=TAU, **WEIGHTS)
  full_loss, full = fn(online, target, semantic, valid)
  half_loss, half = fn(online, target, semantic, valid, semantic_scale=0.5)
  zero_loss, zero = fn(online, target, semantic, valid, semantic_scale=jnp.float32(0.0))
  sem = (WEIGHTS["contrastive_weight"] * WEIGHTS["semantic_weight"]
         * float(full["semantic_contrastive"])
         + WEIGHTS["invariance_weight"] * float(full["semantic_invariance"]))
  np.testing.assert_allclose(full_loss - half_loss, 0.5 * sem, rtol=1e-4)
  np.testing.assert_allclose(full_loss - zero_loss, sem, rtol=1e-4)
  assert float(full["semantic_scale"]) == 1.0 and float(zero["semantic_scale"]) == 0.0
  # The terms themselves are reported unscaled.
  assert float(half["semantic_contrastive"]) == float(full["semantic_contrastive"])


# ----------------------------------------------------------------------------- semantic negatives


def np_semantic_against_augmentation(online, target, semantic, valid, tau):
  """Row i's candidates: its semantic positive z_i, then every other row's target t_m."""
  o, t, z = np_normalize(online), np_normalize(target), np_normalize(semantic)
  num_views, batch, _ = o.shape
  ce, inv = [], []
  for l in range(z.shape[0]):
    for s in range(z.shape[1]):
      for i in range(batch):
        if not valid[l, s, i]:
          continue
        cands = [z[l, s, i]] + [t[l, m] for m in range(batch) if m != i]
        log_ps = [np_log_softmax(np.array([o[a, i] @ c / tau for c in cands]))
                  for a in range(num_views)]
        ce += [-lp[0] for lp in log_ps]
        inv.append(np.mean([np_kl(log_ps[b], log_ps[a]) for a in range(num_views)
                            for b in range(num_views) if a != b]))
  return float(np.mean(ce)), float(np.mean(inv))


def test_semantic_negatives_augmentation_matches_numpy(inputs):
  online, target, semantic, valid = inputs
  _, aux = _loss_fn(temperature=TAU, semantic_negatives="augmentation", **WEIGHTS)(
      online, target, semantic, valid)
  ce, inv = np_semantic_against_augmentation(online, target, semantic, valid, TAU)
  np.testing.assert_allclose(aux["semantic_contrastive"], ce, rtol=2e-5)
  np.testing.assert_allclose(aux["semantic_invariance"], inv, rtol=2e-5, atol=1e-7)
  # The augmentation terms do not depend on how the semantic term is built.
  _, aux_a = _loss_fn(temperature=TAU, **WEIGHTS)(online, target, semantic, valid)
  for name in ("augm_contrastive", "augm_invariance", "augm_top1"):
    np.testing.assert_allclose(aux[name], aux_a[name], rtol=1e-6, err_msg=name)


def test_shared_logits_path_equals_the_general_path(inputs):
  """'augmentation' negatives with λ_sem a python 0: L_sem shares the augmentation logits
  (losses._semantic_terms_shared). Its value, top-1, loss and gradient equal the general
  path's (forced with a traced λ_sem = 0); I_sem is reported 0 there, and the numpy
  reference's cross-entropy holds for it too."""
  online, target, semantic, valid = inputs
  valid = np.asarray(valid).copy()
  valid[0, 1, :3] = False  # Some invalid draws.
  kw = dict(temperature=TAU, contrastive_weight=0.3, semantic_weight=5.0,
            invariance_weight=5.0, semantic_negatives="augmentation")

  def run(lam_sem):
    fn = lambda o: losses.semppl_loss(o, target, semantic, valid,
                                      semantic_invariance_weight=lam_sem, **kw)
    (loss, aux), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(online)
    return loss, aux, grad

  loss_fast, aux_fast, grad_fast = run(0.0)
  loss_gen, aux_gen, grad_gen = run(jnp.float32(0.0))
  for name in ("semantic_contrastive", "semantic_top1", "augm_contrastive", "augm_top1",
               "contrastive", "augm_invariance"):
    np.testing.assert_allclose(aux_fast[name], aux_gen[name], rtol=1e-6, err_msg=name)
  np.testing.assert_allclose(loss_fast, loss_gen, rtol=1e-6)
  np.testing.assert_allclose(grad_fast, grad_gen, rtol=1e-5, atol=1e-7)
  assert float(aux_gen["semantic_invariance"]) > 0 and float(aux_fast["semantic_invariance"]) == 0
  ce, _ = np_semantic_against_augmentation(online, target, semantic, valid, TAU)
  np.testing.assert_allclose(aux_fast["semantic_contrastive"], ce, rtol=2e-5)
  # The top-1 is not trivially 0 or 1 here, so the tie rule above is exercised.
  assert 0.0 < float(aux_fast["semantic_top1"]) < 1.0


def _semantic_terms_and_grads(negatives, online, target, semantic, valid):
  def term(name):
    fn = lambda o: losses.semppl_loss(o, target, semantic, valid, temperature=TAU,
                                      semantic_negatives=negatives)[1][name]
    return jax.jit(jax.value_and_grad(fn))(online)
  return {name: term(name) for name in ("semantic_contrastive", "semantic_invariance")}


def test_only_augmentation_negatives_make_the_semantic_kl_depend_on_the_row(inputs):
  """Shuffling the semantic positives across rows (each keeps its validity) must change what
  the semantic terms say about each row. With the other rows' positives as negatives
  ('semantic') the KL only sees the set of candidates, which a shuffle does not change; with the
  augmentation negatives both terms move, in value and in gradient."""
  online, target, semantic, _ = inputs
  valid = np.ones(semantic.shape[:3], bool)
  perm = np.roll(np.arange(semantic.shape[2]), 1)
  shuffled = semantic[:, :, perm]
  for negatives in ("semantic", "augmentation"):
    before = _semantic_terms_and_grads(negatives, online, target, semantic, valid)
    after = _semantic_terms_and_grads(negatives, online, target, shuffled, valid)
    (ce0, g_ce0), (ce1, g_ce1) = before["semantic_contrastive"], after["semantic_contrastive"]
    (kl0, g_kl0), (kl1, g_kl1) = before["semantic_invariance"], after["semantic_invariance"]
    assert abs(float(ce1) - float(ce0)) > 1e-3, negatives
    assert np.abs(np.asarray(g_ce1) - np.asarray(g_ce0)).max() > 1e-4, negatives
    kl_moves = abs(float(kl1) - float(kl0)) > 1e-4 * abs(float(kl0))
    grad_moves = np.abs(np.asarray(g_kl1) - np.asarray(g_kl0)).max() > 1e-5
    if negatives == "semantic":  # The first-built form: the label-blind KL.
      assert not kl_moves and not grad_moves
    else:
      assert kl_moves and grad_moves


def test_semantic_invariance_weight_is_lambda_sem(inputs):
  online, target, semantic, valid = inputs
  _, base = _loss_fn(temperature=TAU, **WEIGHTS)(online, target, semantic, valid)
  loss0, aux0 = _loss_fn(temperature=TAU, semantic_invariance_weight=0.0, **WEIGHTS)(
      online, target, semantic, valid)
  loss2, _ = _loss_fn(temperature=TAU, semantic_invariance_weight=2.0, **WEIGHTS)(
      online, target, semantic, valid)
  lam = WEIGHTS["invariance_weight"]
  np.testing.assert_allclose(loss0, base["loss"] - lam * base["semantic_invariance"], rtol=1e-5)
  np.testing.assert_allclose(loss2, loss0 + 2.0 * base["semantic_invariance"], rtol=1e-5)
  assert aux0["semantic_invariance"] == base["semantic_invariance"]  # Reported unweighted.


def test_semantic_negatives_must_be_known(inputs):
  online, target, semantic, valid = inputs
  with pytest.raises(ValueError, match="semantic_negatives must be one of"):
    losses.semppl_loss(online, target, semantic, valid, semantic_negatives="others")


def test_augmentation_negatives_with_sampled_negatives_and_masks(inputs):
  """num_negatives = B - 1 keeps every other row: the sampled path equals the full one."""
  online, target, semantic, valid = inputs
  kwargs = dict(temperature=TAU, semantic_negatives="augmentation", **WEIGHTS)
  _, full = _loss_fn(**kwargs)(online, target, semantic, valid)
  _, sampled = _loss_fn(num_negatives=B - 1, **kwargs)(online, target, semantic, valid,
                                                      key=jax.random.PRNGKey(3))
  for name in ("semantic_contrastive", "semantic_invariance", "loss"):
    np.testing.assert_allclose(sampled[name], full[name], rtol=1e-5, err_msg=name)


def test_reduced_precision_matmuls_match_the_reference_on_rounded_operands(inputs):
  """precision='default' is the reference on CPU (float32 dots there); matmul_dtype=bfloat16
  (bf16 operands, float32 accumulation) stays within bf16 rounding (2^-8 relative on each
  operand) of the float32 reference, term by term, and really rounds. Gradients reach the
  online projections only."""
  online, target, semantic, valid = inputs
  ref = np_semppl(online, target, semantic, valid, temperature=TAU, **WEIGHTS)
  _, aux = _loss_fn(temperature=TAU, precision="default", **WEIGHTS)(online, target, semantic,
                                                                     valid)
  for name, value in ref.items():
    np.testing.assert_allclose(aux[name], value, rtol=2e-5, atol=2e-6, err_msg=name)

  _, aux16 = _loss_fn(temperature=TAU, matmul_dtype=jnp.bfloat16, **WEIGHTS)(
      online, target, semantic, valid)
  for name, value in ref.items():
    np.testing.assert_allclose(aux16[name], value, rtol=5e-3, atol=1e-3, err_msg=name)
  assert abs(float(aux16["loss"]) - ref["loss"]) > 1e-6  # The rounding is real.

  grads = jax.grad(lambda o, t: losses.semppl_loss(o, t, semantic, valid,
                                                   matmul_dtype=jnp.bfloat16)[0],
                   argnums=(0, 1))(jnp.asarray(online), jnp.asarray(target))
  assert float(jnp.sum(jnp.abs(grads[0]))) > 0 and float(jnp.sum(jnp.abs(grads[1]))) == 0.0

  with pytest.raises(ValueError, match="precision must be one of"):
    losses.semppl_loss(online, target, semantic, valid, precision="high")
  with pytest.raises(ValueError, match="matmul_dtype must be float32 or bfloat16"):
    losses.contrastive_loss(online[0], target[0], temperature=TAU, matmul_dtype=jnp.float16)
