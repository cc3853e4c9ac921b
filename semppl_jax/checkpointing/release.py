"""The released SemPPL checkpoint format: safe reader and verifier against our networks.

The official release ships dill pickles (protocol 2) of a dict
``{'experiment_state': {'online_params': ..., 'online_state': ..., ...}, 'step': ..., 'rng': ...}``
(docs/design.md §5). :func:`load_released_checkpoint` reads them through the allow-list
unpickler of :mod:`semppl_jax.checkpointing.unpickler` (nothing named by the file is imported or
run). All leaves come back as ``numpy.ndarray``.

Replica axis. The release's own evaluation takes element ``[0]`` of every leaf, so the leaves
may carry a leading replica axis. It is stripped only when the shapes say so, judged on *anchor*
leaves whose rank is known from their name alone: every BatchNorm EMA ``counter`` in the state
(rank 0), every ``w`` of a convolution (module name containing ``conv``; rank 4) and every ``w`` /
``b`` of a ``linear*`` module (ranks 2 / 1). If every anchor has exactly one extra dimension and
every leaf of ``online_params`` and ``online_state`` shares the same leading size ``r``, the axis
is stripped by taking replica 0 (what the release does). If every anchor has its plain rank,
or there are no anchors, nothing is stripped. Mixed evidence (some anchors with, some without
the extra dimension, or extra dimensions of different sizes) raises :class:`CheckpointError`.

Encoder / heads. Haiku module names are ``scope/~/sub/...``. The encoder is the top-level scope
that looks like one (``res_net50``, ``sk_res_net50``, ``tiny_res_net``, ``*encoder*``,
``*backbone*``), or else the only scope that is not a known head (``projector``, ``predictor``,
``classifier``, ``linear``, ``head``, ``logits``, ``mlp``, ``probe``); pass ``encoder_prefix`` to
choose it explicitly. Everything outside the encoder scope is returned as heads by
:func:`load_released_checkpoint_full`.

Writing files in this format is :mod:`semppl_jax.checkpointing.export`'s job.
"""
import math
import os
import re
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import numpy as np

from semppl_jax.checkpointing.errors import CheckpointError, clip, describe, describe_all
from semppl_jax.checkpointing.unpickler import unpickle_file

# Modules of a Haiku parameter tree: {module_name: {param_name: array}}.
ModuleTree = dict[str, dict[str, np.ndarray]]


# ----------------------------------------------------------------------------------------------
# Release tree handling.
# ----------------------------------------------------------------------------------------------


def _as_mapping(obj: Any) -> Mapping | None:
  """A Mapping, or a namedtuple as its ``_asdict()``; None for anything else."""
  if isinstance(obj, Mapping):
    return obj
  if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
    return obj._asdict()
  return None


def _describe(obj: Any) -> str:
  mapping = _as_mapping(obj)
  if mapping is not None:
    return f"{clip(type(obj).__name__)} with keys {describe_all(mapping)}"
  return clip(type(obj).__name__)


def _to_array(value: Any, where: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    array = value
  elif isinstance(value, (np.generic, int, float)) and not isinstance(value, bool):
    array = np.asarray(value)
  else:
    raise CheckpointError(f"{where}: expected a numeric array, found {clip(type(value).__name__)}")
  if array.dtype.hasobject or array.dtype.kind not in "biuf":
    raise CheckpointError(f"{where}: expected a numeric array, found dtype {array.dtype}")
  return array


def _module_tree(obj: Any, what: str) -> ModuleTree:
  """Validates a Haiku params/state tree ``{module: {name: array}}`` -> plain nested dicts."""
  modules = _as_mapping(obj)
  if modules is None:
    raise CheckpointError(
        f"{what}: expected a mapping {{module_name: {{param_name: array}}}}, found "
        f"{describe(obj)}")
  tree: ModuleTree = {}
  for module, leaves in modules.items():
    leaves_map = _as_mapping(leaves)
    if not isinstance(module, str) or leaves_map is None:
      raise CheckpointError(
          f"{what}: expected {{module_name (str): {{param_name: array}}}}, found entry "
          f"{describe(module)}: {describe(leaves)}")
    tree[module] = {}
    for name, value in leaves_map.items():
      if not isinstance(name, str):
        raise CheckpointError(f"{what}[{describe(module)}]: parameter names must be str, found "
                              f"{describe(name)}")
      tree[module][name] = _to_array(value, f"{what}[{describe(module)}][{describe(name)}]")
  return tree


def _leaves(tree: ModuleTree) -> Iterable[tuple[str, str, np.ndarray]]:
  for module, leaves in tree.items():
    for name, value in leaves.items():
      yield module, name, value


def _anchor_rank(module: str, name: str, is_state: bool) -> int | None:
  """The rank a leaf must have without a replica axis, when its name alone tells."""
  last = module.rsplit("/", 1)[-1]
  if is_state:
    return 0 if name == "counter" else None
  if name == "w" and "conv" in last:
    return 4
  if last.startswith("linear") or last == "logits":
    return {"w": 2, "b": 1}.get(name)
  return None


def _has_replica_axis(params: ModuleTree, state: ModuleTree) -> bool:
  """Applies the replica-axis rule of the module docstring."""
  anchors = []
  for tree, is_state in ((params, False), (state, True)):
    for module, name, value in _leaves(tree):
      rank = _anchor_rank(module, name, is_state)
      if rank is not None:
        anchors.append((clip(f"{module}/{name}", 200), value.shape, rank))
  if not anchors:
    return False
  plain = [a for a in anchors if len(a[1]) == a[2]]
  extra = [a for a in anchors if len(a[1]) == a[2] + 1]
  if len(plain) == len(anchors):
    return False
  if len(extra) == len(anchors):
    leading = {v.shape[0] if v.ndim else None
               for tree in (params, state) for _, _, v in _leaves(tree)}
    if len(leading) == 1 and None not in leading:
      return True
    raise CheckpointError(
        "online_params/online_state: the anchor leaves carry one extra leading dimension (a "
        "replica axis) but the leaves do not share one leading size: found leading sizes "
        f"{sorted(leading, key=str)}")
  shown = ", ".join(f"{p} shape {s} (expected rank {r} or {r + 1})"
                    for p, s, r in anchors if len(s) not in (r, r + 1))
  if not shown:
    shown = (f"{len(plain)} anchors without and {len(extra)} with an extra leading axis, e.g. "
             f"{plain[0][0]} {plain[0][1]} vs {extra[0][0]} {extra[0][1]}")
  raise CheckpointError(f"online_params/online_state: cannot tell whether leaves carry a "
                        f"replica axis: {shown}")


def _strip_replica(tree: ModuleTree) -> ModuleTree:
  # Copy so the (replicas x size) buffer is not kept alive by a view of replica 0.
  return {m: {n: np.array(v[0]) for n, v in leaves.items()} for m, leaves in tree.items()}


_ENCODER_SCOPE = re.compile(r"res_?net|encoder|backbone", re.IGNORECASE)
_HEAD_SCOPE = re.compile(r"project|predict|classif|linear|head|logits|mlp|probe", re.IGNORECASE)


def _scope(module: str) -> str:
  return module.split("/", 1)[0]


def _pick_encoder_scope(scopes: Iterable[str]) -> str:
  scopes = sorted(set(scopes))
  named = [s for s in scopes if _ENCODER_SCOPE.search(s)]
  if len(named) == 1:
    return named[0]
  if not named:
    others = [s for s in scopes if not _HEAD_SCOPE.search(s)]
    if len(others) == 1:
      return others[0]
  raise CheckpointError(
      "cannot tell which top-level module is the encoder: found top-level scopes "
      f"{describe_all(scopes)}; "
      "expected exactly one encoder scope (e.g. 'res_net50'); pass encoder_prefix=...")


def _split(tree: ModuleTree, prefix: str) -> tuple[ModuleTree, ModuleTree]:
  inside = {m: v for m, v in tree.items() if _scope(m) == prefix}
  outside = {m: v for m, v in tree.items() if _scope(m) != prefix}
  return inside, outside


def _guess_architecture(prefix: str, params: ModuleTree) -> tuple[str | None, int | None]:
  """(``make_encoder`` name, width multiplier) from the encoder scope and stem width."""
  m = re.fullmatch(r"(sk_)?res_net(\d+)", prefix)
  if prefix == "tiny_res_net":
    name, base = "tiny_resnet", 16
  elif m:
    name, base = f"{m.group(1) or ''}resnet{m.group(2)}", 64
  else:
    return None, None
  for stem in ("initial_conv", "initial_conv_2"):
    w = params.get(f"{prefix}/~/{stem}", {}).get("w")
    if w is not None and w.ndim == 4 and w.shape[-1] % base == 0:
      return name, w.shape[-1] // base
  return name, None


def _as_int(value: Any) -> int | None:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return int(value)
  if isinstance(value, np.ndarray) and value.size >= 1 and value.dtype.kind in "iu":
    return int(value.reshape(-1)[0])
  return None


class ReleasedCheckpoint(NamedTuple):
  """Everything :func:`load_released_checkpoint_full` reads from a release pickle.

  Attributes:
    params: encoder Haiku params ``{module: {name: np.ndarray}}`` (float32 in the release).
    state: encoder Haiku state (BatchNorm ``mean_ema`` / ``var_ema``: ``counter`` int32 ``[]``,
      ``hidden`` / ``average`` float32 ``(1, 1, 1, C)``).
    head_params: every other module of ``online_params`` (projector, predictor, classifier ...).
    head_state: every other module of ``online_state``.
    step: the saved training step, or None when the file has none / a non-integer one.
    rng: the saved ``rng`` as a numpy array (as saved, replica axis included), or None.
    architecture: ``make_encoder`` name guessed from the encoder scope (``'resnet50'`` ...), or
      None when the scope is not a known one.
    width_multiplier: guessed from the stem's output channels, or None.
    encoder_prefix: the top-level module scope taken as the encoder (``'res_net50'``).
    replica_axis_stripped: whether a leading replica axis was removed (see module docstring).
  """
  params: ModuleTree
  state: ModuleTree
  head_params: ModuleTree
  head_state: ModuleTree
  step: int | None
  rng: np.ndarray | None
  architecture: str | None
  width_multiplier: int | None
  encoder_prefix: str
  replica_axis_stripped: bool


# BatchNorm EMA step counters are the only non-float leaves of a release (int32 there).
_COUNTER_NAMES = ("counter",)
_MAX_LISTED = 20


def _check_values(tree: ModuleTree, what: str, path: str) -> None:
  """Refuses leaves of another dtype than the release's (float32; integer ``counter`` state)
  and non-finite values, naming every such leaf (the first :data:`_MAX_LISTED`)."""
  problems = []
  for module, leaves in tree.items():
    for name, array in leaves.items():
      where = f"{what}[{describe(module)}][{describe(name)}]"
      if name in _COUNTER_NAMES and array.dtype.kind in "iu":
        continue
      expected = "an integer dtype or float32" if name in _COUNTER_NAMES else "float32"
      if array.dtype != np.float32:
        problems.append(f"{where}: dtype {array.dtype}, expected {expected} (the release's)")
        continue
      bad = array.size - int(np.count_nonzero(np.isfinite(array)))
      if bad:
        problems.append(f"{where}: {bad:,} of {array.size:,} values are not finite (NaN or inf)")
  if problems:
    shown = problems[:_MAX_LISTED] + ([f"... and {len(problems) - _MAX_LISTED} more"]
                                      if len(problems) > _MAX_LISTED else [])
    raise CheckpointError(
        f"checkpoint {path!r}: {len(problems)} leaf/leaves unusable as weights (cast to "
        "float32 and check the export):\n  " + "\n  ".join(shown))


def _read_release(path: Any) -> tuple[ModuleTree, ModuleTree, Any, Any]:
  path = os.fspath(path)
  raw = unpickle_file(path)
  if not isinstance(raw, Mapping):
    raise CheckpointError(
        f"checkpoint {path!r}: top level is {_describe(raw)}, expected a dict with keys "
        "'experiment_state', 'step', 'rng'")
  if "experiment_state" not in raw:
    raise CheckpointError(
        f"checkpoint {path!r}: top-level dict has keys {describe_all(raw)}, expected "
        "'experiment_state' (with 'step', 'rng')")
  experiment_state = _as_mapping(raw["experiment_state"])
  if experiment_state is None:
    raise CheckpointError(
        f"checkpoint {path!r}: experiment_state is {_describe(raw['experiment_state'])}, "
        "expected a mapping with 'online_params' and 'online_state'")
  missing = [k for k in ("online_params", "online_state") if k not in experiment_state]
  if missing:
    raise CheckpointError(
        f"checkpoint {path!r}: experiment_state has keys {describe_all(experiment_state)}, "
        f"missing {missing} (expected 'online_params' and 'online_state')")
  params = _module_tree(experiment_state["online_params"], "experiment_state['online_params']")
  state = _module_tree(experiment_state["online_state"], "experiment_state['online_state']")
  _check_values(params, "experiment_state['online_params']", path)
  _check_values(state, "experiment_state['online_state']", path)
  rng = raw.get("rng")
  if rng is not None:
    rng = np.asarray(rng) if isinstance(rng, (np.ndarray, np.generic)) else None
  return params, state, raw.get("step"), rng


def load_released_checkpoint_full(path: Any, *, encoder_prefix: str | None = None
                                  ) -> ReleasedCheckpoint:
  """Reads a release ``.pkl`` safely: encoder and head params/state, step, rng, architecture.

  Args:
    path: file path (str or PathLike) of a release checkpoint (a dill/pickle protocol-2 dict
      ``{'experiment_state': {'online_params', 'online_state', ...}, 'step', 'rng'}``).
    encoder_prefix: top-level module scope of the encoder (e.g. ``'res_net50'``); None picks it
      as described in the module docstring.

  Returns:
    A :class:`ReleasedCheckpoint`; all leaves are ``numpy.ndarray`` with the replica axis
    removed when the shapes show one.

  Raises:
    CheckpointError: the file does not exist, is empty / truncated / not a pickle, names a
      global outside :data:`ALLOWED_GLOBALS`, lacks ``experiment_state`` / ``online_params`` /
      ``online_state``, holds non-numeric leaves, leaves of another dtype than the release's
      (float32; BatchNorm ``counter`` integer) or non-finite values (each named), has ambiguous
      replica axes, or the encoder scope cannot be determined (or ``encoder_prefix`` is not in
      the file).
  """
  params, state, step, rng = _read_release(path)
  stripped = _has_replica_axis(params, state)
  if stripped:
    params, state = _strip_replica(params), _strip_replica(state)
  scopes = {_scope(m) for m in (*params, *state)}
  if encoder_prefix is None:
    encoder_prefix = _pick_encoder_scope(scopes)
  elif encoder_prefix not in scopes:
    raise CheckpointError(f"encoder_prefix {encoder_prefix!r} is not a top-level scope of the "
                          f"checkpoint; found {describe_all(sorted(scopes))}")
  enc_params, head_params = _split(params, encoder_prefix)
  enc_state, head_state = _split(state, encoder_prefix)
  if not enc_params:
    raise CheckpointError(f"checkpoint has no parameters under encoder scope {encoder_prefix!r}")
  architecture, width = _guess_architecture(encoder_prefix, enc_params)
  return ReleasedCheckpoint(
      params=enc_params, state=enc_state, head_params=head_params, head_state=head_state,
      step=_as_int(step), rng=rng, architecture=architecture, width_multiplier=width,
      encoder_prefix=encoder_prefix, replica_axis_stripped=stripped)


def load_released_checkpoint(path: Any, *, encoder_prefix: str | None = None
                             ) -> tuple[ModuleTree, ModuleTree]:
  """The encoder's Haiku ``(params, state)`` from a release ``.pkl``, ready for ``apply``.

  Read through the allow-list unpickler (nothing named by the file is imported or run); the
  leading replica axis is stripped only when the shapes show one; head modules (projector,
  predictor, classifier ...) are dropped: see :func:`load_released_checkpoint_full` for them.

  Args:
    path: file path (str or PathLike) of the release checkpoint.
    encoder_prefix: encoder scope override (see :func:`load_released_checkpoint_full`).

  Returns:
    ``(params, state)``: plain nested dicts ``{module_name: {name: np.ndarray}}``; e.g. for
    ResNet-50 1x, 159 param arrays (float32; conv ``w`` ``[kh, kw, C_in, C_out]``, BatchNorm
    ``scale`` / ``offset`` ``(1, 1, 1, C)``) and the BatchNorm EMA state (``counter`` int32
    ``[]``, ``hidden`` / ``average`` float32 ``(1, 1, 1, C)``).

  Raises:
    CheckpointError: (a ``ValueError``) on a missing, malformed or unsafe file; see
      :func:`load_released_checkpoint_full`.
  """
  ckpt = load_released_checkpoint_full(path, encoder_prefix=encoder_prefix)
  return ckpt.params, ckpt.state


# ----------------------------------------------------------------------------------------------
# Verification against our networks.
# ----------------------------------------------------------------------------------------------


def _shape_of(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", leaf)
  if not isinstance(shape, (tuple, list)):
    raise ValueError(f"expected an array, a ShapeDtypeStruct or a shape tuple, got {leaf!r}")
  return tuple(int(s) for s in shape)


def _flat_shapes(tree: Mapping[str, Mapping[str, Any]], what: str
                 ) -> dict[str, tuple[int, ...]]:
  if not isinstance(tree, Mapping):
    raise ValueError(f"{what} must be a mapping {{module: {{name: array}}}}, got "
                     f"{type(tree).__name__}")
  flat = {}
  for module, leaves in tree.items():
    if not isinstance(leaves, Mapping):
      raise ValueError(f"{what}[{module!r}] must be a mapping {{name: array}}, got "
                       f"{type(leaves).__name__}")
    for name, leaf in leaves.items():
      flat[clip(f"{module}/{name}", 200)] = _shape_of(leaf)
  return flat


def _tree_differences(got: Mapping, expected: Mapping, what: str) -> list[str]:
  got_f, exp_f = _flat_shapes(got, what), _flat_shapes(expected, f"expected_{what}")
  out = []
  for key in sorted(set(got_f) | set(exp_f)):
    if key not in got_f:
      out.append(f"{what}: missing {key} (expected shape {exp_f[key]})")
    elif key not in exp_f:
      out.append(f"{what}: unexpected {key} with shape {got_f[key]}")
    elif got_f[key] != exp_f[key]:
      out.append(f"{what}: {key} has shape {got_f[key]}, expected {exp_f[key]}")
  return out


def verify_checkpoint_tree(params: Mapping, state: Mapping, expected_params: Mapping,
                           expected_state: Mapping) -> list[str]:
  """Every difference between two Haiku ``(params, state)`` trees, by name and shape.

  Args:
    params, state: trees ``{module: {name: leaf}}`` to check (leaves: arrays,
      ``jax.ShapeDtypeStruct`` or shape tuples).
    expected_params, expected_state: the reference trees (e.g. from :func:`expected_tree`).

  Returns:
    A sorted list of messages, one per missing name, unexpected name and shape mismatch,
    prefixed ``params:`` / ``state:`` and naming ``module/name``; empty when the trees match.

  Raises:
    ValueError: an argument is not a two-level mapping.
  """
  return (_tree_differences(params, expected_params, "params")
          + _tree_differences(state, expected_state, "state"))


def expected_tree(architecture: str, width_multiplier: int = 1, *, small_images: bool = False,
                  image_size: int = 64) -> tuple[dict, dict]:
  """Parameter and state shapes of ``networks.make_encoder(architecture, ...)``.

  Traced with ``jax.eval_shape`` (no FLOPs, no parameter memory) under
  ``hk.transform_with_state`` on a ``[1, image_size, image_size, 3]`` float32 input; the
  encoder shapes do not depend on the image size (global pooling).

  Args:
    architecture: a ``networks.ENCODER_NAMES`` entry (``'resnet50'``, ``'sk_resnet50'`` ...).
    width_multiplier: positive int.
    small_images: the 28-32 px stem variant.
    image_size: side of the dummy input.

  Returns:
    ``(params, state)`` as plain dicts ``{module: {name: jax.ShapeDtypeStruct}}``.

  Raises:
    ValueError: unknown architecture or bad arguments (from ``networks``).
  """
  import haiku as hk  # pylint: disable=g-import-not-at-top
  from semppl_jax import networks  # pylint: disable=g-import-not-at-top

  def forward(images):
    encoder = networks.make_encoder(architecture, width_multiplier=width_multiplier,
                                    small_images=small_images)
    return encoder(images, is_training=True)

  transformed = hk.transform_with_state(forward)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
  params, state = jax.eval_shape(transformed.init, jax.random.PRNGKey(0), images)
  as_dict = lambda tree: {m: dict(leaves) for m, leaves in tree.items()}
  return as_dict(params), as_dict(state)


def _count(tree: Mapping) -> tuple[int, int]:
  shapes = _flat_shapes(tree, "tree")
  return len(shapes), sum(math.prod(s) for s in shapes.values())


class CheckpointReport(NamedTuple):
  """Result of :func:`verify_released_checkpoint`.

  Attributes:
    path: the checked file.
    architecture, width_multiplier: what the file was checked against.
    differences: one message per missing / unexpected name and shape mismatch (see
      :func:`verify_checkpoint_tree`); empty when the encoder matches.
    num_param_arrays, num_params: encoder parameter arrays / scalars in the file.
    expected_num_param_arrays, expected_num_params: the same for our network.
    num_state_arrays, expected_num_state_arrays: BatchNorm state arrays, file / network.
    encoder_prefix: the scope compared as the encoder ('' when the whole file was compared).
    head_modules: modules of the file outside the encoder scope (not compared).
    step: the saved step, or None.
  """
  path: str
  architecture: str
  width_multiplier: int
  differences: tuple[str, ...]
  num_param_arrays: int
  num_params: int
  expected_num_param_arrays: int
  expected_num_params: int
  num_state_arrays: int
  expected_num_state_arrays: int
  encoder_prefix: str
  head_modules: tuple[str, ...]
  step: int | None

  @property
  def ok(self) -> bool:
    """True when names and shapes match exactly."""
    return not self.differences

  def summary(self) -> str:
    """A readable multi-line report."""
    lines = [
        f"{self.path}: {self.architecture} x{self.width_multiplier} "
        f"(encoder scope {self.encoder_prefix or '<whole file>'!r}, step {self.step})",
        f"  params: {self.num_param_arrays} arrays, {self.num_params:,} parameters "
        f"(expected {self.expected_num_param_arrays} arrays, {self.expected_num_params:,})",
        f"  state: {self.num_state_arrays} arrays (expected {self.expected_num_state_arrays})",
        f"  head modules not compared: {len(self.head_modules)}",
    ]
    if self.ok:
      lines.append("  names and shapes match")
    else:
      lines.append(f"  {len(self.differences)} differences:")
      lines.extend(f"    {d}" for d in self.differences)
    return "\n".join(lines)


def verify_released_checkpoint(path: Any, architecture: str, width_multiplier: int = 1, *,
                               small_images: bool = False, raise_on_mismatch: bool = True
                               ) -> CheckpointReport:
  """Checks a release ``.pkl`` against ``networks.make_encoder(architecture, ...)``.

  Compares every name and shape of the file's encoder (params and state) with our network's,
  so for checkpoints whose naming is unknown (the SK ones) it says precisely which names or
  shapes differ instead of guessing a mapping. The encoder scope of the file is our network's
  top-level scope when the file has it, else the automatic choice; when neither works the whole
  file is compared (so every name of it is listed).

  Args:
    path: the release checkpoint.
    architecture: a ``networks.ENCODER_NAMES`` entry.
    width_multiplier: positive int.
    small_images: compare against the small-image stem.
    raise_on_mismatch: raise instead of returning a report with differences.

  Returns:
    A :class:`CheckpointReport` (parameter counts included).

  Raises:
    CheckpointError: unreadable / unsafe file, leaves of another dtype than float32 (integer
      BatchNorm ``counter``) or non-finite values (each named; also without
      ``raise_on_mismatch``), or (with ``raise_on_mismatch``) any name / shape difference; the
      message is the report's summary.
  """
  exp_params, exp_state = expected_tree(architecture, width_multiplier,
                                        small_images=small_images)
  params, state, step, _ = _read_release(path)
  if _has_replica_axis(params, state):
    params, state = _strip_replica(params), _strip_replica(state)
  scopes = {_scope(m) for m in (*params, *state)}
  expected_scopes = {_scope(m) for m in exp_params}
  prefix = next(iter(expected_scopes & scopes), None)
  if prefix is None:
    try:
      prefix = _pick_encoder_scope(scopes)
    except CheckpointError:
      prefix = ""
  if prefix:
    (params, head_params), (state, head_state) = _split(params, prefix), _split(state, prefix)
  else:
    head_params, head_state = {}, {}
  differences = verify_checkpoint_tree(params, state, exp_params, exp_state)
  (n_arr, n_par), (e_arr, e_par) = _count(params), _count(exp_params)
  report = CheckpointReport(
      path=os.fspath(path), architecture=architecture, width_multiplier=width_multiplier,
      differences=tuple(differences), num_param_arrays=n_arr, num_params=n_par,
      expected_num_param_arrays=e_arr, expected_num_params=e_par,
      num_state_arrays=_count(state)[0], expected_num_state_arrays=_count(exp_state)[0],
      encoder_prefix=prefix, head_modules=tuple(sorted({*head_params, *head_state})),
      step=_as_int(step))
  if differences and raise_on_mismatch:
    raise CheckpointError(report.summary())
  return report
