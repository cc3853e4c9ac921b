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

# Matmul precision of the loss (``precision=`` of the public functions). 'highest': full float32
# matmuls (TPUs default to bf16 passes and GPUs to TF32, which would perturb the logits, and
# hence every loss value, by ~1e-3 relative); on TPU each costs ~6 bf16 passes. 'default': the
# backend's default (one bf16 pass on TPU, TF32 on GPU; exact float32 on CPU).
PRECISIONS = ("highest", "default")
_PRECISION = jax.lax.Precision.HIGHEST
# Operand dtypes of the loss matmuls (``matmul_dtype=``): float32, or bfloat16 operands with
# float32 accumulation (the compute dtype of a bfloat16 network).
MATMUL_DTYPES = (jnp.float32, jnp.bfloat16)


def _check_matmul(precision, matmul_dtype) -> None:
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
  if jnp.dtype(matmul_dtype) not in [jnp.dtype(d) for d in MATMUL_DTYPES]:
    raise ValueError(f"matmul_dtype must be float32 or bfloat16, got {matmul_dtype!r}.")


def _exact(precision, matmul_dtype) -> bool:
  """Whether the loss matmuls run as full float32 (HIGHEST) dots: the original form."""
  return precision == "highest" and jnp.dtype(matmul_dtype) == jnp.float32


def _einsum(subscripts: str, a, b, precision: str, matmul_dtype) -> jax.Array:
  """``einsum`` of float32 ``a`` and ``b`` as the loss runs it; float32 result.

  'highest' with float32 operands is the original full-precision dot (bit for bit). Otherwise
  the operands are cast to ``matmul_dtype`` and the dot runs at the backend's default precision
  with float32 accumulation: bfloat16 operands are exact in one bf16 pass, so HIGHEST would
  only add passes.
  """
  if _exact(precision, matmul_dtype):
    return jnp.einsum(subscripts, a, b, precision=_PRECISION)
  return jnp.einsum(subscripts, a.astype(matmul_dtype), b.astype(matmul_dtype),
                    precision=jax.lax.Precision.DEFAULT, preferred_element_type=jnp.float32)


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
    precision: str = "highest",
    matmul_dtype=jnp.float32,
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
    precision: 'highest' (full float32 matmul) or 'default' (the backend's default).
    matmul_dtype: float32, or bfloat16 (operands cast to bf16, float32 accumulation).

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
  _check_matmul(precision, matmul_dtype)

  anchors = jnp.asarray(anchors, jnp.float32)
  positives = jnp.asarray(positives, jnp.float32)
  logits = _einsum("id,jd->ij", anchors, positives, precision, matmul_dtype) / temperature
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
    precision: str = "highest",
    matmul_dtype=jnp.float32,
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
    precision, matmul_dtype: as in :func:`contrastive_loss`.

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
  _check_matmul(precision, matmul_dtype)

  anchors = jnp.asarray(anchors, jnp.float32)
  positives = jnp.asarray(positives, jnp.float32)
  candidate_ids = jnp.concatenate(
      [jnp.arange(batch, dtype=jnp.int32)[:, None],
       jnp.asarray(negative_indices, jnp.int32)], axis=1)             # [B, 1 + K]
  candidates = positives[candidate_ids]                                # [B, 1 + K, D]
  logits = _einsum("id,ikd->ik", anchors, candidates, precision, matmul_dtype) / temperature
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


def _pairwise_invariance(logits: jax.Array, exact_dot: bool = True) -> jax.Array:
  """Mean over ordered pairs a != b of ``invariance_loss(logits[a], logits[b])``.

  Args:
    logits: float32 [V, B, M], the V anchor views' logits over the same candidates per row.
    exact_dot: the cross term as a HIGHEST-precision dot (the original form); False: at HIGH
      precision (three bf16 passes on TPU, ~1e-5 relative: a one-pass bf16 dot, ~4e-3, would
      swamp the cancelling difference below). Its V²·B·M products are few next to the logits'
      V·B·M·D, so HIGH costs little; a float32 multiply-and-sum instead was measured to write
      a [V, V, B, M] block on XLA:CPU (BENCHMARKS.md, "Loss and kNN at scale").

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
  precision = _PRECISION if exact_dot else jax.lax.Precision.HIGH
  cross = jnp.einsum("bim,aim->bai", p_ref, log_p, precision=precision)  # [V(b), V(a), B]

  kl = neg_entropy[:, None, :] - cross
  off_diagonal = ~jnp.eye(num_views, dtype=bool)[:, :, None]
  return jnp.sum(jnp.where(off_diagonal, kl, 0.0), axis=(0, 1)) / (num_views * (num_views - 1))


def _candidate_set_terms(online, candidates, negative_indices, temperature, *, column_mask=None,
                         pair_mask=None, positives=None, row_mask=None, precision="highest",
                         matmul_dtype=jnp.float32):
  """Contrastive, invariance and top-1 terms of all anchor views against one candidate set.

  Args:
    online: float32 [V, B, D] normalised anchors.
    candidates: float32 [B, D] normalised candidates (row i = row i's positive, unless
      ``positives`` is given).
    negative_indices: int32 [B, K] or None (None: all other rows are negatives).
    temperature: scalar > 0.
    column_mask: bool [B] or None: False removes a candidate from every row's softmax (and
      zeroes that row's terms).
    pair_mask: bool [B, B] or None (see :func:`contrastive_loss`).
    positives: float32 [B, D] or None: row i's positive replaces candidate i in row i's
      softmax only (the other rows keep ``candidates[i]`` as a negative).
    row_mask: bool [B] or None: False zeroes that row's terms without removing its candidate.
    precision, matmul_dtype: of the matmuls (see :func:`contrastive_loss`).

  Returns:
    (contrastive [V, B], invariance [B], top1 [V, B] float32); masked rows hold zeros.
  """
  matmul = dict(precision=precision, matmul_dtype=matmul_dtype)
  if negative_indices is None:
    per_view = lambda anchors: contrastive_loss(
        anchors, candidates, temperature=temperature, column_mask=column_mask,
        pair_mask=pair_mask, **matmul)[1]
    positive_column = jnp.arange(candidates.shape[0])
  else:
    per_view = lambda anchors: sampled_contrastive_loss(
        anchors, candidates, negative_indices, temperature=temperature,
        column_mask=column_mask, pair_mask=pair_mask, **matmul)[1]
    positive_column = jnp.zeros(candidates.shape[0], jnp.int32)
  logits = jax.vmap(per_view)(online)                                  # [V, B, M]
  is_positive = positive_column[:, None] == jnp.arange(logits.shape[-1])[None, :]  # [B, M]
  if positives is not None:
    own = _einsum("vbd,bd->vb", online, positives, precision, matmul_dtype) / temperature
    logits = jnp.where(is_positive[None], own[..., None], logits)
  contrastive = -jnp.sum(jnp.where(is_positive[None], jax.nn.log_softmax(logits, -1), 0.0), -1)
  invariance = _pairwise_invariance(logits, exact_dot=_exact(precision, matmul_dtype))
  top1 = (jnp.argmax(logits, axis=-1) == positive_column[None, :]).astype(jnp.float32)
  for mask in (column_mask, row_mask):
    if mask is not None:
      contrastive = jnp.where(mask[None, :], contrastive, 0.0)
      invariance = jnp.where(mask, invariance, 0.0)
      top1 = jnp.where(mask[None, :], top1, 0.0)
  return contrastive, invariance, top1


# Which negatives a semantic positive is scored against (``semppl_loss(semantic_negatives=)``).
SEMANTIC_NEGATIVES = ("semantic", "augmentation")


def _check_semppl_inputs(online, target, semantic, semantic_valid, temperature, num_negatives,
                         key, semantic_labels, mask_same_class_negatives, semantic_negatives):
  """Validates :func:`semppl_loss`'s inputs; returns ``(V, B, D, L, N)``."""
  _check_array("online", online, 3, "[V, B, D]")
  num_views, batch, dim = np.shape(online)
  expected = f"[L, B, D] with 1 <= L <= V = {num_views}, B = {batch}, D = {dim}"
  _check_array("target", target, 3, expected)
  num_large = np.shape(target)[0]
  if np.shape(target)[1:] != (batch, dim) or not 1 <= num_large <= num_views:
    raise ValueError(f"target must have shape {expected}, got shape {np.shape(target)}.")
  expected = f"[L, N, B, D] = [{num_large}, N, {batch}, {dim}]"
  _check_array("semantic", semantic, 4, expected)
  num_draws = np.shape(semantic)[1]
  if np.shape(semantic) != (num_large, num_draws, batch, dim):
    raise ValueError(f"semantic must have shape {expected}, got shape {np.shape(semantic)}.")
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
  if mask_same_class_negatives and (semantic_labels is None
                                    or np.shape(semantic_labels) != (batch,)):
    raise ValueError(
        f"semantic_labels must have shape [B] = ({batch},) when mask_same_class_negatives "
        f"is set, got {None if semantic_labels is None else np.shape(semantic_labels)}.")
  if semantic_negatives not in SEMANTIC_NEGATIVES:
    raise ValueError(f"semantic_negatives must be one of {SEMANTIC_NEGATIVES}, "
                     f"got {semantic_negatives!r}.")
  return num_views, batch, dim, num_large, num_draws


def _semantic_terms_shared(online, target, semantic, semantic_valid, temperature, matmul):
  """The semantic cross-entropy and top-1 sums of the 'augmentation' form, without I_sem.

  Row i's candidates are the augmentation term's ``target[l]`` with its own target replaced by
  the semantic positive, so every candidate but the positive is shared by all N draws: per
  large view ``l`` one ``[V, B, B]`` logits block (the augmentation term's own, which XLA
  computes once) gives each row's log-sum-exp over its negatives, and each draw only adds its
  positive's ``[V, B]`` logits: ``CE = logaddexp(lse_negatives, pos) - pos``. That is the
  general path's value up to float rounding, at ``1/N`` of its logits work. Top-1 follows
  ``argmax`` (the first maximal column): the positive wins ties with later columns only.

  Returns:
    ``(ce_sum, top1_sum)`` float32 [] each, over valid ``(l, s, view, row)`` entries.
  """
  ce_sum = top1_sum = jnp.zeros((), jnp.float32)
  num_large, num_draws, batch = semantic_valid.shape
  own = jnp.eye(batch, dtype=bool)
  before = jnp.arange(batch)[None, :] < jnp.arange(batch)[:, None]    # column m < row i
  for l in range(num_large):
    logits = _einsum("vid,jd->vij", online, target[l], matmul["precision"],
                     matmul["matmul_dtype"]) / temperature             # [V, B, B]
    negatives = jnp.where(own, MASKED_LOGIT, logits)
    lse = jax.nn.logsumexp(negatives, axis=-1)                         # [V, B]
    first_best = jnp.max(jnp.where(before, negatives, MASKED_LOGIT), axis=-1)
    later_best = jnp.max(jnp.where(before, MASKED_LOGIT, negatives), axis=-1)
    pos = _einsum("vbd,nbd->nvb", online, semantic[l], matmul["precision"],
                  matmul["matmul_dtype"]) / temperature                # [N, V, B]
    valid = semantic_valid[l][:, None, :]                              # [N, 1, B]
    ce = jnp.logaddexp(lse[None], pos) - pos
    top1 = ((pos > first_best[None]) & (pos >= later_best[None])).astype(jnp.float32)
    ce_sum = ce_sum + jnp.sum(jnp.where(valid, ce, 0.0))
    top1_sum = top1_sum + jnp.sum(jnp.where(valid, top1, 0.0))
  return ce_sum, top1_sum


def _semantic_terms(online, target, semantic, semantic_valid, temperature, negatives_for,
                    pair_mask, semantic_negatives, matmul):
  """Sums of the semantic contrastive, invariance and top-1 terms over every (l, s).

  ``negatives_for(l, s, valid)`` gives that candidate set's sampled negatives (or None).
  With ``semantic_negatives='semantic'`` the candidates are every row's draw ``semantic[l, s]``
  (invalid draws masked out of every softmax); with ``'augmentation'`` they are the
  augmentation term's ``target[l]`` with row i's own target replaced by its semantic positive
  in row i's softmax, so both the cross-entropy and the KL are about *this* row's positive.
  """
  ce_sum = inv_sum = top1_sum = jnp.zeros((), jnp.float32)
  num_large, num_draws = semantic_valid.shape[:2]
  for l in range(num_large):
    for s in range(num_draws):
      valid = semantic_valid[l, s]
      if semantic_negatives == "semantic":
        terms = _candidate_set_terms(online, semantic[l, s], negatives_for(l, s, valid),
                                     temperature, column_mask=valid, pair_mask=pair_mask,
                                     **matmul)
      else:
        terms = _candidate_set_terms(online, target[l], negatives_for(l, s, None), temperature,
                                     pair_mask=pair_mask, positives=semantic[l, s],
                                     row_mask=valid, **matmul)
      ce, inv, top1 = terms  # Invalid rows are already zero.
      ce_sum, inv_sum, top1_sum = ce_sum + jnp.sum(ce), inv_sum + jnp.sum(inv), top1_sum + jnp.sum(
          top1)
  return ce_sum, inv_sum, top1_sum


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
    semantic_invariance_weight: Optional[float] = None,
    semantic_negatives: str = "semantic",
    num_negatives: Optional[int] = None,
    key: Optional[jax.Array] = None,
    semantic_labels: Optional[jax.Array] = None,
    mask_same_class_negatives: bool = False,
    semantic_scale=1.0,
    precision: str = "highest",
    matmul_dtype=jnp.float32,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The SemPPL objective ``c·(L_augm + s·α·L_sem) + λ·I_augm + s·λ_sem·I_sem``.

  ``s`` is ``semantic_scale``; ``λ_sem`` is ``semantic_invariance_weight`` (default λ). Every
  input is l2-normalised here (idempotent); ``target`` and ``semantic`` are stop-gradient, so
  gradients reach only ``online``. Averaging conventions: module docstring.

  Args:
    online: float [V, B, D] online projections of all views; entries [0, L) are the large views
      in the target's order (V >= L).
    target: float [L, B, D] target projections of the large views (row i of ``target[l]`` is
      the augmentation positive of row i of every anchor view).
    semantic: float [L, N, B, D]: ``semantic[l, s, i]`` is draw s for image i from queue l.
    semantic_valid: bool [L, N, B]; False rows are excluded as anchors of that (l, s) (and,
      with ``semantic_negatives='semantic'``, as candidates of every row of that (l, s)).
    temperature: scalar > 0 (τ).
    contrastive_weight: c.
    semantic_weight: α.
    invariance_weight: λ.
    semantic_invariance_weight: λ_sem (None: λ).
    semantic_negatives: 'semantic' (the negatives of row i's semantic positive are the other
      rows' semantic positives: the first-built form, whose KL ignores which draw is row i's)
      or 'augmentation' (the other images' target projections, as in the augmentation term).
    num_negatives: optional int K, 1 <= K < B: each row's candidates are its positive plus K
      sampled other rows, one sample per candidate set shared by all anchor views.
    key: PRNG key, required when ``num_negatives`` is set.
    semantic_labels: int [B], y*_i; required by ``mask_same_class_negatives``.
    mask_same_class_negatives: drop other rows of row i's (pseudo-)class from the semantic
      term's negatives. The augmentation term is unchanged.
    semantic_scale: scalar >= 0 (python or traced), e.g. a ramp; 1 = off.
    precision: matmul precision, 'highest' (full float32, the reference numerics) or 'default'
      (the backend's default: one bf16 pass on TPU, TF32 on GPU, float32 on CPU).
    matmul_dtype: float32, or bfloat16: the logits' matmuls take bf16 operands with float32
      accumulation (and run at the default precision whatever ``precision`` says). Everything
      else (normalisation, softmax, KL) stays float32; the KL's cross term then runs at HIGH
      precision (three bf16 passes on TPU; see ``_pairwise_invariance``).

  Returns:
    loss: float32 [] total.
    aux: float32 [] scalars 'loss', 'augm_contrastive' (L_augm), 'semantic_contrastive' (L_sem),
      'augm_invariance' (I_augm), 'semantic_invariance' (I_sem; 0, not computed, when λ_sem is
      a python 0 with the 'augmentation' negatives, no sampled negatives and no same-class
      mask: then L_sem shares the augmentation term's logits), 'contrastive'
      (L_augm + s·α·L_sem), 'invariance' (I_augm + s·I_sem), 'semantic_valid_fraction',
      'augm_top1' / 'semantic_top1' (fraction of entries whose positive has the largest logit),
      'semantic_scale' (s).
  """
  num_views, batch, _, num_large, num_draws = _check_semppl_inputs(
      online, target, semantic, semantic_valid, temperature, num_negatives, key,
      semantic_labels, mask_same_class_negatives, semantic_negatives)
  _check_matmul(precision, matmul_dtype)
  matmul = dict(precision=precision, matmul_dtype=matmul_dtype)
  pair_mask = None
  if mask_same_class_negatives:
    labels = jnp.asarray(semantic_labels)
    pair_mask = labels[:, None] != labels[None, :]
  online = l2_normalize(online)
  target = jax.lax.stop_gradient(l2_normalize(target))
  semantic = jax.lax.stop_gradient(l2_normalize(semantic))
  semantic_valid = jnp.asarray(semantic_valid)
  if jnp.dtype(matmul_dtype) != jnp.float32:
    # Cast on each device's own rows: the rows it gathers from the others (every image is a
    # candidate of every row) then travel in bf16, and the bits are those of the dots' cast.
    target, semantic = target.astype(matmul_dtype), semantic.astype(matmul_dtype)
  if num_negatives is not None:
    augm_key, sem_key = jax.random.split(key)
    augm_keys = jax.random.split(augm_key, num_large)
    sem_keys = jax.random.split(sem_key, num_large * max(num_draws, 1))

  def negatives_for(l, s, valid):
    if num_negatives is None:
      return None
    k = augm_keys[l] if s is None else sem_keys[l * num_draws + s]
    return sample_negative_indices(k, batch, num_negatives, column_mask=valid)

  # Loops over the (few) candidate sets keep one [V, B, M] logits block live at a time.
  augm = [jax.tree.map(jnp.mean, _candidate_set_terms(online, target[l], negatives_for(
      l, None, None), temperature, **matmul)) for l in range(num_large)]
  l_augm, i_augm, augm_top1 = (jnp.mean(jnp.stack(t)) for t in zip(*augm))
  sem_inv_weight = (invariance_weight if semantic_invariance_weight is None
                    else semantic_invariance_weight)
  if (semantic_negatives == "augmentation" and num_negatives is None and pair_mask is None
      and isinstance(sem_inv_weight, (int, float)) and sem_inv_weight == 0):
    # I_sem has weight 0 and is not computed (reported as 0): the cross-entropy then shares
    # the augmentation term's logits (see _semantic_terms_shared).
    ce_sum, top1_sum = _semantic_terms_shared(online, target, semantic, semantic_valid,
                                              temperature, matmul)
    inv_sum = jnp.zeros((), jnp.float32)
  else:
    ce_sum, inv_sum, top1_sum = _semantic_terms(online, target, semantic, semantic_valid,
                                                temperature, negatives_for, pair_mask,
                                                semantic_negatives, matmul)
  num_valid = jnp.sum(semantic_valid.astype(jnp.float32))
  # max(., 1): with no valid row every sum is 0, so each semantic term is 0, not NaN.
  denominator = jnp.maximum(num_valid, 1.0)
  l_sem, i_sem = ce_sum / (num_views * denominator), inv_sum / denominator
  scale = jnp.asarray(semantic_scale, jnp.float32)
  contrastive = l_augm + scale * semantic_weight * l_sem
  weighted_invariance = invariance_weight * i_augm + scale * sem_inv_weight * i_sem
  loss = contrastive_weight * contrastive + weighted_invariance
  aux = {"loss": loss, "augm_contrastive": l_augm, "semantic_contrastive": l_sem,
         "augm_invariance": i_augm, "semantic_invariance": i_sem, "contrastive": contrastive,
         "invariance": i_augm + scale * i_sem,
         "semantic_valid_fraction": num_valid / max(semantic_valid.size, 1),
         "augm_top1": augm_top1, "semantic_top1": top1_sum / (num_views * denominator),
         "semantic_scale": scale}
  aux = {name: jnp.asarray(value, jnp.float32) for name, value in aux.items()}
  return aux["loss"], aux
