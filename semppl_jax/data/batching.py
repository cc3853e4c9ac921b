"""Host-local numpy batches for in-memory datasets (Fashion-MNIST and the like).

Training batches are a pure function of `(seed, step)`: the labelled and the unlabelled images
each form an endless stream, the concatenation of seeded per-epoch permutations, and the global
batch at step `s` is positions `[s*B, (s+1)*B)` of each stream. Nothing depends on earlier steps,
so a run resumed at step `s` sees exactly the data the uninterrupted run would have seen.
Host `p` of `P` takes rows `[p*B/P, (p+1)*B/P)` of every global batch.
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from typing import Iterator

import numpy as np

from semppl_jax import checks

# Stream ids folded into the permutation seeds, so the two streams are independent.
_LABELLED_STREAM = 0
_UNLABELLED_STREAM = 1


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
  """int64 `[n]` permutation of epoch `epoch` of a stream (read-only, cached).

  Built from the raw PCG64 output only (argsort of random keys), which NumPy keeps fixed across
  versions, so the data order of a run is reproducible on any installation.
  """
  keys = np.random.PCG64(np.random.SeedSequence([seed, stream, epoch])).random_raw(n)
  perm = np.argsort(keys, kind="stable").astype(np.int64)
  perm.setflags(write=False)
  return perm


def stream_indices(seed: int, stream: int, n: int, start: int, count: int) -> np.ndarray:
  """Dataset indices at positions `[start, start + count)` of a seeded endless stream.

  Args:
    seed, stream: select the permutations; epoch `e` covers positions `[e*n, (e+1)*n)` and is
      a permutation of `range(n)`.
    n: dataset size.
    start, count: the window.

  Returns:
    int64 `[count]` indices in `[0, n)`.
  """
  positions = np.arange(start, start + count, dtype=np.int64)
  epochs = positions // n
  out = np.empty(count, dtype=np.int64)
  for epoch in np.unique(epochs):
    sel = epochs == epoch
    out[sel] = _epoch_permutation(seed, stream, int(epoch), n)[positions[sel] % n]
  return out


class SemiSupervisedBatches:
  """Deterministic, resumable semi-supervised batches from in-memory arrays.

  `batches(step)` returns the host-local batch of global step `step`, a dict:
    * `labelled_images`   uint8 `[b_l, H, W, C]`,
    * `labels`            int32 `[b_l]` in `[0, num_classes)`,
    * `unlabelled_images` uint8 `[b_u, H, W, C]`,
    * `unlabelled_labels` int32 `[b_u]` hidden labels (-1 = unknown), for monitoring only,
  with `b_l = labelled_batch_size / process_count`, `b_u = unlabelled_batch_size /
  process_count`. Every epoch of each stream visits each example exactly once.
  """

  def __init__(self, *, labelled_images: np.ndarray, labelled_labels: np.ndarray,
               unlabelled_images: np.ndarray, unlabelled_labels: np.ndarray | None = None,
               labelled_batch_size: int, unlabelled_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               num_classes: int | None = None):
    """Validates and stores the data (arrays are not copied).

    Args:
      labelled_images: uint8 `[N_l, H, W, C]`.
      labelled_labels: int `[N_l]`, in `[0, num_classes)`.
      unlabelled_images: uint8 `[N_u, H, W, C]` (the same H, W, C).
      unlabelled_labels: int `[N_u]` hidden labels in `[-1, num_classes)`, or None (all -1).
      labelled_batch_size: global B_l, positive, divisible by `process_count`, <= N_l.
      unlabelled_batch_size: global B_u, positive, divisible by `process_count`, <= N_u.
      seed: non-negative int; with `step` it fixes the batch.
      process_index: this host, in `[0, process_count)`.
      process_count: number of hosts.
      num_classes: if given, the labels are checked against it.

    Raises:
      ValueError: naming the offending argument and what was expected.
    """
    checks.check_int("process_count", process_count, 1)
    checks.check_int("process_index", process_index, 0)
    if process_index >= process_count:
      raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
    checks.check_int("seed", seed, 0)
    if num_classes is not None:
      checks.check_int("num_classes", num_classes, 1)
    _check_images("labelled_images", labelled_images)
    _check_images("unlabelled_images", unlabelled_images)
    if labelled_images.shape[1:] != unlabelled_images.shape[1:]:
      raise ValueError(f"unlabelled_images must have image shape {labelled_images.shape[1:]} "
                       f"like labelled_images, got {unlabelled_images.shape[1:]}")
    labelled_labels = _check_labels("labels", labelled_labels, labelled_images.shape[0], 0,
                                    num_classes)
    if unlabelled_labels is None:
      unlabelled_labels = np.full((unlabelled_images.shape[0],), -1, np.int32)
    unlabelled_labels = _check_labels("unlabelled_labels", unlabelled_labels,
                                      unlabelled_images.shape[0], -1, num_classes)
    for name, size, n in (("labelled_batch_size", labelled_batch_size,
                           labelled_images.shape[0]),
                          ("unlabelled_batch_size", unlabelled_batch_size,
                           unlabelled_images.shape[0])):
      checks.check_int(name, size, 1)
      if size % process_count:
        raise ValueError(f"{name} must be divisible by process_count={process_count}, "
                         f"got {size}")
      if size > n:
        raise ValueError(f"{name} must be at most the dataset size {n}, got {size}")
    self._labelled = (labelled_images, labelled_labels)
    self._unlabelled = (unlabelled_images, unlabelled_labels)
    self._seed = int(seed)
    self.labelled_batch_size = labelled_batch_size
    self.unlabelled_batch_size = unlabelled_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.host_labelled_batch_size = labelled_batch_size // process_count
    self.host_unlabelled_batch_size = unlabelled_batch_size // process_count

  @property
  def num_labelled(self) -> int:
    """N_l, the number of labelled examples (one labelled epoch)."""
    return self._labelled[0].shape[0]

  @property
  def num_unlabelled(self) -> int:
    """N_u, the number of unlabelled examples (one unlabelled epoch)."""
    return self._unlabelled[0].shape[0]

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This host's (labelled int64 `[b_l]`, unlabelled int64 `[b_u]`) indices at `step`."""
    checks.check_int("step", step, 0)
    out = []
    for stream, (images, _), global_b, host_b in (
        (_LABELLED_STREAM, self._labelled, self.labelled_batch_size,
         self.host_labelled_batch_size),
        (_UNLABELLED_STREAM, self._unlabelled, self.unlabelled_batch_size,
         self.host_unlabelled_batch_size)):
      start = step * global_b + self.process_index * host_b
      out.append(stream_indices(self._seed, stream, images.shape[0], start, host_b))
    return out[0], out[1]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """The host-local batch of global step `step` (keys and shapes in the class docstring)."""
    lab_idx, unlab_idx = self.indices(step)
    return {
        "labelled_images": self._labelled[0][lab_idx],
        "labels": self._labelled[1][lab_idx],
        "unlabelled_images": self._unlabelled[0][unlab_idx],
        "unlabelled_labels": self._unlabelled[1][unlab_idx],
    }

  def iterate(self, start_step: int = 0, num_steps: int | None = None,
              prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches of steps `start_step, start_step + 1, ...`.

    Args:
      start_step: first global step (the resume point).
      num_steps: how many batches; None = endless.
      prefetch: batches prepared ahead by a background thread; 0 = no thread.

    Yields:
      dicts as returned by `__call__`, identical to calling it step by step.
    """
    checks.check_int("start_step", start_step, 0)
    checks.check_int("prefetch", prefetch, 0)
    if num_steps is not None:
      checks.check_int("num_steps", num_steps, 0)
    steps = (itertools.count(start_step) if num_steps is None
             else range(start_step, start_step + num_steps))
    if prefetch == 0:
      return (self(s) for s in steps)
    return _prefetch((self(s) for s in steps), prefetch)


def semi_supervised_batch(step: int, *, labelled_images: np.ndarray,
                          labelled_labels: np.ndarray, unlabelled_images: np.ndarray,
                          unlabelled_labels: np.ndarray | None = None,
                          labelled_batch_size: int,
                          unlabelled_batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1, num_classes: int | None = None
                          ) -> dict[str, np.ndarray]:
  """The host-local semi-supervised batch of global step `step`, a pure function of it.

  Args:
    step: non-negative global step.
    labelled_images: uint8 `[N_l, H, W, C]`; labelled_labels: int `[N_l]`.
    unlabelled_images: uint8 `[N_u, H, W, C]`; unlabelled_labels: int `[N_u]` hidden labels
      (-1 = unknown) or None.
    labelled_batch_size, unlabelled_batch_size: global batch sizes B_l, B_u.
    seed: data-order seed.
    process_index, process_count: this host's rows of the global batch.
    num_classes: if given, labels are checked to lie in `[0, num_classes)`.

  Returns:
    dict `labelled_images` uint8 `[b_l, H, W, C]`, `labels` int32 `[b_l]`,
    `unlabelled_images` uint8 `[b_u, H, W, C]`, `unlabelled_labels` int32 `[b_u]`, with
    `b = B / process_count` (see `SemiSupervisedBatches`).
  """
  return SemiSupervisedBatches(
      labelled_images=labelled_images, labelled_labels=labelled_labels,
      unlabelled_images=unlabelled_images, unlabelled_labels=unlabelled_labels,
      labelled_batch_size=labelled_batch_size, unlabelled_batch_size=unlabelled_batch_size,
      seed=seed, process_index=process_index, process_count=process_count,
      num_classes=num_classes)(step)


def iterate(start_step: int = 0, *, num_steps: int | None = None, prefetch: int = 2,
            **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Yields `semi_supervised_batch(s, **kwargs)` for `s = start_step, start_step + 1, ...`.

  Args:
    start_step: first global step.
    num_steps: number of batches; None = endless.
    prefetch: batches prepared ahead in a background thread (0 = none).
    **kwargs: as for `SemiSupervisedBatches`.
  """
  return SemiSupervisedBatches(**kwargs).iterate(start_step, num_steps, prefetch)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Yields fixed-shape, host-local evaluation batches covering every example once.

  The data is cut into `ceil(N / batch_size)` global batches in order; host `p` takes rows
  `[p*b, (p+1)*b)` of each (`b = batch_size / process_count`), so every host yields the same
  number of batches and the union over hosts is the dataset, each example exactly once. The
  last global batch is padded with zero images and label -1.

  Args:
    images: `[N, H, W, C]` (any dtype, typically uint8).
    labels: int `[N]`.
    batch_size: global batch size, positive and divisible by `process_count`.
    process_index: this host, in `[0, process_count)`.
    process_count: number of hosts.

  Yields:
    dicts `images` `[b, H, W, C]` (images' dtype), `labels` int32 `[b]` (-1 on padding),
    `mask` bool `[b]` (False on padding).

  Raises:
    ValueError: naming the offending argument.
  """
  checks.check_int("process_count", process_count, 1)
  checks.check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  checks.check_int("batch_size", batch_size, 1)
  if batch_size % process_count:
    raise ValueError(f"batch_size must be divisible by process_count={process_count}, "
                     f"got {batch_size}")
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must have shape [N, H, W, C], got {images.shape}")
  labels = _check_labels("labels", labels, images.shape[0], 0, None)
  return _eval_batches(images, labels, batch_size, process_index, process_count)


def _eval_batches(images, labels, batch_size, process_index, process_count):
  n = images.shape[0]
  b = batch_size // process_count
  for start in range(0, n, batch_size):
    lo = min(start + process_index * b, n)
    hi = min(lo + b, n)
    k = hi - lo
    batch_images = np.zeros((b,) + images.shape[1:], images.dtype)
    batch_images[:k] = images[lo:hi]
    batch_labels = np.full((b,), -1, np.int32)
    batch_labels[:k] = labels[lo:hi]
    mask = np.zeros((b,), bool)
    mask[:k] = True
    yield {"images": batch_images, "labels": batch_labels, "mask": mask}


_END = object()


class _Failure:

  def __init__(self, error: BaseException):
    self.error = error


def _prefetch(items: Iterator, size: int) -> Iterator:
  """Runs `items` in a daemon thread, `size` items ahead; stops it when the consumer does.

  A generator, so the thread starts on the first `next()` and is stopped and joined when the
  generator finishes, is closed, or is garbage-collected.
  """
  buffer: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      # Re-raised in the consumer, where it can be seen.
      put(_Failure(e))

  thread = threading.Thread(target=produce, daemon=True, name="semppl-prefetch")
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()


def _check_images(name: str, images) -> None:
  if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
    desc = (f"shape {images.shape} dtype {images.dtype}" if isinstance(images, np.ndarray)
            else type(images).__name__)
    raise ValueError(f"{name} must be a uint8 array [N, H, W, C], got {desc}")
  if images.shape[0] == 0:
    raise ValueError(f"{name} must hold at least one image, got shape {images.shape}")


def _check_labels(name: str, labels, n: int, low: int, num_classes: int | None) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} must be an integer array of shape ({n},), got shape "
                     f"{labels.shape} dtype {labels.dtype}")
  high = num_classes if num_classes is not None else np.iinfo(np.int32).max
  if n and (labels.min() < low or labels.max() >= high):
    bound = "num_classes" if num_classes is None else num_classes
    raise ValueError(f"{name} must lie in [{low}, {bound}), found range "
                     f"[{int(labels.min())}, {int(labels.max())}]")
  return labels.astype(np.int32, copy=False)
