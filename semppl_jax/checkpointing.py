"""Checkpoints: the released SemPPL pickles (safe reader, verifier, writer) and Orbax on disk.

Released checkpoints
--------------------
The official release ships dill pickles (protocol 2) of a dict
``{'experiment_state': {'online_params': ..., 'online_state': ..., ...}, 'step': ..., 'rng': ...}``
(DESIGN.md §5). A plain ``pickle.load`` runs whatever the file names, so
:func:`load_released_checkpoint` reads them through an allow-list unpickler: every global the file
names is looked up in :data:`ALLOWED_GLOBALS`, a fixed table of ``(module, name)`` pairs mapped to
small local reconstructors; no module named by the file is ever imported, and any other global
(``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) stops the load with a
:class:`CheckpointError` before anything runs. All leaves come back as ``numpy.ndarray``.

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

Training checkpoints
--------------------
:func:`save_state` / :func:`restore_latest` / :func:`latest_step` store any pytree of arrays with
Orbax (written to a temporary directory and renamed when complete, keeping the last
``max_to_keep``). :class:`OrbaxCheckpointer` is a disk checkpointer for jaxline 0.0.8
(``platform.main(..., checkpointer_factory=...)``) with the interface of jaxline's
``InMemoryCheckpointer``. Orbax saves are collective: with several processes every process must
call save (jaxline: ``train_checkpoint_all_hosts=True``).
"""
import _compat_pickle
import collections
import keyword
import logging
import math
import os
import pickle
import re
import tempfile
import types
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import numpy as np

# Modules of a Haiku parameter tree: {module_name: {param_name: array}}.
ModuleTree = dict[str, dict[str, np.ndarray]]

_NP_RECONSTRUCT = np._core.multiarray._reconstruct  # pylint: disable=protected-access
_NP_SCALAR = np._core.multiarray.scalar  # pylint: disable=protected-access


class CheckpointError(ValueError):
  """A checkpoint file is missing, malformed, unsafe, or does not match what was expected."""


# ----------------------------------------------------------------------------------------------
# Allow-list unpickler.
# ----------------------------------------------------------------------------------------------


class _Refused(Exception):
  """Raised inside the unpickler when the file names a global that is not allowed."""


class _NdarrayToken:
  """Stands in for ``numpy.ndarray``: only the array reconstructors accept it, nobody can call it.

  Handing out the real class would let a file call ``ndarray(shape=...)`` with any arguments.
  """

  def __repr__(self):
    return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


def _check_dtype(dtype: Any, what: str) -> np.dtype:
  if not isinstance(dtype, np.dtype):
    raise _Refused(f"{what} expects a numpy dtype, got {type(dtype).__name__}")
  if dtype.hasobject:
    raise _Refused(f"{what} with object dtype {dtype} (only numeric arrays are allowed)")
  return dtype


def _np_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
  """``numpy.core.multiarray._reconstruct``: an empty array that a later BUILD fills in."""
  if subtype is not _NDARRAY:
    raise _Refused(f"_reconstruct of {subtype!r} (only numpy.ndarray is allowed)")
  # numpy writes shape (0,) here; the real shape arrives with the BUILD state (checked by numpy
  # against the data length), so a large placeholder can only be an allocation bomb.
  if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape) \
      or math.prod(shape) > 1024:
    raise _Refused(f"_reconstruct with placeholder shape {shape!r}")
  if dtype_code not in (b"b", "b"):
    raise _Refused(f"_reconstruct with dtype code {dtype_code!r}")
  return _NP_RECONSTRUCT(np.ndarray, shape, dtype_code)


# Built-in numeric dtypes only: numpy ignores a later BUILD state on these, whereas the state of
# a flexible ('V') dtype can set its has-object flags and make numpy read raw bytes as pointers.
_DTYPE_SPEC = re.compile(r"b1|[iu][1248]|f[248]")


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
  """``numpy.dtype(spec, align, copy)`` for a built-in numeric spec (``'f4'``, ``'i4'`` ...)."""
  if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec) \
      or not isinstance(align, bool) or not isinstance(copy, bool):
    raise _Refused(f"numpy.dtype{(spec, align, copy)!r} (only bool/int/uint/float dtypes are "
                   "allowed)")
  return np.dtype(spec, align=align, copy=copy)


def _np_scalar(dtype: Any, data: Any = None) -> np.generic:
  """``numpy.core.multiarray.scalar(dtype, raw_bytes)``: a numpy scalar from its raw bytes."""
  _check_dtype(dtype, "numpy scalar")
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise _Refused(f"numpy scalar of {dtype} from {type(data).__name__}")
  return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  """``numpy.core.numeric._frombuffer`` (numpy's protocol-5 layout, in-band buffers only)."""
  _check_dtype(dtype, "_frombuffer")
  if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F") \
      or not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
    raise _Refused("_frombuffer with unexpected arguments")
  return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
  """``_codecs.encode``: protocol-2 pickles store ``bytes`` as ``encode(str, 'latin1')``."""
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
    raise _Refused(f"_codecs.encode with encoding {encoding!r}")
  return obj.encode("latin1")


def _array_from_reduce(fun: Any, args: Any, state: Any) -> np.ndarray:
  """Rebuilds a numpy array from the pieces of ``ndarray.__reduce__()``."""
  if fun is not _np_reconstruct or not isinstance(args, tuple):
    raise _Refused(f"array reconstructor {fun!r} (only numpy's _reconstruct is allowed)")
  array = fun(*args)
  if not isinstance(state, tuple):
    raise _Refused(f"array state of type {type(state).__name__}")
  array.__setstate__(state)
  _check_dtype(array.dtype, "array")
  return array


def _dill_create_array(fun: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
  """``dill._dill._create_array(f, args, state, npdict)`` for plain ndarrays."""
  if npdict:
    raise _Refused("dill._create_array with instance attributes (ndarray subclass)")
  return _array_from_reduce(fun, args, state)


def _jax_reconstruct_array(fun: Any, args: Any, arr_state: Any, aval_state: Any = None
                           ) -> np.ndarray:
  """jax 0.3 ``reconstruct_device_array`` / jax>=0.4 ``_reconstruct_array``: host numpy array.

  Both pickle a device array as ``(fun, args, numpy_state, aval_state)`` of its numpy value;
  ``aval_state`` (weak type, named shape) has no meaning for a numpy leaf and is dropped.
  """
  if aval_state is not None and not isinstance(aval_state, dict):
    raise _Refused(f"device-array aval state of type {type(aval_state).__name__}")
  return _array_from_reduce(fun, args, arr_state)


def _plain_dict(data: Any = (), *unused) -> dict:
  """Old Haiku ``FlatMapping`` / ``FlatMap`` / ``frozendict``: pickled as ``cls(mapping)``."""
  if unused:
    raise _Refused("FlatMapping with more than one argument")
  if not isinstance(data, (Mapping, list, tuple)):
    raise _Refused(f"FlatMapping of {type(data).__name__}")
  return dict(data)


_NAMEDTUPLE_CACHE: dict[tuple, type] = {}


def _dill_create_namedtuple(name: Any, fieldnames: Any, modulename: Any, defaults: Any = None
                            ) -> type:
  """``dill._dill._create_namedtuple``: a fresh local namedtuple class with those fields.

  dill pickles every namedtuple class (e.g. an experiment-state NamedTuple or optax states) by
  name and field names. The module it names is not imported: a plain ``collections.namedtuple``
  with the same fields is built instead (names must be identifiers, as namedtuple checks).
  """
  if not isinstance(name, str) or not isinstance(fieldnames, (tuple, list)) \
      or not all(isinstance(f, str) for f in fieldnames) or not isinstance(modulename, str):
    raise _Refused("dill._create_namedtuple with unexpected arguments")
  for ident in (name, *fieldnames):
    if not ident.isidentifier() or keyword.iskeyword(ident) or ident.startswith("_"):
      raise _Refused(f"dill._create_namedtuple with field or type name {ident!r}")
  if defaults is not None and not isinstance(defaults, (tuple, list)):
    raise _Refused("dill._create_namedtuple with non-sequence defaults")
  key = (name, tuple(fieldnames), modulename, None if defaults is None else len(defaults))
  if key not in _NAMEDTUPLE_CACHE:
    cls = collections.namedtuple(name, fieldnames, defaults=defaults)
    cls.__module__ = __name__
    cls._pickled_module = modulename  # pylint: disable=protected-access
    _NAMEDTUPLE_CACHE[key] = cls
  return _NAMEDTUPLE_CACHE[key]


def _setattr_qualname(obj: Any, name: Any, value: Any) -> None:
  """``setattr`` as dill uses it after ``_create_namedtuple``: ``__qualname__`` of that class."""
  if name != "__qualname__" or not isinstance(value, str) \
      or obj not in _NAMEDTUPLE_CACHE.values():
    raise _Refused(f"builtins.setattr({type(obj).__name__}, {name!r}, ...)")
  obj.__qualname__ = value


_DILL_BUILTIN_TYPES: Mapping[str, type] = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
    "complex": complex, "str": str, "int": int, "float": float, "bool": bool,
    "NoneType": type(None),
}


def _dill_load_type(name: Any) -> type:
  """``dill._dill._load_type(name)`` for a few inert builtin types only."""
  if name not in _DILL_BUILTIN_TYPES:
    raise _Refused(f"dill._dill._load_type({name!r})")
  return _DILL_BUILTIN_TYPES[name]


def _allowed_globals() -> dict[tuple[str, str], Any]:
  table: dict[tuple[str, str], Any] = {}
  for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    table[(mod, "_reconstruct")] = _np_reconstruct
    table[(mod, "scalar")] = _np_scalar
  for mod in ("numpy.core.numeric", "numpy._core.numeric"):
    table[(mod, "_frombuffer")] = _np_frombuffer
  table[("numpy", "ndarray")] = _NDARRAY
  table[("numpy", "dtype")] = _np_dtype
  table[("_codecs", "encode")] = _codecs_encode
  table[("dill._dill", "_create_array")] = _dill_create_array
  table[("dill._dill", "_create_namedtuple")] = _dill_create_namedtuple
  table[("dill._dill", "_load_type")] = _dill_load_type
  table[("jax._src.device_array", "reconstruct_device_array")] = _jax_reconstruct_array
  table[("jax._src.array", "_reconstruct_array")] = _jax_reconstruct_array
  for name in ("FlatMapping", "FlatMap", "frozendict"):
    table[("haiku._src.data_structures", name)] = _plain_dict
  table[("collections", "OrderedDict")] = collections.OrderedDict
  # Protocol-2 pickles written by Python 3 name builtins `__builtin__` (Python 2 spelling).
  for mod in ("builtins", "__builtin__"):
    for name, value in (("dict", dict), ("list", list), ("tuple", tuple), ("set", set),
                        ("frozenset", frozenset), ("complex", complex),
                        ("NoneType", type(None)),
                        ("setattr", _setattr_qualname)):
      table[(mod, name)] = value
  return table


ALLOWED_GLOBALS: Mapping[tuple[str, str], Any] = types.MappingProxyType(_allowed_globals())
"""``(module, name)`` pairs a checkpoint pickle may name, mapped to what the loader uses instead."""


def _global_name(module: str, name: str) -> str:
  """``module.name`` as in the file, plus the Python 3 name protocol <= 2 pickles map it to."""
  py3 = _compat_pickle.NAME_MAPPING.get((module, name))
  if py3 is None:
    py3 = (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
  shown = f"{module}.{name}"
  return shown if py3 == (module, name) else f"{shown} (Python 3: {py3[0]}.{py3[1]})"


def _load_build(unpickler: "_AllowListUnpickler") -> None:
  """BUILD opcode (``inst.__setstate__(state)``) restricted to numpy arrays and dtypes.

  The stock BUILD would also set attributes on any object on the stack (our reconstructor
  functions, cached namedtuple classes ...), changing them for later loads.
  """
  state = unpickler.stack.pop()
  inst = unpickler.stack[-1]
  if type(inst) is not np.ndarray and not isinstance(inst, np.dtype):
    raise _Refused(f"BUILD (setting state) on a {type(inst).__name__}")
  inst.__setstate__(state)


class _AllowListUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickler that resolves globals through :data:`ALLOWED_GLOBALS` only.

  The pure-Python unpickler is used because its opcode table can be restricted (BUILD); the
  cost is per opcode, and a checkpoint has a few opcodes per array.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access
  dispatch[pickle.BUILD[0]] = _load_build

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise _Refused(_global_name(module, name)) from None

  def persistent_load(self, pid: Any) -> Any:
    raise _Refused(f"persistent id {pid!r}")


def _unpickle_file(path: str) -> Any:
  """Reads one pickle from ``path`` through the allow-list unpickler."""
  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
    size = os.fstat(f.fileno()).st_size
  except FileNotFoundError:
    raise CheckpointError(f"checkpoint file {path!r} does not exist") from None
  except IsADirectoryError:
    raise CheckpointError(f"checkpoint path {path!r} is a directory, expected a .pkl file"
                          ) from None
  except OSError as e:
    raise CheckpointError(f"cannot read checkpoint {path!r}: {e}") from None
  with f:
    if size == 0:
      raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes), expected a pickle")
    try:
      obj = _AllowListUnpickler(f).load()
    except _Refused as e:
      raise CheckpointError(
          f"refusing to load {path!r}: the pickle uses {e}, which is not on the allow-list of "
          "array/mapping reconstructors (a plain pickle.load would have executed it)") from None
    except EOFError:
      raise CheckpointError(
          f"checkpoint {path!r} is truncated: the pickle stream ends (at {size} bytes) before "
          "its STOP opcode") from None
    except Exception as e:  # pylint: disable=broad-except
      # Garbage bytes raise whatever the opcode decoder trips on (UnpicklingError, ValueError,
      # KeyError on a bad memo index, struct errors ...): all mean "not a checkpoint pickle".
      raise CheckpointError(
          f"checkpoint {path!r} is not a valid pickle ({type(e).__name__}: {e})") from None
    trailing = size - f.tell()
  if trailing:
    raise CheckpointError(f"checkpoint {path!r} has {trailing} trailing bytes after the pickle "
                          "(expected exactly one pickle)")
  return obj


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
    return f"{type(obj).__name__} with keys {sorted(map(str, mapping))}"
  return type(obj).__name__


def _to_array(value: Any, where: str) -> np.ndarray:
  if isinstance(value, np.ndarray):
    array = value
  elif isinstance(value, (np.generic, int, float)) and not isinstance(value, bool):
    array = np.asarray(value)
  else:
    raise CheckpointError(f"{where}: expected a numeric array, found {type(value).__name__}")
  if array.dtype.hasobject or array.dtype.kind not in "biuf":
    raise CheckpointError(f"{where}: expected a numeric array, found dtype {array.dtype}")
  return array


def _module_tree(obj: Any, what: str) -> ModuleTree:
  """Validates a Haiku params/state tree ``{module: {name: array}}`` -> plain nested dicts."""
  modules = _as_mapping(obj)
  if modules is None:
    raise CheckpointError(
        f"{what}: expected a mapping {{module_name: {{param_name: array}}}}, found "
        f"{type(obj).__name__}")
  tree: ModuleTree = {}
  for module, leaves in modules.items():
    leaves_map = _as_mapping(leaves)
    if not isinstance(module, str) or leaves_map is None:
      raise CheckpointError(
          f"{what}: expected {{module_name (str): {{param_name: array}}}}, found entry "
          f"{module!r}: {type(leaves).__name__}")
    tree[module] = {}
    for name, value in leaves_map.items():
      if not isinstance(name, str):
        raise CheckpointError(f"{what}[{module!r}]: parameter names must be str, found {name!r}")
      tree[module][name] = _to_array(value, f"{what}[{module!r}][{name!r}]")
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
        anchors.append((f"{module}/{name}", value.shape, rank))
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
      f"cannot tell which top-level module is the encoder: found top-level scopes {scopes}; "
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


def _read_release(path: Any) -> tuple[ModuleTree, ModuleTree, Any, Any]:
  path = os.fspath(path)
  raw = _unpickle_file(path)
  if not isinstance(raw, Mapping):
    raise CheckpointError(
        f"checkpoint {path!r}: top level is {_describe(raw)}, expected a dict with keys "
        "'experiment_state', 'step', 'rng'")
  if "experiment_state" not in raw:
    raise CheckpointError(
        f"checkpoint {path!r}: top-level dict has keys {sorted(map(str, raw))}, expected "
        "'experiment_state' (with 'step', 'rng')")
  experiment_state = _as_mapping(raw["experiment_state"])
  if experiment_state is None:
    raise CheckpointError(
        f"checkpoint {path!r}: experiment_state is {_describe(raw['experiment_state'])}, "
        "expected a mapping with 'online_params' and 'online_state'")
  missing = [k for k in ("online_params", "online_state") if k not in experiment_state]
  if missing:
    raise CheckpointError(
        f"checkpoint {path!r}: experiment_state has keys {sorted(map(str, experiment_state))}, "
        f"missing {missing} (expected 'online_params' and 'online_state')")
  params = _module_tree(experiment_state["online_params"], "experiment_state['online_params']")
  state = _module_tree(experiment_state["online_state"], "experiment_state['online_state']")
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
      ``online_state``, holds non-numeric leaves, has ambiguous replica axes, or the encoder
      scope cannot be determined (or ``encoder_prefix`` is not in the file).
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
                          f"checkpoint; found {sorted(scopes)}")
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
      flat[f"{module}/{name}"] = _shape_of(leaf)
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
    CheckpointError: unreadable / unsafe file, or (with ``raise_on_mismatch``) any difference;
      the message is the report's summary.
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


# ----------------------------------------------------------------------------------------------
# Export in the release layout.
# ----------------------------------------------------------------------------------------------


class _Numpy1NamesPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-Python pickler writing numpy's reconstructors under their numpy-1 module names.

  numpy 2 pickles name ``numpy._core.multiarray``, which numpy 1.x (the release's environment)
  cannot import; ``numpy.core.multiarray`` loads on numpy 1.x and (as an alias) on numpy 2.
  """

  _RENAMED = {id(_NP_RECONSTRUCT): ("numpy.core.multiarray", "_reconstruct"),
              id(_NP_SCALAR): ("numpy.core.multiarray", "scalar")}

  def save_global(self, obj, name=None):
    target = self._RENAMED.get(id(obj))
    if target is None:
      return super().save_global(obj, name)
    self.write(pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode("ascii"))
    self.memoize(obj)
    return None


def _host_tree(tree: Any, what: str, replica_axis: bool) -> ModuleTree:
  if tree is None:
    return {}
  if not isinstance(tree, Mapping):
    raise ValueError(f"{what} must be a mapping {{module: {{name: array}}}}, got "
                     f"{type(tree).__name__}")
  out: ModuleTree = {}
  for module, leaves in tree.items():
    if not isinstance(module, str) or not isinstance(leaves, Mapping):
      raise ValueError(f"{what} must map module names (str) to {{name: array}}; entry "
                       f"{module!r} is {type(leaves).__name__}")
    out[module] = {}
    for name, leaf in leaves.items():
      array = np.asarray(jax.device_get(leaf))
      if array.dtype.hasobject or array.dtype.kind not in "biuf":
        raise ValueError(f"{what}[{module!r}][{name!r}] must be a numeric array, got dtype "
                         f"{array.dtype}")
      # np.asarray, not np.ascontiguousarray: the latter turns 0-d counters into shape (1,).
      out[module][name] = np.asarray(array[None] if replica_axis else array, order="C")
  return out


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """Writes via a temporary file in the same directory, then ``os.replace`` onto ``path``."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def export_release_checkpoint(path: Any, params: Mapping, state: Mapping, *, step: int,
                              rng: Any = None, head_params: Mapping | None = None,
                              head_state: Mapping | None = None,
                              replica_axis: bool = True) -> None:
  """Writes an encoder (and heads) in the release pickle layout, atomically.

  The file is a protocol-2 pickle of ``{'experiment_state': {'online_params': params |
  head_params, 'online_state': state | head_state}, 'step': int, 'rng': array or None}`` with
  numpy leaves (what dill writes for numpy arrays too), numpy's reconstructors named
  ``numpy.core.multiarray`` so numpy 1.x (the release's evaluation) reads it as well.
  :func:`load_released_checkpoint` reads it back.

  Args:
    path: destination file; written to a temporary file in the same directory, then renamed.
    params, state: encoder Haiku params / state ``{module: {name: array}}``: numpy or fully
      addressable jax arrays of bool / int / uint / float dtype (cast bfloat16 to float32).
    step: training step (int >= 0).
    rng: optional key array stored as given (typed keys as their raw key data).
    head_params, head_state: optional extra modules (projector, predictor ...); their module
      names must not collide with the encoder's.
    replica_axis: give every leaf a leading axis of size 1, as the release's pmap-era files.

  Raises:
    ValueError: bad trees, non-numeric leaves, colliding module names or a bad ``step``.
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an int >= 0, got {step!r}")
  online_params = _host_tree(params, "params", replica_axis)
  online_state = _host_tree(state, "state", replica_axis)
  for what, enc, head in (("params", online_params, head_params),
                          ("state", online_state, head_state)):
    head_tree = _host_tree(head, f"head_{what}", replica_axis)
    clash = sorted(set(enc) & set(head_tree))
    if clash:
      raise ValueError(f"head_{what} module names collide with the encoder's: {clash}")
    enc.update(head_tree)
  if rng is not None:
    if jax.dtypes.issubdtype(getattr(rng, "dtype", None), jax.dtypes.prng_key):
      rng = jax.random.key_data(rng)
    rng = np.asarray(jax.device_get(rng))
  payload = {"experiment_state": {"online_params": online_params,
                                  "online_state": online_state},
             "step": int(step), "rng": rng}
  _atomic_write(os.fspath(path), lambda f: _Numpy1NamesPickler(f, protocol=2).dump(payload))


# ----------------------------------------------------------------------------------------------
# Orbax training checkpoints.
# ----------------------------------------------------------------------------------------------


def _ocp():
  # Imported lazily: Orbax pulls in TensorStore & co., which release-checkpoint users need not.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _dir(directory: Any) -> str:
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


def _check_max_to_keep(max_to_keep: Any) -> int:
  if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
    raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}")
  return max_to_keep


def _savable(tree: Any, what: str) -> Any:
  """Leaves Orbax's StandardSave accepts: jax / numpy arrays, Python int / float."""
  def leaf(path, x):
    if isinstance(x, (jax.Array, np.ndarray)) or (isinstance(x, (int, float))
                                                  and not isinstance(x, bool)):
      return x
    if isinstance(x, (np.generic, bool)):
      return np.asarray(x)
    raise ValueError(f"{what}{jax.tree_util.keystr(path)}: cannot store a "
                     f"{type(x).__name__} in an array checkpoint (arrays and numbers only)")
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _abstract(tree: Any, what: str) -> Any:
  """Restore target: jax arrays -> ShapeDtypeStruct with their sharding; others as they are."""
  def leaf(path, x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, (np.generic, bool)):
      return np.asarray(x)
    if isinstance(x, (np.ndarray, int, float)):
      return x
    raise ValueError(f"{what}{jax.tree_util.keystr(path)}: cannot restore into a "
                     f"{type(x).__name__} (arrays, ShapeDtypeStruct and numbers only)")
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _like_template(restored: Any, template: Any) -> Any:
  """Gives numpy-scalar / bool leaves of the template their type back (saved as 0-d arrays)."""
  def leaf(r, t):
    if isinstance(t, bool):
      return bool(r)
    if isinstance(t, np.generic):
      return np.asarray(r, dtype=t.dtype)[()]
    return r
  return jax.tree_util.tree_map(leaf, restored, template)


def _manager(directory: str, max_to_keep: int | None = None, *, save_async: bool = False,
             read_only: bool = False):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, enable_async_checkpointing=save_async, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(directory, options=options)


def save_state(directory: Any, step: int, state_tree: Any, *, max_to_keep: int) -> str:
  """Saves a pytree of arrays as Orbax checkpoint ``step`` under ``directory``.

  Orbax writes into a temporary directory and renames it when complete, so a crash never
  leaves a half-written checkpoint behind; only the newest ``max_to_keep`` steps are kept.
  Shardings are recorded; restore onto the same or another layout with :func:`restore_latest`.
  Returns after the checkpoint is complete on disk.

  Args:
    directory: checkpoint root (created if missing).
    step: int >= 0, larger than every step already saved there.
    state_tree: pytree whose leaves are jax arrays (any sharding), numpy arrays / scalars or
      Python numbers.
    max_to_keep: number of newest checkpoints kept (>= 1).

  Returns:
    The directory of the new checkpoint.

  Raises:
    ValueError: bad ``step`` / ``max_to_keep``, an unsupported leaf type, or ``step`` already
      saved (or older than the latest).
  """
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f"step must be an int >= 0, got {step!r}")
  step = int(step)
  tree = _savable(state_tree, "state_tree")
  ocp = _ocp()
  directory = _dir(directory)
  with _manager(directory, _check_max_to_keep(max_to_keep)) as manager:
    latest = manager.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"step must be larger than the latest saved step {latest} in "
                       f"{directory!r}, got {step}")
    manager.save(step, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  return os.path.join(directory, str(step))


def latest_step(directory: Any) -> int | None:
  """The newest complete checkpoint step under ``directory``, or None (also if it is absent)."""
  directory = _dir(directory)
  if "://" not in directory and not os.path.isdir(directory):
    return None
  with _manager(directory, read_only=True) as manager:
    return manager.latest_step()


def restore_latest(directory: Any, target_tree: Any) -> tuple[int, Any] | None:
  """Restores the newest checkpoint under ``directory`` into the structure of ``target_tree``.

  Args:
    directory: checkpoint root written by :func:`save_state`.
    target_tree: pytree with the saved structure; its leaves give each restored leaf's
      placement: a ``jax.Array`` or ``jax.ShapeDtypeStruct(sharding=...)`` comes back as a
      ``jax.Array`` with that sharding (a sharded queue comes back sharded), a numpy array /
      scalar comes back as numpy, a Python number as a Python number.

  Returns:
    ``(step, tree)``, or None when there is no checkpoint.

  Raises:
    CheckpointError: the checkpoint does not match ``target_tree`` (structure or shapes).
    ValueError: ``target_tree`` has leaves of an unsupported type.
  """
  step = latest_step(directory)
  if step is None:
    return None
  ocp = _ocp()
  target = _abstract(target_tree, "target_tree")
  with _manager(_dir(directory), read_only=True) as manager:
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint {step} in {directory!r} does not match target_tree: "
                            f"{e}") from e
  return step, _like_template(restored, target_tree)


def newest_checkpoint_dir(path: Any) -> str:
  """The newest complete checkpoint written by :class:`OrbaxCheckpointer`.

  Args:
    path: the checkpointer's root (``<checkpoint_dir>/checkpoints``; its ``latest`` series is
      used), a series directory, or one checkpoint directory.

  Returns:
    the checkpoint directory (``.../<series>/<n>``).

  Raises:
    CheckpointError: ``path`` is not a directory or holds no complete checkpoint.
  """
  root = os.path.abspath(str(path))
  if not os.path.isdir(root):
    raise CheckpointError(f"{path!r} is not a directory; expected a run's "
                          "'<checkpoint_dir>/checkpoints' (e.g. runs/fashion_mnist/checkpoints).")
  if os.path.isdir(os.path.join(root, _MODULE_KEY)):
    return root
  series = os.path.join(root, "latest")
  series = series if os.path.isdir(series) else root
  step = latest_step(series)
  if step is None:
    raise CheckpointError(f"no complete checkpoint under {path!r}; expected a run's "
                          "'<checkpoint_dir>/checkpoints' with a 'latest/<n>' checkpoint.")
  return os.path.join(series, str(step))


def read_experiment_snapshot(path: Any, *, select: Any = None) -> tuple[int | None, Any]:
  """Reads an experiment's snapshot from a checkpoint written by :class:`OrbaxCheckpointer`,
  without building the experiment (host numpy arrays, no template needed).

  Args:
    path: as for :func:`newest_checkpoint_dir`.
    select: optional function from the snapshot's metadata tree (same structure, metadata
      leaves) to the sub-tree to read; only that part is read from disk (partial restore).

  Returns:
    ``(global_step, snapshot)``: the jaxline global step of the checkpoint (None if absent) and
    the experiment module's ``snapshot_state()`` tree (or the selected part) as numpy arrays.

  Raises:
    CheckpointError: no checkpoint, or ``select`` does not fit the snapshot.
  """
  ocp = _ocp()
  step_dir = newest_checkpoint_dir(path)
  item_dir = os.path.join(step_dir, _MODULE_KEY)
  handler = ocp.PyTreeCheckpointer()
  try:
    tree = handler.metadata(item_dir).item_metadata.tree["value"]
    wanted = {"value": select(tree) if select is not None else tree}
  except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
    raise CheckpointError(f"{step_dir!r} does not hold the expected experiment snapshot "
                          f"({type(e).__name__}: {e}).") from e
  item = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), wanted)
  restore_args = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=select is not None))["value"]
  global_step = None
  meta_dir = os.path.join(step_dir, _META_ITEM)
  if os.path.isdir(meta_dir):
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    entry = meta.get("json", {}).get("global_step")
    global_step = None if entry is None else int(_from_json_entry(entry))
  return global_step, jax.tree_util.tree_map(np.asarray, restored)


class ExperimentState:
  """Attribute container jaxline's train/eval loops fill (``global_step``, ``experiment_module``,
  ``train_step_rng``, ``best_eval_metric_value`` ...); one per checkpoint series."""

  def __init__(self):
    object.__setattr__(self, "_values", {})

  def __getattr__(self, name: str) -> Any:
    try:
      return self._values[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name: str, value: Any) -> None:
    self._values[name] = value

  def __delattr__(self, name: str) -> None:
    del self._values[name]

  def __contains__(self, name: str) -> bool:
    return name in self._values

  def __getitem__(self, name: str) -> Any:
    return self._values[name]

  def __setitem__(self, name: str, value: Any) -> None:
    self._values[name] = value

  def items(self):
    """``(name, value)`` pairs, in assignment order."""
    return list(self._values.items())

  def keys(self):
    """Attribute names, in assignment order."""
    return list(self._values)

  def to_dict(self) -> dict:
    """A shallow dict copy."""
    return dict(self._values)


_META_ITEM = "jaxline_meta"
_MODULE_KEY = "experiment_module"
_SERIES_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _json_entry(value: Any) -> dict | None:
  """JSON form of a scalar / string / None experiment-state entry; None if it is not one."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return {"value": value, "numpy_dtype": None}
  if isinstance(value, np.generic) and value.dtype.kind in "biuf":
    return {"value": value.item(), "numpy_dtype": value.dtype.str}
  return None


def _from_json_entry(entry: Mapping) -> Any:
  if entry["numpy_dtype"] is None:
    return entry["value"]
  return np.asarray(entry["value"], dtype=np.dtype(entry["numpy_dtype"]))[()]


class OrbaxCheckpointer:
  """jaxline 0.0.8 checkpointer writing Orbax checkpoints to disk (``InMemoryCheckpointer`` API).

  Each ``save(series)`` writes one Orbax checkpoint ``directory/<series>/<n>`` (``n`` = 0, 1, 2
  ... across restarts) holding, from the series' experiment state: the experiment module's
  ``snapshot_state()`` pytree (item ``experiment_module``), every other array-valued entry
  (``train_step_rng`` ...) as its own item, and the scalar / string / None entries
  (``global_step``, ``best_eval_metric_value`` ...) as JSON. Only the newest ``max_to_keep`` are
  kept. ``restore(series)`` restores the newest one into the current state: the module snapshot
  is restored with the current ``experiment_module.snapshot_state()`` as the template (so each
  array comes back with the template's sharding and dtype) and handed to
  ``restore_from_snapshot``; other array entries use their current value as the template, or
  come back as host numpy arrays when the current value is None. A new checkpointer on the
  same directory (a restarted job) sees the saved checkpoints.

  Args:
    directory: root directory (local path or an Orbax-supported URL).
    max_to_keep: checkpoints kept per series (>= 1).
    save_async: write in a background thread (``save`` returns after the device-to-host copy);
      ``wait_for_checkpointing_to_finish`` waits for it.
  """

  def __init__(self, directory: Any, max_to_keep: int, save_async: bool = False):
    self._directory = _dir(directory)
    self._max_to_keep = _check_max_to_keep(max_to_keep)
    self._save_async = bool(save_async)
    self._states: dict[str, ExperimentState] = {}
    self._managers: dict[str, Any] = {}
    self._next_id: dict[str, int] = {}

  def _series_manager(self, series: str):
    if not isinstance(series, str) or not _SERIES_NAME.fullmatch(series) or series in (".", ".."):
      raise ValueError(f"ckpt_series must be a plain name ([A-Za-z0-9_.-]+), got {series!r}")
    if series not in self._managers:
      manager = _manager(os.path.join(self._directory, series), self._max_to_keep,
                         save_async=self._save_async)
      self._managers[series] = manager
      steps = manager.all_steps()
      self._next_id[series] = max(steps) + 1 if steps else 0
    return self._managers[series]

  def get_experiment_state(self, ckpt_series: str) -> ExperimentState:
    """The mutable experiment state of a series (created empty on first use)."""
    self._series_manager(ckpt_series)
    return self._states.setdefault(ckpt_series, ExperimentState())

  def save(self, ckpt_series: str) -> None:
    """Writes the series' current experiment state as a new checkpoint.

    Raises:
      ValueError: an entry cannot be stored (e.g. a string inside the module snapshot).
    """
    ocp = _ocp()
    manager = self._series_manager(ckpt_series)
    state = self.get_experiment_state(ckpt_series)
    items, meta = {}, {"json": {}, "arrays": []}
    for key, value in state.items():
      if key == _MODULE_KEY:
        value = value.snapshot_state()
      elif (entry := _json_entry(value)) is not None:
        meta["json"][key] = entry
        continue
      items[key] = ocp.args.StandardSave({"value": _savable(value, key)})
      meta["arrays"].append(key)
    items[_META_ITEM] = ocp.args.JsonSave(meta)
    save_id = self._next_id[ckpt_series]
    manager.save(save_id, args=ocp.args.Composite(**items))
    self._next_id[ckpt_series] = save_id + 1
    if not self._save_async:
      manager.wait_until_finished()
    logging.info("Saved checkpoint %s/%s (global step %s).", ckpt_series, save_id,
                 state.global_step if "global_step" in state else None)

  def _latest(self, ckpt_series: str) -> int | None:
    manager = self._series_manager(ckpt_series)
    manager.reload()  # See checkpoints written by other checkpointers (eval vs train).
    return manager.latest_step()

  def can_be_restored(self, ckpt_series: str) -> bool:
    """Whether the series has a complete checkpoint on disk."""
    return self._latest(ckpt_series) is not None

  def restore_path(self, ckpt_series: str) -> str | None:
    """Directory of the newest checkpoint of the series, or None."""
    step = self._latest(ckpt_series)
    return None if step is None else os.path.join(self._directory, ckpt_series, str(step))

  def restore(self, ckpt_series: str) -> None:
    """Restores the newest checkpoint into the series' experiment state (see class doc).

    Raises:
      CheckpointError: no checkpoint, an entry of the current state missing from it, or a
        module snapshot whose structure / shapes differ from the current one.
    """
    ocp = _ocp()
    step = self._latest(ckpt_series)
    if step is None:
      raise CheckpointError(f"no checkpoint to restore in {self._directory}/{ckpt_series}")
    manager = self._managers[ckpt_series]
    state = self.get_experiment_state(ckpt_series)
    meta = manager.restore(step, args=ocp.args.Composite(
        **{_META_ITEM: ocp.args.JsonRestore()}))[_META_ITEM]
    saved = set(meta["json"]) | set(meta["arrays"])
    missing = [k for k in state.keys() if k not in saved]
    if missing:
      raise CheckpointError(f"checkpoint {ckpt_series}/{step} lacks experiment-state entries "
                            f"{missing}; it has {sorted(saved)}")
    templates, untargeted = {}, []
    for key in state.keys():
      if key not in meta["arrays"]:
        continue
      template = state[key].snapshot_state() if key == _MODULE_KEY else state[key]
      if template is None:
        untargeted.append(key)
      else:
        templates[key] = template
    try:
      restored = dict(manager.restore(step, args=ocp.args.Composite(**{
          key: ocp.args.StandardRestore({"value": _abstract(t, key)})
          for key, t in templates.items()})))
      if untargeted:
        restored.update(manager.restore(step, args=ocp.args.Composite(
            **{key: ocp.args.StandardRestore() for key in untargeted})))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"checkpoint {ckpt_series}/{step} does not match the current "
                            f"experiment state: {e}") from e
    for key in state.keys():
      if key in meta["json"]:
        state[key] = _from_json_entry(meta["json"][key])
      elif key in templates:
        value = _like_template(restored[key]["value"], templates[key])
        if key == _MODULE_KEY:
          state[key].restore_from_snapshot(value)
        else:
          state[key] = value
      else:
        state[key] = jax.device_get(restored[key]["value"])
    logging.info("Restored checkpoint %s/%s.", ckpt_series, step)

  def wait_for_checkpointing_to_finish(self) -> None:
    """Blocks until every pending (async) save is on disk."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the Orbax managers (the object stays usable)."""
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()
    self._managers.clear()
