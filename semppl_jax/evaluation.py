"""Evaluation shared by pre-training and the evaluation experiment, as pure functions.

* :func:`preprocess` / :func:`eval_view`: images as the networks see them at evaluation;
* :func:`linear_head` / :func:`classifier_loss`: the one linear classifier (the online probe of
  pre-training and the head of the fine-tune / linear protocols);
* :func:`embed_batches`: runs a jitted function over host-local evaluation batches and returns
  global arrays sharded along the examples;
* :func:`knn_top1` and :func:`top1`: accuracies over masked (padded) global arrays.
"""
from typing import Callable, Dict, Iterable, Mapping, Sequence, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from semppl_jax import augmentations
from semppl_jax import knn
from semppl_jax import networks
from semppl_jax import parallel


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 or float images ``[..., H, W, C]`` (C in {1, 3}) -> float32 in [0, 1], 3 channels."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    images = images.astype(jnp.float32) / 255.0
  else:
    images = images.astype(jnp.float32)
  if images.shape[-1] == 1:
    images = jnp.broadcast_to(images, images.shape[:-1] + (3,))
  return images


def eval_view(images: jax.Array, size: int) -> jax.Array:
  """The whole image ``[B, H, W, C]`` resized to ``size`` (if needed) and normalised.

  Returns:
    float32 ``[B, size, size, 3]``, ImageNet-normalised (``augmentations.normalize``).
  """
  x = preprocess(images)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=True)
  return augmentations.normalize(x)


def linear_head(num_classes: int, name: str = "linear") -> hk.Transformed:
  """``embedding [N, F] -> logits [N, num_classes]``: one linear layer named ``name``."""
  return hk.transform(lambda embedding: networks.LinearClassifier(num_classes, name=name)(
      embedding))


def classifier_loss(head: hk.Transformed, params: hk.Params, embeddings: jax.Array,
                    labels: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy of a linear head.

  Args:
    head: from :func:`linear_head`.
    params: its parameters.
    embeddings: float [N, F].
    labels: int [N] in [0, C).

  Returns:
    ``(loss float32 [], logits float32 [N, C])``.
  """
  logits = head.apply(params, None, embeddings)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, logits


def embed_batches(fn: Callable[[jax.Array], Tuple[jax.Array, ...]],
                  batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh,
                  max_examples: int = 0
                  ) -> Tuple[Tuple[jax.Array, ...], jax.Array, jax.Array]:
  """Applies ``fn`` to every host-local evaluation batch and concatenates the results.

  Args:
    fn: jitted ``images [b, H, W, C] (global, sharded on 'data') -> tuple of [b, ...]``.
    batches: this host's evaluation batches, dicts with ``images`` ``[b_host, H, W, C]``,
      ``labels`` int ``[b_host]`` and ``mask`` bool ``[b_host]`` (False on padding), where
      ``b = b_host * process_count`` is the global evaluation batch.
    mesh: the mesh with a ``'data'`` axis.
    max_examples: 0 = every example; else only the first ``max_examples`` examples in
      evaluation order stay unmasked, and no batch after them is computed.

  Returns:
    ``(outputs, labels int32 [N], mask bool [N])``: ``outputs`` is the tuple of ``fn``'s
    outputs concatenated over batches (``N`` = batches x ``b``); every array is a global array
    sharded along ``N``.

  Raises:
    ValueError: if there is no batch.
  """
  outs, labels, masks = [], [], []
  offset = 0
  for batch in batches:
    host_b = len(batch["mask"])
    global_b = host_b * jax.process_count()
    if max_examples and offset >= max_examples:
      break
    mask = np.asarray(batch["mask"], bool)
    if max_examples:
      position = offset + jax.process_index() * host_b + np.arange(host_b)
      mask = mask & (position < max_examples)
    g = parallel.host_local_to_global(
        {"images": batch["images"], "labels": np.asarray(batch["labels"], np.int32),
         "mask": mask}, mesh)
    with jax.set_mesh(mesh):
      out = fn(g["images"])
    outs.append(out if isinstance(out, tuple) else (out,))
    labels.append(g["labels"])
    masks.append(g["mask"])
    offset += global_b
  if not outs:
    raise ValueError("batches: the evaluation split is empty.")
  cat = lambda xs: jnp.concatenate(xs, axis=0)
  return (tuple(cat([o[i] for o in outs]) for i in range(len(outs[0]))), cat(labels),
          cat(masks))


def top1(predictions: jax.Array, labels: jax.Array, mask: jax.Array) -> float:
  """Share of unmasked rows whose prediction equals the label (a Python float)."""
  correct = jnp.sum((predictions == labels) & mask)
  return float(correct / jnp.maximum(jnp.sum(mask), 1))


def knn_top1(queries: jax.Array, labels: jax.Array, mask: jax.Array, bank: jax.Array,
             bank_labels: jax.Array, bank_mask: jax.Array, *, ks: Sequence[int],
             num_classes: int, temperature: float, mesh: Mesh) -> Dict[str, float]:
  """Weighted-kNN top-1 (cosine, temperature-weighted votes) for every ``k`` in ``ks``.

  Args:
    queries: float [N, F] test embeddings; ``labels`` int [N]; ``mask`` bool [N].
    bank: float [M, F] labelled embeddings; ``bank_labels`` int [M]; ``bank_mask`` bool [M]
      (padding rows never vote).
    ks: neighbour counts (each capped at M).
    num_classes: C.
    temperature: > 0, the vote weight is ``exp(similarity / temperature)``.
    mesh: the mesh the arrays are sharded on (the bank is scored shard by shard).

  Returns:
    ``{'knn_top1_k{k}': float}``.
  """
  bank_labels = jnp.where(bank_mask, bank_labels, -1)
  results = {}
  with jax.set_mesh(mesh):
    for k in ks:
      scores = knn.weighted_knn_scores(queries, bank, bank_labels, k=min(k, bank.shape[0]),
                                       num_classes=num_classes, temperature=temperature)
      results[f"knn_top1_k{k}"] = top1(jnp.argmax(scores, -1), labels, mask)
  return results
