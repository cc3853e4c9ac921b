"""SemPPL losses: contrastive cross-entropy, invariance (KL) penalty and their composition.

All similarities are dot products of l2-normalised vectors divided by a temperature. Invalid
candidates are excluded from a softmax by replacing their logit with the finite constant
``MASKED_LOGIT`` rather than ``-inf``: ``exp`` of it underflows to exactly 0, but no
``inf - inf`` or ``0 * inf`` can turn into NaN, even when every candidate of a row is masked.

Averaging conventions of :func:`semppl_loss` (V anchor views, L target views, N semantic draws,
B images; ``valid[l, s, i]`` = ``semantic_valid``):

* ``L_augm = 1/(V·L·B) · Σ_{a,l,i} CE(a, l, i)``.
* ``L_sem  = Σ_{a,l,s,i : valid[l,s,i]} CE(a, l, s, i) / (V · Σ_{l,s,i} valid[l,s,i])`` — a
  mean over the valid (anchor view, target view, draw, row) entries, so a (l, s) pair
  contributes in proportion to its number of valid rows; 0 when nothing is valid.
* ``I_augm = 1/(L·B) · Σ_{l,i} 1/(V(V-1)) · Σ_{a≠b} KL(p_b ‖ p_a)(l, i)``.
* ``I_sem  = Σ_{l,s,i : valid[l,s,i]} 1/(V(V-1)) · Σ_{a≠b} KL(p_b ‖ p_a)(l, s, i) /
  Σ_{l,s,i} valid[l,s,i]``; 0 when nothing is valid.
* Both invariance terms are 0 when V == 1 (no pair of distinct anchor views).
"""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf (see the module docstring). Real logits are bounded by 1/temperature.
MASKED_LOGIT = -1e9

# Full float32 matmuls: TPUs default to bf16 passes and GPUs to TF32, which would perturb
# the logits (and hence every loss value) by ~1e-3 relative.
_PRECISION = jax.lax.Precision.HIGHEST


def _check_temperature(temperature) -> None:
  if isinstance(temperature, jax.core.Tracer):
    return  # A traced temperature cannot be checked; the caller owns it.
  value = np.asarray(temperature)
  if value.shape != () or not np.isfinite(value) or float(value) <= 0:
    raise ValueError(
        f"temperature must be a finite scalar > 0, got {temperature!r}.")


def _check_array(name: str, x, ndim: int, expected: str) -> None:
  if np.ndim(x) != ndim:
    raise ValueError(f"{name} must have shape {expected}, got shape {np.shape(x)}.")


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_column_mask(column_mask, batch: int) -> None:
  if column_mask is None:
    return
  if np.shape(column_mask) != (batch,):
    raise ValueError(
        f"column_mask must have shape [B] = ({batch},), got shape {np.shape(column_mask)}.")
  if _dtype(column_mask) != np.bool_:
    raise ValueError(f"column_mask must be bool, got dtype {_dtype(column_mask)}.")


def _check_pair_mask(pair_mask, batch: int, columns: int) -> None:
  if pair_mask is None:
    return
  if np.shape(pair_mask) != (batch, columns):
    raise ValueError(f"pair_mask must have shape ({batch}, {columns}), "
                     f"got shape {np.shape(pair_mask)}.")
  if _dtype(pair_mask) != np.bool_:
    raise ValueError(f"pair_mask must be bool, got dtype {_dtype(pair_mask)}.")


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis``; float32 in, float32 out, same shape.

  Idempotent on unit vectors (up to float rounding); an all-zero vector stays zero instead of
  becoming NaN, so zero-padded rows (e.g. invalid semantic positives) are harmless.
  """
  x = jnp.asarray(x, jnp.float32)
  sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def contrastive_loss(
    anchors: jax.Array,
    positives: jax.Array,
    *,
    temperature,
    column_mask: Optional[jax.Array] = None,
    pair_mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-row cross-entropy of picking the own positive among all rows of ``positives``.

  Args:
    anchors: float [B, D], l2-normalised by the caller.
    positives: float [B, D], l2-normalised by the caller; row i is anchor i's positive and
      every other row is one of its negatives.
    temperature: python/numpy scalar > 0 (a traced scalar is accepted unchecked).
    column_mask: optional bool [B]; False marks row j of ``positives`` as an invalid candidate,
      excluded from every row's softmax. A row whose own positive is invalid gets loss 0.
    pair_mask: optional bool [B, B]; False at (i, j) removes candidate j from row i's softmax
      only (e.g. negatives of the anchor's own class). The diagonal is ignored: a row's own
      positive always stays a candidate.

  Returns:
    loss: float32 [B], ``-log softmax(logits)[i, i]`` (0 for rows with ``column_mask`` False).
    logits: float32 [B, B], ``anchors @ positives.T / temperature``; masked entries hold
      ``MASKED_LOGIT``.
  """
  _check_array("anchors", anchors, 2, "[B, D]")
  _check_array("positives", positives, 2, "[B, D]")
  if np.shape(anchors) != np.shape(positives):
    raise ValueError(
        f"positives must have the shape of anchors {np.shape(anchors)} ([B, D]), "
        f"got shape {np.shape(positives)}.")
  _check_temperature(temperature)
  _check_column_mask(column_mask, np.shape(anchors)[0])
  _check_pair_mask(pair_mask, np.shape(anchors)[0], np.shape(anchors)[0])

  anchors = jnp.asarray(anchors, jnp.float32)
  positives = jnp.asarray(positives, jnp.float32)
  logits = jnp.einsum("id,jd->ij", anchors, positives, precision=_PRECISION) / temperature
  if column_mask is not None:
    logits = jnp.where(column_mask[None, :], logits, MASKED_LOGIT)
  if pair_mask is not None:
    keep = pair_mask | jnp.eye(logits.shape[0], dtype=bool)
    logits = jnp.where(keep, logits, MASKED_LOGIT)
  # The positive's logit is read from the same matrix that enters the softmax, so the loss
  # is a proper -log probability (>= 0 up to rounding).
  loss = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))
  if column_mask is not None:
    loss = jnp.where(column_mask, loss, 0.0)
  return loss, logits


def sample_negative_indices(
    key: jax.Array,
    batch_size: int,
    num_negatives: int,
    column_mask: Optional[jax.Array] = None,
) -> jax.Array:
  """For each row i, ``num_negatives`` distinct other rows drawn uniformly without replacement.

  Args:
    key: a PRNG key.
    batch_size: B, a python int.
    num_negatives: K, a python int with 1 <= K <= B - 1.
    column_mask: optional bool [B]; invalid rows are drawn only once every valid other row of
      that row's sample has been taken (they are then masked out by the loss anyway).

  Returns:
    int32 [B, K]; row i never contains i and never repeats an index.
  """
  if not isinstance(num_negatives, (int, np.integer)) or isinstance(num_negatives, bool):
    raise ValueError(f"num_negatives must be an int, got {num_negatives!r}.")
  if not 1 <= num_negatives < batch_size:
    raise ValueError(
        f"num_negatives must satisfy 1 <= num_negatives < B = {batch_size}, "
        f"got {num_negatives}.")
  _check_column_mask(column_mask, batch_size)
  # Top-k of i.i.d. uniform priorities is a uniform sample without replacement. Valid columns
  # are lifted by 2 above invalid ones (priorities in [0, 1)); the own column is never taken.
  priority = jax.random.uniform(key, (batch_size, batch_size))
  if column_mask is not None:
    priority = priority + 2.0 * column_mask[None, :].astype(jnp.float32)
  priority = jnp.where(jnp.eye(batch_size, dtype=bool), -jnp.inf, priority)
  _, indices = jax.lax.top_k(priority, num_negatives)
  return indices.astype(jnp.int32)


def sampled_contrastive_loss(
    anchors: jax.Array,
    positives: jax.Array,
    negative_indices: jax.Array,
    *,
    temperature,
    column_mask: Optional[jax.Array] = None,
    pair_mask: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """:func:`contrastive_loss` with a sampled set of negatives per row.

  Args:
    anchors: float [B, D], l2-normalised by the caller.
    positives: float [B, D], l2-normalised by the caller; row i is anchor i's positive.
    negative_indices: int [B, K]; row i lists the rows of ``positives`` used as anchor i's
      negatives (must not contain i, e.g. from :func:`sample_negative_indices`).
    temperature: scalar > 0.
    column_mask: optional bool [B]; as in :func:`contrastive_loss` (a sampled negative that is
      invalid is masked out; a row whose own positive is invalid gets loss 0).
    pair_mask: optional bool [B, B]; as in :func:`contrastive_loss`: a sampled negative j of
      row i with ``pair_mask[i, j]`` False is masked out of row i's softmax.

  Returns:
    loss: float32 [B], cross-entropy of picking candidate 0.
    logits: float32 [B, 1 + K]; column 0 is the positive, column 1 + k the negative
      ``negative_indices[:, k]``; masked candidates hold ``MASKED_LOGIT``.
  """
  _check_array("anchors", anchors, 2, "[B, D]")
  _check_array("positives", positives, 2, "[B, D]")
  if np.shape(anchors) != np.shape(positives):
    raise ValueError(
        f"positives must have the shape of anchors {np.shape(anchors)} ([B, D]), "
        f"got shape {np.shape(positives)}.")
  batch = np.shape(anchors)[0]
  if np.ndim(negative_indices) != 2 or np.shape(negative_indices)[0] != batch:
    raise ValueError(
        f"negative_indices must have shape [B, K] with B = {batch}, "
        f"got shape {np.shape(negative_indices)}.")
  _check_temperature(temperature)
  _check_column_mask(column_mask, batch)
  _check_pair_mask(pair_mask, batch, batch)

  anchors = jnp.asarray(anchors, jnp.float32)
  positives = jnp.asarray(positives, jnp.float32)
  candidate_ids = jnp.concatenate(
      [jnp.arange(batch, dtype=jnp.int32)[:, None],
       jnp.asarray(negative_indices, jnp.int32)], axis=1)             # [B, 1 + K]
  candidates = positives[candidate_ids]                                # [B, 1 + K, D]
  logits = jnp.einsum("id,ikd->ik", anchors, candidates, precision=_PRECISION) / temperature
  if column_mask is not None:
    logits = jnp.where(column_mask[candidate_ids], logits, MASKED_LOGIT)
  if pair_mask is not None:
    keep = jnp.take_along_axis(pair_mask, candidate_ids, axis=1).at[:, 0].set(True)
    logits = jnp.where(keep, logits, MASKED_LOGIT)
  loss = -jax.nn.log_softmax(logits, axis=-1)[:, 0]
  if column_mask is not None:
    loss = jnp.where(column_mask, loss, 0.0)
  return loss, logits


def invariance_loss(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """Per-row ``KL(softmax(sg(logits_b)) ‖ softmax(logits_a))``.

  Args:
    logits_a: float [B, M], the distribution that receives gradients.
    logits_b: float [B, M], the stop-gradient reference distribution.

  Returns:
    float32 [B], >= 0 up to rounding; exactly 0 for identical rows. Masked candidates
    (``MASKED_LOGIT`` in both inputs) contribute exactly 0.
  """
  _check_array("logits_a", logits_a, 2, "[B, M]")
  if np.shape(logits_b) != np.shape(logits_a):
    raise ValueError(
        f"logits_b must have the shape of logits_a {np.shape(logits_a)} ([B, M]), "
        f"got shape {np.shape(logits_b)}.")
  log_p_a = jax.nn.log_softmax(jnp.asarray(logits_a, jnp.float32), axis=-1)
  log_p_b = jax.nn.log_softmax(
      jax.lax.stop_gradient(jnp.asarray(logits_b, jnp.float32)), axis=-1)
  return jnp.sum(jnp.exp(log_p_b) * (log_p_b - log_p_a), axis=-1)


def _pairwise_invariance(logits: jax.Array) -> jax.Array:
  """Mean over ordered pairs a != b of ``invariance_loss(logits[a], logits[b])``.

  Args:
    logits: float32 [V, B, M], the V anchor views' logits over the same candidates per row.

  Returns:
    float32 [B]; zeros when V == 1.
  """
  num_views = logits.shape[0]
  if num_views < 2:
    return jnp.zeros(logits.shape[1], jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)                          # [V, B, M]
  log_p_ref = jax.lax.stop_gradient(log_p)
  p_ref = jnp.exp(log_p_ref)
  # KL(p_b ‖ p_a) = Σ_m p_b log p_b − Σ_m p_b log p_a, both sums batched over all (a, b) at
  # O(V·B·M) memory; full precision because the difference cancels.
  neg_entropy = jnp.sum(p_ref * log_p_ref, axis=-1)                    # [V(b), B]
  cross = jnp.einsum("bim,aim->bai", p_ref, log_p, precision=_PRECISION)  # [V(b), V(a), B]
  kl = neg_entropy[:, None, :] - cross
  off_diagonal = ~jnp.eye(num_views, dtype=bool)[:, :, None]
  return jnp.sum(jnp.where(off_diagonal, kl, 0.0), axis=(0, 1)) / (num_views * (num_views - 1))


def _candidate_set_terms(online, candidates, column_mask, negative_indices, temperature,
                         pair_mask=None):
  """Contrastive, invariance and top-1 terms of all anchor views against one candidate set.

  Args:
    online: float32 [V, B, D] normalised anchors.
    candidates: float32 [B, D] normalised candidates (row i = row i's positive).
    column_mask: bool [B] or None.
    negative_indices: int32 [B, K] or None (None: all other rows are negatives).
    temperature: scalar > 0.
    pair_mask: bool [B, B] or None (see :func:`contrastive_loss`).

  Returns:
    (contrastive [V, B], invariance [B], top1 [V, B] float32); rows with column_mask False
    hold zeros in all three.
  """
  if negative_indices is None:
    per_view = lambda anchors: contrastive_loss(
        anchors, candidates, temperature=temperature, column_mask=column_mask,
        pair_mask=pair_mask)
    positive_column = jnp.arange(candidates.shape[0])
  else:
    per_view = lambda anchors: sampled_contrastive_loss(
        anchors, candidates, negative_indices, temperature=temperature,
        column_mask=column_mask, pair_mask=pair_mask)
    positive_column = jnp.zeros(candidates.shape[0], jnp.int32)
  contrastive, logits = jax.vmap(per_view)(online)                     # [V, B], [V, B, M]
  invariance = _pairwise_invariance(logits)
  top1 = (jnp.argmax(logits, axis=-1) == positive_column[None, :]).astype(jnp.float32)
  if column_mask is not None:
    invariance = jnp.where(column_mask, invariance, 0.0)
    top1 = jnp.where(column_mask[None, :], top1, 0.0)
  return contrastive, invariance, top1


def semppl_loss(
    online: jax.Array,
    target: jax.Array,
    semantic: jax.Array,
    semantic_valid: jax.Array,
    *,
    temperature=0.2,
    contrastive_weight: float = 0.3,
    semantic_weight: float = 0.2,
    invariance_weight: float = 5.0,
    num_negatives: Optional[int] = None,
    key: Optional[jax.Array] = None,
    semantic_labels: Optional[jax.Array] = None,
    mask_same_class_negatives: bool = False,
    semantic_scale=1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The SemPPL objective (docs/design.md §2): ``c·(L_augm + s·α·L_sem) + λ·(I_augm + s·I_sem)``.

  ``s`` is ``semantic_scale`` (1 by default: docs/design.md §2's objective exactly).

  Every input is l2-normalised here (idempotent); ``target`` and ``semantic`` are
  stop-gradient, so gradients reach only ``online``. The averaging conventions are in the
  module docstring.

  Args:
    online: float [V, B, D] online projections of all views; entries [0, L) are the large views
      in the target's order (V >= L).
    target: float [L, B, D] target projections of the large views (the augmentation
      candidates: row i of ``target[l]`` is the positive of row i of every anchor view).
    semantic: float [L, N, B, D] semantic positives: ``semantic[l, s, i]`` is draw s for image
      i from queue l (the semantic candidates of target view l, draw s).
    semantic_valid: bool [L, N, B]; False rows are excluded as anchors of that (l, s) and as
      candidates of every row of that (l, s).
    temperature: scalar > 0 (τ).
    contrastive_weight: c.
    semantic_weight: α.
    invariance_weight: λ.
    num_negatives: optional python int K, 1 <= K < B. When set, each row's candidates are its
      positive plus K negatives sampled without replacement from the other rows, one sample
      per candidate set (per l for the augmentation term, per (l, s) for the semantic term)
      shared by all V anchor views; semantic samples prefer valid rows.
    key: PRNG key, required when ``num_negatives`` is set (unused otherwise).
    semantic_labels: int [B], the (pseudo-)label y*_i of each row; required by
      ``mask_same_class_negatives``.
    mask_same_class_negatives: if True, the semantic term's negatives of row i exclude every
      other row m with ``semantic_labels[m] == semantic_labels[i]``: their semantic positives
      carry the anchor's own (pseudo-)class (and may be the very queue entry drawn as row i's
      positive), so contrasting against them pushes the class apart. Off by default
      (docs/design.md §2 as written: all other rows are negatives). The augmentation term is
      unchanged.
    semantic_scale: scalar >= 0 (python or traced) multiplying both semantic terms, e.g. a
      ramp of the semantic weight over training; 1 = off.

  Returns:
    loss: float32 [] total.
    aux: dict of float32 [] scalars: 'loss', 'augm_contrastive' (L_augm),
      'semantic_contrastive' (L_sem), 'augm_invariance' (I_augm), 'semantic_invariance'
      (I_sem), 'contrastive' (L_augm + s·α·L_sem), 'invariance' (I_augm + s·I_sem),
      'semantic_valid_fraction' (mean of ``semantic_valid``), 'augm_top1' / 'semantic_top1'
      (fraction of (anchor view, candidate set, valid row) entries whose positive has the
      largest logit; ties go to the lowest candidate column), 'semantic_scale' (s).
  """
  _check_array("online", online, 3, "[V, B, D]")
  num_views, batch, dim = np.shape(online)
  _check_array("target", target, 3, f"[L, B, D] with L <= V = {num_views}, B = {batch}, "
               f"D = {dim}")
  num_large = np.shape(target)[0]
  if np.shape(target)[1:] != (batch, dim) or not 1 <= num_large <= num_views:
    raise ValueError(
        f"target must have shape [L, B, D] with 1 <= L <= V = {num_views}, B = {batch}, "
        f"D = {dim}, got shape {np.shape(target)}.")
  _check_array("semantic", semantic, 4, f"[L, N, B, D] = [{num_large}, N, {batch}, {dim}]")
  num_draws = np.shape(semantic)[1]
  if np.shape(semantic) != (num_large, num_draws, batch, dim):
    raise ValueError(
        f"semantic must have shape [L, N, B, D] = [{num_large}, N, {batch}, {dim}], "
        f"got shape {np.shape(semantic)}.")
  if np.shape(semantic_valid) != (num_large, num_draws, batch):
    raise ValueError(
        f"semantic_valid must have shape [L, N, B] = ({num_large}, {num_draws}, {batch}), "
        f"got shape {np.shape(semantic_valid)}.")
  if _dtype(semantic_valid) != np.bool_:
    raise ValueError(f"semantic_valid must be bool, got dtype {_dtype(semantic_valid)}.")
  _check_temperature(temperature)
  if num_negatives is not None:
    if (not isinstance(num_negatives, (int, np.integer)) or isinstance(num_negatives, bool)
        or not 1 <= num_negatives < batch):
      raise ValueError(
          f"num_negatives must be None or an int with 1 <= num_negatives < B = {batch}, "
          f"got {num_negatives!r}.")
    if key is None:
      raise ValueError("key must be a PRNG key when num_negatives is set, got None.")
  pair_mask = None
  if mask_same_class_negatives:
    if semantic_labels is None or np.shape(semantic_labels) != (batch,):
      raise ValueError(
          f"semantic_labels must have shape [B] = ({batch},) when mask_same_class_negatives "
          f"is set, got {None if semantic_labels is None else np.shape(semantic_labels)}.")
    labels = jnp.asarray(semantic_labels)
    pair_mask = labels[:, None] != labels[None, :]

  online = l2_normalize(online)
  target = jax.lax.stop_gradient(l2_normalize(target))
  semantic = jax.lax.stop_gradient(l2_normalize(semantic))
  semantic_valid = jnp.asarray(semantic_valid)

  if num_negatives is not None:
    augm_key, sem_key = jax.random.split(key)
    augm_keys = jax.random.split(augm_key, num_large)
    sem_keys = jax.random.split(sem_key, num_large * max(num_draws, 1))

  # Loops over the (few) candidate sets keep one [V, B, M] logits block live at a time.
  augm_ce, augm_inv, augm_top1 = [], [], []
  for l in range(num_large):
    negatives = None
    if num_negatives is not None:
      negatives = sample_negative_indices(augm_keys[l], batch, num_negatives)
    ce, inv, top1 = _candidate_set_terms(online, target[l], None, negatives, temperature)
    augm_ce.append(jnp.mean(ce))
    augm_inv.append(jnp.mean(inv))
    augm_top1.append(jnp.mean(top1))
  l_augm = jnp.mean(jnp.stack(augm_ce))
  i_augm = jnp.mean(jnp.stack(augm_inv))

  sem_ce_sum = sem_inv_sum = sem_top1_sum = jnp.zeros((), jnp.float32)
  for l in range(num_large):
    for s in range(num_draws):
      valid = semantic_valid[l, s]
      negatives = None
      if num_negatives is not None:
        negatives = sample_negative_indices(
            sem_keys[l * num_draws + s], batch, num_negatives, column_mask=valid)
      ce, inv, top1 = _candidate_set_terms(online, semantic[l, s], valid, negatives,
                                           temperature, pair_mask)
      # Invalid rows are already zero in ce / inv / top1.
      sem_ce_sum += jnp.sum(ce)
      sem_inv_sum += jnp.sum(inv)
      sem_top1_sum += jnp.sum(top1)
  num_valid = jnp.sum(semantic_valid.astype(jnp.float32))
  # max(., 1): with no valid row every sum is 0, so each semantic term is 0, not NaN.
  denominator = jnp.maximum(num_valid, 1.0)
  l_sem = sem_ce_sum / (num_views * denominator)
  i_sem = sem_inv_sum / denominator

  scale = jnp.asarray(semantic_scale, jnp.float32)
  contrastive = l_augm + scale * semantic_weight * l_sem
  invariance = i_augm + scale * i_sem
  loss = contrastive_weight * contrastive + invariance_weight * invariance
  aux = {
      "loss": loss,
      "augm_contrastive": l_augm,
      "semantic_contrastive": l_sem,
      "augm_invariance": i_augm,
      "semantic_invariance": i_sem,
      "contrastive": contrastive,
      "invariance": invariance,
      "semantic_valid_fraction": num_valid / max(semantic_valid.size, 1),
      "augm_top1": jnp.mean(jnp.stack(augm_top1)),
      "semantic_top1": sem_top1_sum / (num_views * denominator),
      "semantic_scale": scale,
  }
  aux = {name: jnp.asarray(value, jnp.float32) for name, value in aux.items()}
  return aux["loss"], aux
