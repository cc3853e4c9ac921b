"""Pictures and curves of a pre-training run, as pure functions.

* image grids as uint8 arrays (what TensorBoard's image summaries take): :func:`image_grid`,
  :func:`view_grid` (one image's large and small views), :func:`confusion_matrix_image`;
* :func:`confusion_matrix` of masked (padded) predictions;
* :func:`semantic_positives`: for one fixed batch and key, the step's views
  (``train.make_views``), the anchors' kNN pseudo-labels and nearest queue labels, and drawn
  semantic positives, each shown as its nearest labelled image of the batch (the queue holds
  embeddings, not images); :func:`semantic_positives_figure` draws them;
* PNG writers from a history of metric dicts (matplotlib's Agg backend, no display needed):
  :func:`write_training_plots`.

Nothing here reads a config or writes TensorBoard events; the experiment decides when and where.
"""
import dataclasses
import io
import json
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from semppl_jax import knn
from semppl_jax import train

matplotlib.use("Agg")  # Before pyplot: headless, deterministic rendering.
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

LOSS_TERMS = ("loss", "augm_contrastive", "semantic_contrastive", "augm_invariance",
              "semantic_invariance", "probe_loss")
PSEUDO_LABEL_MONITORS = ("pseudo_label_accuracy", "semantic_positive_purity",
                         "pseudo_label_coverage")
PLOT_FILES = ("losses.png", "pseudo_labels.png", "knn.png", "confusion_matrix.png")
FASHION_MNIST_CLASS_NAMES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                             "shirt", "sneaker", "bag", "ankle boot")


# ----------------------------------------------------------------------------------------------
# Image grids.
# ----------------------------------------------------------------------------------------------

def to_uint8(images: Any) -> np.ndarray:
  """Images ``[..., H, W, C]`` (C in {1, 3}; float in [0, 1] or uint8) -> uint8 ``[..., H, W, 3]``."""
  x = np.asarray(images)
  if not np.issubdtype(x.dtype, np.integer):
    x = np.round(np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0)
  x = x.astype(np.uint8)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if x.shape[-1] != 3:
    raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
  return x


def image_grid(images: Any, *, columns: Optional[int] = None, pad: int = 2,
               background: int = 255) -> np.ndarray:
  """Tiles images row by row.

  Args:
    images: ``[N, h, w, C]``, float in [0, 1] or uint8, C in {1, 3}; N >= 1.
    columns: images per row (default: ``ceil(sqrt(N))``).
    pad: pixels between (and around) tiles.
    background: grey level of the padding and of empty cells.

  Returns:
    uint8 ``[rows * (h + pad) + pad, columns * (w + pad) + pad, 3]``.
  """
  x = to_uint8(images)
  if x.ndim != 4 or not len(x):
    raise ValueError(f"images must have shape [N >= 1, h, w, C], got {np.shape(images)}")
  n, h, w, _ = x.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background, np.uint8)
  for i in range(n):
    r, c = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def view_grid(large: Any, small: Any, index: int, *, pad: int = 2, scale: int = 1) -> np.ndarray:
  """One image's views in a row: its L large views, then its S small views (at their own size,
  centred in a cell of the large size, so their scale is visible).

  Args:
    large: ``[L, B, h, h, 3]`` float in [0, 1] (``train.make_views``).
    small: ``[S, B, s, s, 3]`` with ``s <= h`` (S may be 0).
    index: which image of the batch.
    pad: pixels between cells (before scaling).
    scale: each pixel becomes ``scale x scale`` pixels (nearest neighbour), so that small
      images are visible at screen size.

  Returns:
    uint8 ``[scale (h + 2 pad), scale ((L + S) (h + pad) + pad), 3]``.
  """
  large, small = to_uint8(large), to_uint8(small)
  h = large.shape[2]
  cells = [large[v, index] for v in range(large.shape[0])]
  for v in range(small.shape[0]):
    cell = np.full((h, h, 3), 255, np.uint8)
    s = small.shape[2]
    off = (h - s) // 2
    cell[off:off + s, off:off + s] = small[v, index]
    cells.append(cell)
  grid = image_grid(np.stack(cells), columns=len(cells), pad=pad)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  return grid


def figure_to_array(fig) -> np.ndarray:
  """A matplotlib figure rendered by Agg -> uint8 ``[H, W, 3]``; the figure is closed."""
  fig.canvas.draw()
  rgba = np.asarray(fig.canvas.buffer_rgba())
  plt.close(fig)
  return np.array(rgba[..., :3])


# ----------------------------------------------------------------------------------------------
# Confusion matrix.
# ----------------------------------------------------------------------------------------------

def confusion_matrix(predictions: Any, labels: Any, mask: Any, num_classes: int) -> jax.Array:
  """Counts of (true label, predicted label) over unmasked rows.

  Args:
    predictions: int ``[N]``; values outside ``[0, C)`` count in no column.
    labels: int ``[N]``; values outside ``[0, C)`` count in no row.
    mask: bool ``[N]``, False on padding.
    num_classes: C.

  Returns:
    int32 ``[C, C]``: row = true class, column = predicted class. A one-hot matmul, so it runs
    sharded (rows along ``'data'``) under ``jax.jit`` as well as on numpy inputs.
  """
  rows = jax.nn.one_hot(jnp.asarray(labels), num_classes, dtype=jnp.float32)
  cols = jax.nn.one_hot(jnp.asarray(predictions), num_classes, dtype=jnp.float32)
  rows = rows * jnp.asarray(mask, jnp.float32)[:, None]
  return jnp.round(rows.T @ cols).astype(jnp.int32)


def confusion_matrix_image(matrix: Any, *, cell: Optional[int] = None) -> np.ndarray:
  """A row-normalised confusion matrix as a heat map (white 0 -> dark blue 1), no text.

  Args:
    matrix: int ``[C, C]`` counts (rows = true class).
    cell: pixels per cell (default: about 256 px in all, at least 1).

  Returns:
    uint8 ``[C * cell, C * cell, 3]``.
  """
  m = np.asarray(matrix, np.float64)
  c = m.shape[0]
  cell = cell or max(1, 256 // c)
  share = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
  dark = np.array([8, 48, 107], np.float64)
  rgb = 255.0 - share[..., None] * (255.0 - dark)
  rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
  return np.round(rgb).astype(np.uint8)


def plot_confusion_matrix(matrix: Any, class_names: Optional[Sequence[str]] = None,
                          title: str = "confusion matrix"):
  """A matplotlib figure: row-normalised shares, counts written in the cells when C <= 20;
  class names on both axes (numbers when ``class_names`` is None), axes "true class" and
  "predicted class"; the title is ``title`` and, below it, the number of images counted and
  their top-1."""
  m = np.asarray(matrix)
  c = m.shape[0]
  names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
  share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
  size = min(12.0, 2.5 + 0.5 * c)
  fig, ax = plt.subplots(figsize=(size, size * 0.9))
  image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
  if c <= 20:
    ax.set_xticks(range(c), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(c), names, fontsize=8)
    for i in range(c):
      for j in range(c):
        if m[i, j]:
          ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                  color="white" if share[i, j] > 0.5 else "black")
  accuracy = np.trace(m) / max(m.sum(), 1)
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  ax.set_title(f"{title}\n{int(m.sum())} images, top-1 {100 * accuracy:.1f}%", fontsize=9)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------------------------
# Views and semantic positives of one fixed batch.
# ----------------------------------------------------------------------------------------------

class PositivesSummary(NamedTuple):
  """What :func:`semantic_positives` computes for a batch of ``B = B_l + B_u`` images.

  Attributes:
    large: float32 ``[L, B, h, h, 3]`` in [0, 1], the large views (labelled rows first).
    small: float32 ``[S, B, s, s, 3]``, the small views.
    labels: int32 ``[B]``, true labels (hidden truth of the unlabelled rows; -1 if unknown).
    is_labelled: bool ``[B]``.
    pseudo_labels: int32 ``[B]``, the kNN pseudo-labels over all large views and queues, as
      in training (-1 while the queues are empty, and at the labelled rows, not queried).
    neighbour_labels: int32 ``[B, k]``, labels of the ``k`` queue entries nearest to view 0 in
      queue 0 (the first ballot of the pseudo-label), nearest first; -1 for missing entries.
    positive_valid: bool ``[N, B]``, whether draw ``n`` (queue 0) found an entry.
    positive_proxy: int32 ``[N, B]``, the labelled row of the batch, of the drawn entry's class,
      whose target projection (view 0) is nearest to the drawn positive: the image that stands
      for it (-1 when the batch has no labelled image of that class).
    positive_similarity: float32 ``[N, B]``, cosine similarity of positive and proxy (NaN
      without a proxy).
  """
  large: jax.Array
  small: jax.Array
  labels: jax.Array
  is_labelled: jax.Array
  pseudo_labels: jax.Array
  neighbour_labels: jax.Array
  positive_valid: jax.Array
  positive_proxy: jax.Array
  positive_similarity: jax.Array


def summary_config(config: train.TrainConfig, num_labelled: int,
                   num_unlabelled: int) -> train.TrainConfig:
  """``config`` for a small unsharded batch of ``num_labelled + num_unlabelled`` images."""
  return dataclasses.replace(config, labelled_batch_size=num_labelled,
                             unlabelled_batch_size=num_unlabelled, num_shards=1)


def slice_batch(batch: Mapping[str, Any], num_labelled: int,
                num_unlabelled: int) -> Dict[str, np.ndarray]:
  """The first images of a (host-local) training batch, for :func:`semantic_positives`.

  Args:
    batch: a training batch (``labelled_*``, ``labels``: labelled rows; ``unlabelled_*``:
      unlabelled rows), whole images or host-cropped views.
    num_labelled, num_unlabelled: rows kept of each (at most what the batch has).

  Returns:
    The same keys, numpy, cut to the first rows.
  """
  out = {}
  for key, value in batch.items():
    n = num_unlabelled if key.startswith("unlabelled") else num_labelled
    out[key] = np.asarray(value)[:n]
  return out


def semantic_positives(config: train.TrainConfig, state: train.TrainState,
                       batch: Mapping[str, jax.Array], key: jax.Array, *,
                       knn_k: Optional[int] = None) -> PositivesSummary:
  """One step's views, pseudo-labels and semantic positives for a small batch.

  Runs the step's own forward pass (:func:`semppl_jax.train.forward`) in inference mode
  (BatchNorm moving averages), so a summary never changes the train state and shows what a
  step draws. Jit it with ``config`` static (a :func:`summary_config`, ``num_shards=1``); under
  ``jax.set_mesh(mesh)`` the queue stays sharded and the batch is replicated. The queue holds
  embeddings, not images: each drawn positive (queue 0) is shown as the labelled image of
  ``batch`` *of the drawn entry's class* whose target projection is nearest to it.

  Args:
    config: the batch's hyper-parameters (``labelled_batch_size`` = B_l rows of ``batch``).
    state: the train state (online / target networks and queues).
    batch: ``labels`` int32 [B_l], ``unlabelled_labels`` int32 [B_u] and the images (see
      ``train.make_views``).
    key: PRNG key (a fixed key gives the same views at every call).
    knn_k: neighbours of the pseudo-label (default ``config.loss.knn_k``).

  Returns:
    A :class:`PositivesSummary`.
  """
  if knn_k:
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, knn_k=knn_k))
  fwd = train.forward(config, state.online_params, state.target_params, state, batch, key,
                      is_training=False)
  # The neighbours the labeller sees: its query is the online prediction or the target
  # projection (LossConfig.knn_query).
  query = fwd.online[0] if config.loss.knn_query == "prediction" else fwd.target[0]
  top = knn.top_k_entries(query, state.queue.embeddings[0], state.queue.labels[0],
                          k=config.loss.knn_k)
  num_labelled = config.labelled_batch_size
  gallery = fwd.target[0, :num_labelled]                          # [B_l, D]
  drawn = fwd.semantic[0].astype(jnp.float32)                     # [N, B, D]
  sims = jnp.einsum("nbd,gd->nbg", drawn, gallery)
  # Only labelled images of the drawn entry's class (y*_i) may stand for it.
  same_class = fwd.labels_star[:, None] == fwd.true_labels[None, :num_labelled]  # [B, B_l]
  sims = jnp.where(same_class[None], sims, -jnp.inf)
  has_proxy = jnp.any(same_class, axis=-1)[None]                  # [1, B]
  return PositivesSummary(
      large=fwd.large, small=fwd.small, labels=fwd.true_labels, is_labelled=fwd.is_labelled,
      pseudo_labels=fwd.pseudo_labels, neighbour_labels=top.labels,
      positive_valid=fwd.semantic_valid[0],
      positive_proxy=jnp.where(has_proxy, jnp.argmax(sims, axis=-1), -1).astype(jnp.int32),
      positive_similarity=jnp.where(has_proxy, jnp.max(sims, axis=-1), jnp.nan))


def _name(label: int, class_names: Optional[Sequence[str]]) -> str:
  if label < 0:
    return "?"
  return class_names[label] if class_names is not None and label < len(class_names) else str(
      label)


def semantic_positives_figure(summary: PositivesSummary,
                              class_names: Optional[Sequence[str]] = None,
                              max_rows: int = 8):
  """Unlabelled anchors (view 0) next to their drawn semantic positives.

  Each row: the anchor, titled with its pseudo-label, a tick or a cross (right or wrong by the
  hidden label; '?' when unknown) and the labels of its nearest queue entries; then one image
  per draw: the labelled image of the batch nearest to the drawn queue embedding (cosine
  similarity in its title), or an empty cell when no entry carries the pseudo-label.

  Args:
    summary: from :func:`semantic_positives`, fetched to the host.
    class_names: names of the labels (default: the numbers).
    max_rows: anchors shown (the first unlabelled rows).

  Returns:
    A matplotlib figure.
  """
  s = jax.tree.map(np.asarray, summary)
  anchors = np.flatnonzero(~s.is_labelled)[:max_rows]
  if not len(anchors):  # A batch without unlabelled images: show the labelled ones.
    anchors = np.arange(min(max_rows, len(s.labels)))
  n_pos = s.positive_valid.shape[0]
  fig, axes = plt.subplots(len(anchors), 1 + n_pos, squeeze=False,
                           figsize=(2.6 + 1.6 * n_pos, 1.9 * len(anchors)),
                           gridspec_kw={"width_ratios": [1.6] + [1] * n_pos})
  large = to_uint8(s.large)
  for row, i in enumerate(anchors):
    ax = axes[row, 0]
    ax.imshow(large[0, i])
    pseudo, truth = int(s.pseudo_labels[i]), int(s.labels[i])
    verdict = "?" if truth < 0 or pseudo < 0 else ("\u2713" if pseudo == truth else "\u2717")
    title = f"pseudo {_name(pseudo, class_names)} {verdict}"
    if verdict == "\u2717":
      title += f" (is {_name(truth, class_names)})"
    # Neighbour labels as counts, most frequent first: "kNN 4 sneaker, 1 sandal".
    found = [int(v) for v in s.neighbour_labels[i] if v >= 0]
    counts = sorted({v: found.count(v) for v in found}.items(), key=lambda kv: -kv[1])
    votes = ", ".join(f"{n} {_name(v, class_names)}" for v, n in counts) or "empty queue"
    ax.set_title(f"{title}\nkNN {votes}", fontsize=7,
                 color="black" if verdict == "?" else ("green" if verdict == "\u2713"
                                                       else "red"))
    for n in range(n_pos):
      ax = axes[row, 1 + n]
      drawn = _name(pseudo if not s.is_labelled[i] else truth, class_names)
      if s.positive_valid[n, i] and s.positive_proxy[n, i] >= 0:
        ax.imshow(large[0, int(s.positive_proxy[n, i])])
        ax.set_title(f"positive {n + 1}: {drawn}\ncos {s.positive_similarity[n, i]:.2f}",
                     fontsize=7)
      elif s.positive_valid[n, i]:
        ax.set_title(f"positive {n + 1}: {drawn}\n(no labelled image\nof it in the batch)",
                     fontsize=7)
      else:
        ax.set_title("no entry", fontsize=7)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle("anchors (pseudo-label, nearest queue labels) | semantic positives (nearest "
               "labelled image of the drawn entry's class)", fontsize=8)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------------------------
# Histories and PNG plots.
# ----------------------------------------------------------------------------------------------

def window_means(window: Sequence[Mapping[str, Any]]) -> Dict[str, float]:
  """Per-metric means of a window of step metrics (device or host scalars) -> floats."""
  fetched = jax.device_get(list(window))
  names = sorted({k for m in fetched for k in m})
  return {k: float(np.mean([m[k] for m in fetched if k in m])) for k in names}


def series(history: Sequence[Mapping[str, float]], name: str):
  """``(steps, values)`` numpy arrays of the entries of ``history`` that hold ``name``."""
  rows = [(h["step"], h[name]) for h in history if name in h and np.isfinite(h[name])]
  if not rows:
    return np.zeros((0,), np.int64), np.zeros((0,), np.float64)
  steps, values = zip(*rows)
  return np.asarray(steps), np.asarray(values, np.float64)


def plot_losses(history: Sequence[Mapping[str, float]]):
  """Loss terms over steps (log scale; terms that are always 0, e.g. relic's semantic ones, are
  left out)."""
  return _window_plot(history, LOSS_TERMS, lambda values: np.any(values > 0),
                      ylabel="window mean (the console shows the step's value)",
                      title="loss terms (mean over each logging window)", yscale="log")


def plot_pseudo_labels(history: Sequence[Mapping[str, float]]):
  """Pseudo-label accuracy, semantic-positive purity and coverage over steps."""
  return _window_plot(
      history, PSEUDO_LABEL_MONITORS + ("queue_fill",), lambda values: True,
      ylabel="window mean", ylim=(0, 1.02),
      title="pseudo-labels (unlabelled images, hidden truth; mean over each logging window)")


def _window_plot(history, names, keep, **axes):
  """One line per metric of ``names`` that ``history`` holds and ``keep(values)`` accepts."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for name in names:
    steps, values = series(history, name)
    if len(values) and keep(values):
      ax.plot(steps, values, marker="." if len(values) < 20 else None, label=name)
  ax.set(xlabel="step", **axes)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plot_evaluations(eval_history: Sequence[Mapping[str, float]]):
  """Every accuracy of the periodic evaluations over steps."""
  fig, ax = plt.subplots(figsize=(7, 4))
  names = sorted({k for h in eval_history for k in h if k != "step"})
  for name in names:
    steps, values = series(eval_history, name)
    ax.plot(steps, values, marker="o", label=name)
  ax.set(xlabel="step", ylabel="top-1", ylim=(0, 1.02),
         title="periodic evaluation (test subset; the end-of-run numbers use the whole split)")
  if names:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def figure_png(fig, dpi: int = 100) -> bytes:
  """A figure as PNG bytes (Agg); the figure is closed."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=dpi)
  plt.close(fig)
  return buffer.getvalue()


def write_file(path: str, data: bytes) -> None:
  """Writes bytes to a local path (atomically) or a URL such as ``gs://`` (via tf.io.gfile)."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    f.write(data)
  os.replace(path + ".tmp", path)


def read_history(path: str) -> Dict[str, List[Dict[str, float]]]:
  """The ``{'train': [...], 'eval': [...]}`` history written by :func:`write_history`, or
  empty lists when the file does not exist."""
  if "://" in path:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(path):
      return {"train": [], "eval": []}
    with tf.io.gfile.GFile(path, "r") as f:
      data = json.load(f)
  elif not os.path.exists(path):
    return {"train": [], "eval": []}
  else:
    with open(path) as f:
      data = json.load(f)
  return {"train": list(data.get("train", [])), "eval": list(data.get("eval", []))}


def write_history(path: str, history: Mapping[str, Sequence[Mapping[str, float]]]) -> None:
  """Writes ``{'train': [...], 'eval': [...]}`` (lists of ``{'step': int, name: float}``) as JSON."""
  clean = {part: [{k: (int(v) if k == "step" else float(v)) for k, v in h.items()}
                  for h in history.get(part, [])] for part in ("train", "eval")}
  write_file(path, json.dumps(clean, indent=0).encode())


def write_training_plots(directory: str, history: Sequence[Mapping[str, float]],
                         eval_history: Sequence[Mapping[str, float]] = (),
                         confusion: Optional[Any] = None,
                         class_names: Optional[Sequence[str]] = None,
                         confusion_title: str = "confusion matrix") -> List[str]:
  """Writes the end-of-run PNGs into ``directory``.

  Args:
    directory: a local folder or a ``gs://`` URL.
    history: training entries ``{'step': int, metric: float}`` (one per logging window).
    eval_history: periodic-evaluation entries ``{'step': int, accuracy: float}``.
    confusion: int ``[C, C]`` of the last evaluation, or None.
    class_names: names for the confusion matrix's axes.
    confusion_title: what the confusion matrix was computed from (its title).

  Returns:
    The paths written: ``losses.png``, ``pseudo_labels.png``, then ``knn.png`` when
    ``eval_history`` is non-empty and ``confusion_matrix.png`` when ``confusion`` is given.
  """
  figures = [("losses.png", plot_losses(history)),
             ("pseudo_labels.png", plot_pseudo_labels(history))]
  if eval_history:
    figures.append(("knn.png", plot_evaluations(eval_history)))
  if confusion is not None:
    figures.append(("confusion_matrix.png",
                    plot_confusion_matrix(confusion, class_names, confusion_title)))
  paths = []
  for name, fig in figures:
    path = os.path.join(directory, name) if "://" not in directory else f"{directory}/{name}"
    write_file(path, figure_png(fig))
    paths.append(path)
  return paths
