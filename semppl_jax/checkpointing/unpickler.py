"""Allow-list unpickler for the released SemPPL checkpoint pickles.

A plain ``pickle.load`` runs whatever the file names. This unpickler looks every global the file
names up in :data:`ALLOWED_GLOBALS`, a fixed table of ``(module, name)`` pairs mapped to small
local reconstructors; no module named by the file is ever imported, and any other global
(``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) stops the load with a
:class:`CheckpointError` before anything runs.
"""
import _compat_pickle
import collections
import keyword
import math
import os
import pickle
import re
import types
from typing import Any, Mapping

import numpy as np

from semppl_jax.checkpointing.errors import CheckpointError

NP_RECONSTRUCT = np._core.multiarray._reconstruct  # pylint: disable=protected-access
NP_SCALAR = np._core.multiarray.scalar  # pylint: disable=protected-access


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
  return NP_RECONSTRUCT(np.ndarray, shape, dtype_code)


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


def unpickle_file(path: str) -> Any:
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
