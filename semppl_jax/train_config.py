"""The typed hyper-parameters of the pre-training step (frozen, hashable dataclasses).

:class:`TrainConfig` and its parts are what :mod:`semppl_jax.train` takes; the jaxline glue
(``semppl_jax/jaxline/experiment_config.py``) builds them from a ConfigDict. Re-exported by
:mod:`semppl_jax.train`, so ``train.TrainConfig`` and ``train.LossConfig`` keep working.
"""
import dataclasses
from typing import Mapping, Optional, Tuple

from semppl_jax import augmentations
from semppl_jax import losses



@dataclasses.dataclass(frozen=True)
class Objective:
  """What one objective trains (hashable: a static argument of the jitted step).

  Attributes:
    name: 'semppl', 'relic' or 'supervised'.
    contrastive: run the augmentation contrastive + invariance terms (target network, queues).
    semantic: draw semantic positives from the queues (needs ``contrastive``).
    probe_trains_encoder: the labelled cross-entropy reaches the encoder (the supervised
      baseline); otherwise the probe reads a stop-gradient embedding and only monitors.
  """
  name: str
  contrastive: bool
  semantic: bool
  probe_trains_encoder: bool


OBJECTIVES: Mapping[str, Objective] = {
    "semppl": Objective("semppl", contrastive=True, semantic=True, probe_trains_encoder=False),
    "relic": Objective("relic", contrastive=True, semantic=False, probe_trains_encoder=False),
    "supervised": Objective("supervised", contrastive=False, semantic=False,
                            probe_trains_encoder=True),
}


@dataclasses.dataclass(frozen=True)
class ViewConfig:
  """Multi-crop views (docs/design.md §2 "Views")."""
  num_large: int = 4
  num_small: int = 2
  large_size: int = 224
  small_size: int = 96
  large_scale: Tuple[float, float] = (0.08, 1.0)
  small_scale: Tuple[float, float] = (0.08, 1.0)
  presets: Tuple[augmentations.ViewPreset, ...] = (augmentations.BYOL_VIEW_1,
                                                   augmentations.BYOL_VIEW_2)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  """Encoder and heads; the encoder is ``networks.make_encoder(encoder, ...)``."""
  encoder: str = "resnet50"
  width_multiplier: int = 1
  small_images: bool = False
  compute_dtype: str = "float32"
  remat: str = "none"  # networks.REMAT_POLICIES: recompute activations per block / group.
  projector_hidden_size: int = 4096
  projection_size: int = 256
  predictor_hidden_size: int = 4096


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Pseudo-labels, semantic positives and the loss weights (docs/design.md §2)."""
  knn_k: int = 1
  num_semantic_positives: int = 3
  temperature: float = 0.2
  contrastive_weight: float = 0.3
  # α = 5, 'augmentation' negatives, λ_sem = 0 and the 'target' query below: chosen on
  # Fashion-MNIST validation (BENCHMARKS.md, "Semantic objective"). The first-built form is
  # semantic_weight=0.2, semantic_negatives='semantic', semantic_invariance_weight=None,
  # knn_query='prediction'.
  semantic_weight: float = 5.0
  invariance_weight: float = 5.0
  num_negatives: int = 0  # 0: every other image of the global batch.
  # Ablation switches; the defaults are docs/design.md §2 as written.
  # Drop other rows of the anchor's own (pseudo-)class from the semantic term's negatives.
  mask_same_class_negatives: bool = False
  # > 0: both semantic terms are scaled by min(1, step / semantic_ramp_steps).
  semantic_ramp_steps: int = 0
  # The small views' forward pass uses its own batch statistics but does not update the
  # BatchNorm running averages (which evaluation uses at the large views' resolution).
  bn_stats_from_large_views_only: bool = False
  # The semantic positive's negatives: 'semantic' (other rows' semantic positives) or
  # 'augmentation' (other images' target projections); see losses.semppl_loss.
  semantic_negatives: str = "augmentation"
  # λ_sem, the semantic invariance weight; None = invariance_weight.
  semantic_invariance_weight: Optional[float] = 0.0
  # Research switch: where y*_i of unlabelled rows comes from. 'knn' (SemPPL), 'oracle' (the
  # hidden true label) or 'noisy_oracle' (the true label with probability oracle_accuracy,
  # else a uniformly drawn other class). The oracles read labels SemPPL never has: they
  # measure the objective, not the method.
  pseudo_labels: str = "knn"
  oracle_accuracy: float = 1.0
  # What the kNN labeller queries the queues with: 'prediction' (the online predictions of the
  # large views, as first built) or 'target' (their target projections: the queues' own space,
  # from the slowly moving EMA network, so the semantic term cannot pull the query directly
  # towards the class it was given; see BENCHMARKS.md "Semantic objective").
  knn_query: str = "target"
  # Unlabelled images whose winning kNN label holds less than this share of the L x L votes
  # get no pseudo-label (and no semantic positives) this step; 0 keeps every vote.
  min_vote_agreement: float = 0.0
  # Matmul precision of the loss (losses.PRECISIONS): 'highest' (full float32, the reference
  # numerics) or 'default' (the backend's; the jaxline glue's 'auto' picks it off CPU). With
  # network.compute_dtype='bfloat16' the loss matmuls take bf16 operands either way.
  precision: str = "highest"
  # Each device's kNN top-k over its queue shard by lax.approx_max_k (on TPU: fused with the
  # scoring matmul, approximate); False: the exact lax.top_k.
  knn_approximate: bool = False
  # Objectives whose kNN only feeds monitors (relic): 1 = the step runs it every step; m > 1 =
  # the step skips it (its cost then does not grow with the queue) and the caller runs
  # knn_monitor every m steps instead.
  knn_monitor_every: int = 1

  def __post_init__(self):
    if self.semantic_negatives not in losses.SEMANTIC_NEGATIVES:
      raise ValueError(f"semantic_negatives: got {self.semantic_negatives!r}, allowed: "
                       f"{', '.join(losses.SEMANTIC_NEGATIVES)}.")
    if self.pseudo_labels not in PSEUDO_LABEL_SOURCES:
      raise ValueError(f"pseudo_labels: got {self.pseudo_labels!r}, allowed: "
                       f"{', '.join(PSEUDO_LABEL_SOURCES)}.")
    if not 0.0 <= self.oracle_accuracy <= 1.0:
      raise ValueError(f"oracle_accuracy: got {self.oracle_accuracy}, expected a value in [0, 1].")
    if self.knn_query not in KNN_QUERIES:
      raise ValueError(f"knn_query: got {self.knn_query!r}, allowed: {', '.join(KNN_QUERIES)}.")
    if not 0.0 <= self.min_vote_agreement <= 1.0:
      raise ValueError(f"min_vote_agreement: got {self.min_vote_agreement}, expected a value in "
                       "[0, 1].")
    if self.precision not in losses.PRECISIONS:
      raise ValueError(f"precision: got {self.precision!r}, allowed: "
                       f"{', '.join(losses.PRECISIONS)}.")
    if not isinstance(self.knn_monitor_every, int) or self.knn_monitor_every < 1:
      raise ValueError(f"knn_monitor_every: got {self.knn_monitor_every!r}, expected an int >= 1.")


PSEUDO_LABEL_SOURCES = ("knn", "oracle", "noisy_oracle")
KNN_QUERIES = ("prediction", "target")
QUEUE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """LARS for the online network, Adam for the probe, the target EMA schedule."""
  base_learning_rate: float = 0.3
  weight_decay: float = 1e-6
  momentum: float = 0.9
  trust_coefficient: float = 1e-3
  warmup_steps: int = 0
  probe_learning_rate: float = 1e-3
  target_base_decay: float = 0.99


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every hyper-parameter of :func:`train_step` (frozen and hashable).

  Attributes:
    objective: 'semppl', 'relic' or 'supervised' (see :data:`OBJECTIVES`).
    num_classes: C.
    labelled_batch_size: B_l, global labelled images per step.
    unlabelled_batch_size: B_u, global unlabelled images per step.
    queue_size: Q, entries per labelled-embedding queue (one queue per large view).
    training_steps: K, the length of the learning-rate and target-decay schedules.
    num_shards: n, the data-parallel blocks the batch and the queues are laid out in (the
      mesh's 'data' size). It fixes the row order (each block's labelled rows, then its
      unlabelled rows), so a run on n devices and a run on one device with ``num_shards=n``
      compute the same thing.
    queue_dtype: 'float32' or 'bfloat16', the queues' embedding dtype (bfloat16 halves their
      memory and the kNN's reads; the kNN then scores in bf16 with float32 accumulation).
  """
  objective: str
  num_classes: int
  labelled_batch_size: int
  unlabelled_batch_size: int
  queue_size: int
  training_steps: int
  num_shards: int = 1
  queue_dtype: str = "float32"
  views: ViewConfig = ViewConfig()
  network: NetworkConfig = NetworkConfig()
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective: got {self.objective!r}, allowed: {', '.join(OBJECTIVES)}.")
    for name in ("labelled_batch_size", "unlabelled_batch_size", "queue_size"):
      if getattr(self, name) % self.num_shards:
        raise ValueError(f"{name}: {getattr(self, name)} is not divisible by num_shards="
                         f"{self.num_shards}.")
    if self.queue_dtype not in QUEUE_DTYPES:
      raise ValueError(f"queue_dtype: got {self.queue_dtype!r}, allowed: "
                       f"{', '.join(QUEUE_DTYPES)}.")

  @property
  def batch_size(self) -> int:
    return self.labelled_batch_size + self.unlabelled_batch_size
