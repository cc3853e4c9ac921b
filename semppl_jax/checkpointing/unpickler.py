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
import struct
import types
from typing import Any, Mapping, NamedTuple

import numpy as np

from semppl_jax.checkpointing.errors import CheckpointError, clip, describe

NP_RECONSTRUCT = np._core.multiarray._reconstruct  # pylint: disable=protected-access
NP_SCALAR = np._core.multiarray.scalar  # pylint: disable=protected-access


class _Refused(Exception):
  """Raised inside the unpickler when the file names a global that is not allowed."""


class _OverLimit(Exception):
  """Raised inside the unpickler when the file exceeds a :class:`LoadLimits` limit."""


class _Truncated(Exception):
  """Raised inside the unpickler when a declared length runs past the end of the file."""


class _NdarrayToken:
  """Stands in for ``numpy.ndarray``: only the array reconstructors accept it, nobody can call it.

  Handing out the real class would let a file call ``ndarray(shape=...)`` with any arguments.
  """

  def __repr__(self):
    return "numpy.ndarray"


_NDARRAY = _NdarrayToken()


def _check_dtype(dtype: Any, what: str) -> np.dtype:
  if not isinstance(dtype, np.dtype):
    raise _Refused(f"{what} expects a numpy dtype, got {describe(dtype)}")
  if dtype.hasobject:
    raise _Refused(f"{what} with object dtype {describe(dtype.str)} (only numeric arrays are "
                   "allowed)")
  return dtype


def _np_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
  """``numpy.core.multiarray._reconstruct``: an empty array that a later BUILD fills in."""
  if subtype is not _NDARRAY:
    raise _Refused(f"_reconstruct of {describe(subtype)} (only numpy.ndarray is allowed)")
  # numpy writes shape (0,) here; the real shape arrives with the BUILD state (checked by numpy
  # against the data length), so a large placeholder can only be an allocation bomb.
  if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape) \
      or math.prod(shape) > 1024:
    raise _Refused(f"_reconstruct with placeholder shape {describe(shape)}")
  if dtype_code not in (b"b", "b"):
    raise _Refused(f"_reconstruct with dtype code {describe(dtype_code)}")
  return NP_RECONSTRUCT(np.ndarray, shape, dtype_code)


# Built-in numeric dtypes only: numpy ignores a later BUILD state on these, whereas the state of
# a flexible ('V') dtype can set its has-object flags and make numpy read raw bytes as pointers.
_DTYPE_SPEC = re.compile(r"b1|[iu][1248]|f[248]")


def _np_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
  """``numpy.dtype(spec, align, copy)`` for a built-in numeric spec (``'f4'``, ``'i4'`` ...)."""
  if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec) \
      or not isinstance(align, bool) or not isinstance(copy, bool):
    raise _Refused(f"numpy.dtype({describe(spec)}, {describe(align)}, {describe(copy)}) (only "
                   "bool/int/uint/float dtypes are allowed)")
  return np.dtype(spec, align=align, copy=copy)


def _np_scalar(dtype: Any, data: Any = None) -> np.generic:
  """``numpy.core.multiarray.scalar(dtype, raw_bytes)``: a numpy scalar from its raw bytes."""
  _check_dtype(dtype, "numpy scalar")
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise _Refused(f"numpy scalar of {dtype.str} from {describe(data)}")
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
    raise _Refused(f"_codecs.encode with encoding {describe(encoding)}")
  return obj.encode("latin1")


def _array_from_reduce(fun: Any, args: Any, state: Any) -> np.ndarray:
  """Rebuilds a numpy array from the pieces of ``ndarray.__reduce__()``."""
  if fun is not _np_reconstruct or not isinstance(args, tuple):
    raise _Refused(f"array reconstructor {describe(fun)} (only numpy's _reconstruct is allowed)")
  array = fun(*args)
  if not isinstance(state, tuple):
    raise _Refused(f"array state {describe(state)}")
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
    raise _Refused(f"device-array aval state {describe(aval_state)}")
  return _array_from_reduce(fun, args, arr_state)


def _plain_dict(data: Any = (), *unused) -> dict:
  """Old Haiku ``FlatMapping`` / ``FlatMap`` / ``frozendict``: pickled as ``cls(mapping)``."""
  if unused:
    raise _Refused("FlatMapping with more than one argument")
  if not isinstance(data, (Mapping, list, tuple)):
    raise _Refused(f"FlatMapping of {describe(data)}")
  return dict(data)


# Experiment / optimizer states have a handful of fields; a million-field class is an attack.
MAX_NAMEDTUPLE_FIELDS = 1000
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
  if len(fieldnames) > MAX_NAMEDTUPLE_FIELDS:
    raise _OverLimit(f"dill._create_namedtuple with {len(fieldnames):,} fields (at most "
                   f"{MAX_NAMEDTUPLE_FIELDS} allowed)")
  for ident in (name, *fieldnames):
    if not ident.isidentifier() or keyword.iskeyword(ident) or ident.startswith("_"):
      raise _Refused(f"dill._create_namedtuple with field or type name {describe(ident)}")
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
    raise _Refused(f"builtins.setattr({describe(obj)}, {describe(name)}, ...)")
  obj.__qualname__ = value


_DILL_BUILTIN_TYPES: Mapping[str, type] = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
    "complex": complex, "str": str, "int": int, "float": float, "bool": bool,
    "NoneType": type(None),
}


def _dill_load_type(name: Any) -> type:
  """``dill._dill._load_type(name)`` for a few inert builtin types only."""
  if name not in _DILL_BUILTIN_TYPES:
    raise _Refused(f"dill._dill._load_type({describe(name)})")
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
  shown = f"{clip(module)}.{clip(name)}"
  return shown if py3 == (module, name) else f"{shown} (Python 3: {clip(py3[0])}.{clip(py3[1])})"


def _load_build(unpickler: "_AllowListUnpickler") -> None:
  """BUILD opcode (``inst.__setstate__(state)``) restricted to numpy arrays and dtypes.

  The stock BUILD would also set attributes on any object on the stack (our reconstructor
  functions, cached namedtuple classes ...), changing them for later loads.
  """
  state = unpickler.stack.pop()
  inst = unpickler.stack[-1]
  if type(inst) is not np.ndarray and not isinstance(inst, np.dtype):
    raise _Refused(f"BUILD (setting state) on a {describe(inst)}")
  inst.__setstate__(state)


class LoadLimits(NamedTuple):
  """Resource limits of :func:`unpickle_file` (what a real release checkpoint stays far below).

  Attributes:
    max_depth: nesting of containers and pending MARKs. A release is ~6 levels deep (dict ->
      experiment state -> modules -> arrays -> reduce arguments); much deeper structures are
      only good for overflowing the C stack when hashed, compared or printed.
    max_items: elements of one container, and objects on the unpickler's stack at once (a
      release's largest container is its module dict, ~10^3 entries).
    max_objects: containers built, and memo entries, in all (a ResNet-50 release with target
      params and optimizer state: ~3,000 containers, ~5,000 memo entries).
    max_int_bytes: bytes of one integer (steps and shapes need 8).
  """
  max_depth: int = 100
  max_items: int = 100_000
  max_objects: int = 250_000
  max_int_bytes: int = 16


_MUTABLE = (list, dict, set)
_CONTAINERS = (tuple, list, dict, set, frozenset)
_P = pickle
# Opcodes that build one new object from the objects they pop: how many they pop (None: all
# since the last MARK).
_BUILDERS = {_P.TUPLE[0]: None, _P.LIST[0]: None, _P.DICT[0]: None, _P.FROZENSET[0]: None,
             _P.INST[0]: None, _P.OBJ[0]: None, _P.EMPTY_TUPLE[0]: 0, _P.EMPTY_LIST[0]: 0,
             _P.EMPTY_DICT[0]: 0, _P.EMPTY_SET[0]: 0, _P.TUPLE1[0]: 1, _P.TUPLE2[0]: 2,
             _P.TUPLE3[0]: 3, _P.REDUCE[0]: 2, _P.NEWOBJ[0]: 2, _P.NEWOBJ_EX[0]: 3}
# Opcodes that add items to an existing container: (stack slots taken by the items, or None
# for all since the last MARK; items per element).
_ADDERS = {_P.APPEND[0]: (1, 1), _P.APPENDS[0]: (None, 1), _P.SETITEM[0]: (2, 2),
           _P.SETITEMS[0]: (None, 2), _P.ADDITEMS[0]: (None, 1)}
_INTS = (_P.INT[0], _P.LONG[0], _P.LONG1[0], _P.LONG4[0])


class _AllowListUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickler that resolves globals through :data:`ALLOWED_GLOBALS` only, within limits.

  The pure-Python unpickler is used because its opcode table can be restricted and wrapped;
  the cost is per opcode, and a checkpoint has a few opcodes per array. On top of the stock
  opcodes it enforces, before anything is allocated, that every declared length (bytes, str,
  bytearray, frame, long integer) fits in the bytes left in the file, and it tracks the nesting
  depth of every container it builds (a container's depth is fixed once it is placed inside
  another: adding to it afterwards is refused, which also rules out cycles).
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access
  dispatch[pickle.BUILD[0]] = _load_build

  def __init__(self, file: Any, size: int, limits: LoadLimits):
    super().__init__(file)
    self._file, self._size, self._limits = file, size, limits
    # id -> (object, depth); holding the object keeps its id from being reused.
    self._depth: dict[int, tuple[Any, int]] = {}
    # id -> container already placed inside another (no more items may be added).
    self._sealed: dict[int, Any] = {}

  # ----- Declared lengths. -----

  def _bytes_left(self) -> int:
    frame = self._unframer.current_frame
    in_frame = 0 if frame is None else len(frame.getbuffer()) - frame.tell()
    return in_frame + self._size - self._file.tell()

  def _read_declared(self, length_format: str, what: str, limit: int | None = None) -> bytes:
    """Reads a length field, checks it against what is left, then reads that many bytes."""
    field = self.read(struct.calcsize(length_format))
    if len(field) != struct.calcsize(length_format):
      raise EOFError
    (length,) = struct.unpack(length_format, field)
    left = self._bytes_left()
    if limit is not None and length > limit:
      raise _OverLimit(f"{what} declaring {length:,} bytes (at most {limit})")
    if length < 0 or length > left:
      raise _Truncated(f"{what} declares {length:,} bytes but only {left:,} are left")
    data = self.read(length)
    if len(data) != length:
      raise EOFError
    return data

  def _load_frame(self):
    field = self.read(8)
    if len(field) != 8:
      raise EOFError
    (length,) = struct.unpack("<Q", field)
    left = self._size - self._file.tell()
    if length > left:
      raise _Truncated(f"a FRAME declares {length:,} bytes but only {left:,} are left")
    self._unframer.load_frame(length)

  def _load_binbytes(self):
    self.append(self._read_declared("<I", "BINBYTES"))

  def _load_binbytes8(self):
    self.append(self._read_declared("<Q", "BINBYTES8"))

  def _load_bytearray8(self):
    self.append(bytearray(self._read_declared("<Q", "BYTEARRAY8")))

  def _load_binunicode(self):
    self.append(str(self._read_declared("<I", "BINUNICODE"), "utf-8", "surrogatepass"))

  def _load_binunicode8(self):
    self.append(str(self._read_declared("<Q", "BINUNICODE8"), "utf-8", "surrogatepass"))

  def _load_binstring(self):
    self.append(self._decode_string(self._read_declared("<i", "BINSTRING")))

  def _load_long4(self):
    data = self._read_declared("<i", "LONG4", limit=self._limits.max_int_bytes)
    self.append(pickle.decode_long(data))

  dispatch[pickle.FRAME[0]] = _load_frame
  dispatch[pickle.BINBYTES[0]] = _load_binbytes
  dispatch[pickle.BINBYTES8[0]] = _load_binbytes8
  dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
  dispatch[pickle.BINUNICODE[0]] = _load_binunicode
  dispatch[pickle.BINUNICODE8[0]] = _load_binunicode8
  dispatch[pickle.BINSTRING[0]] = _load_binstring
  dispatch[pickle.LONG4[0]] = _load_long4

  # ----- Nesting depth and sizes. -----

  def _depth_of(self, obj: Any) -> int:
    entry = self._depth.get(id(obj))
    return entry[1] if entry is not None and entry[0] is obj else 0

  def _set_depth(self, obj: Any, depth: int) -> None:
    if depth > self._limits.max_depth:
      raise _OverLimit(f"nesting deeper than {self._limits.max_depth} levels")
    if id(obj) not in self._depth and len(self._depth) >= self._limits.max_objects:
      raise _OverLimit(f"more than {self._limits.max_objects:,} containers / objects")
    self._depth[id(obj)] = (obj, depth)

  def _placed(self, items: list) -> int:
    """Seals the mutable ``items`` (now inside a container); 1 + their deepest depth."""
    deepest = 0
    for item in items:
      if isinstance(item, _MUTABLE):
        self._sealed[id(item)] = item
      deepest = max(deepest, self._depth_of(item))
    return deepest + 1

  def _count_check(self, count: int, what: str) -> None:
    if count > self._limits.max_items:
      raise _OverLimit(f"{what} with {count:,} items (at most {self._limits.max_items:,})")

  def _build(self, key: int, arity: int | None) -> None:
    """Runs a builder opcode; the new object is one level deeper than what it was built from."""
    items = self.stack if arity is None else self.stack[len(self.stack) - arity:]
    self._count_check(len(items), "a container")
    depth = self._placed(items)
    self.dispatch[key](self)
    if isinstance(self.stack[-1], _CONTAINERS):
      # Other results (arrays, classes, None from setattr) cannot nest; some are singletons.
      self._set_depth(self.stack[-1], depth)

  def _add(self, key: int, slots: int | None, per_item: int) -> None:
    """Runs APPEND(S) / SETITEM(S) / ADDITEMS after checking the container may still grow."""
    if slots is None:
      items, below = self.stack, self.metastack[-1] if self.metastack else []
    else:
      items, below = self.stack[len(self.stack) - slots:], self.stack[:len(self.stack) - slots]
    if not below:
      raise pickle.UnpicklingError("adding items with no container on the stack")
    container = below[-1]
    if any(item is container for item in items):
      raise _OverLimit("a container holding itself (checkpoints have no cycles)")
    entry = self._sealed.get(id(container))
    if entry is not None and entry is container:
      raise _OverLimit("items added to a container after it was placed in another one (a "
                     "cycle or a shared mutable object; checkpoints hold neither)")
    size = len(container) if isinstance(container, (list, dict, set)) else 0
    self._count_check(size + len(items) // per_item, f"a {describe(container)}")
    depth = max(self._depth_of(container), self._placed(items))
    self.dispatch[key](self)
    self._set_depth(container, depth)

  def load(self) -> Any:
    """``pickle._Unpickler.load`` with the limits of :class:`LoadLimits` checked per opcode."""
    self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # pylint: disable=protected-access
    self.read = self._unframer.read
    self.readinto = self._unframer.readinto
    self.readline = self._unframer.readline
    self.metastack, self.stack = [], []
    self.append = self.stack.append
    self.proto = 0
    limits = self._limits
    try:
      while True:
        key = self.read(1)
        if not key:
          raise EOFError
        op = key[0]
        if op in _BUILDERS:
          self._build(op, _BUILDERS[op])
        elif op in _ADDERS:
          self._add(op, *_ADDERS[op])
        else:
          self.dispatch[op](self)
          if op in _INTS and self.stack[-1].bit_length() > 8 * limits.max_int_bytes:
            raise _OverLimit(f"an integer wider than {limits.max_int_bytes} bytes")
        if len(self.memo) > limits.max_objects:
          raise _OverLimit(f"more than {limits.max_objects:,} memoized objects")
        if len(self.metastack) > limits.max_depth:
          raise _OverLimit(f"nesting deeper than {limits.max_depth} levels (MARKs)")
        self._count_check(len(self.stack), "the unpickler's stack")
    except pickle._Stop as stop:  # pylint: disable=protected-access
      return stop.value

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise _Refused(_global_name(module, name)) from None

  def persistent_load(self, pid: Any) -> Any:
    raise _Refused(f"persistent id {describe(pid)}")


def unpickle_file(path: str, limits: LoadLimits = LoadLimits()) -> Any:
  """Reads one pickle from ``path`` through the allow-list unpickler.

  Args:
    path: the file.
    limits: resource limits (the defaults fit every release checkpoint).

  Returns:
    The unpickled object (dicts, lists, tuples, namedtuples, numbers, str / bytes, numpy
    arrays).

  Raises:
    CheckpointError: missing / empty / truncated / malformed file, a global outside
      :data:`ALLOWED_GLOBALS`, or a limit exceeded. The message quotes at most a few short,
      escaped excerpts of the file.
  """
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
      obj = _AllowListUnpickler(f, size, limits).load()
    except _Refused as e:
      raise CheckpointError(
          f"refusing to load {path!r}: the pickle uses {e}, which is not on the allow-list of "
          "array/mapping reconstructors (a plain pickle.load would have executed it)") from None
    except _OverLimit as e:
      raise CheckpointError(
          f"refusing to load {path!r}: {e}; the loader's limits bound the memory and nesting a "
          "file can make it use (release checkpoints stay far below them)") from None
    except _Truncated as e:
      raise CheckpointError(f"checkpoint {path!r} is truncated or corrupt: {e} ({size:,} bytes "
                            "in all)") from None
    except EOFError:
      raise CheckpointError(
          f"checkpoint {path!r} is truncated: the pickle stream ends (at {size} bytes) before "
          "its STOP opcode") from None
    except Exception as e:  # pylint: disable=broad-except
      # Garbage bytes raise whatever the opcode decoder trips on (UnpicklingError, ValueError,
      # KeyError on a bad memo index, struct errors ...): all mean "not a checkpoint pickle".
      # The message is clipped: some quote the offending (file-controlled) text.
      raise CheckpointError(
          f"checkpoint {path!r} is not a valid pickle ({type(e).__name__}: "
          f"{clip(str(e), 200)})") from None
    trailing = size - f.tell()
  if trailing:
    raise CheckpointError(f"checkpoint {path!r} has {trailing} trailing bytes after the pickle "
                          "(expected exactly one pickle)")
  return obj
