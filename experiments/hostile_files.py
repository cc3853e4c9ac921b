"""A corpus of hostile release "checkpoints": small files that declare huge or deep things.

Shared by experiments/bench_hostile_files.py (which times them at full size) and
tests/checkpointing/test_unpickler.py (which asserts each is refused within a memory bound). Each builder
writes raw pickle opcodes, so every file is exactly the attack it is named after.
"""
import pickle
import struct

_P2 = pickle.PROTO + b"\x02"
_P5 = pickle.PROTO + b"\x05"


def _unicode(text: str) -> bytes:
  data = text.encode("utf-8")
  return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _key_into_dict(key: bytes) -> bytes:
  """``{key: None}``: hashing the key is what overflows the C stack for a deep tuple."""
  return _P2 + pickle.EMPTY_DICT + key + pickle.NONE + pickle.SETITEM + pickle.STOP


def bytearray_declared(size: int) -> bytes:
  """BYTEARRAY8 declaring ``size`` bytes, none of which follow (stdlib allocates them first)."""
  return _P5 + pickle.BYTEARRAY8 + struct.pack("<Q", size) + pickle.STOP


def deep_tuple_key(depth: int) -> bytes:
  """A tuple nested ``depth`` deep, used as a dict key."""
  return _key_into_dict(pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth)


def deep_lists(depth: int) -> bytes:
  """``depth`` lists, each appended into the one below it (nested ``depth`` deep)."""
  return _P2 + pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1) + pickle.STOP


def deep_dicts(depth: int) -> bytes:
  """``{'k': {'k': ...}}`` nested ``depth`` deep, built with SETITEM."""
  key = pickle.SHORT_BINUNICODE + b"\x01k"
  return (_P2 + (pickle.EMPTY_DICT + key) * (depth - 1) + pickle.EMPTY_DICT
          + pickle.SETITEM * (depth - 1) + pickle.STOP)


def many_marks(count: int) -> bytes:
  """``count`` MARKs, never closed."""
  return _P2 + pickle.MARK * count + pickle.STOP


def wide_int_key(num_bytes: int) -> bytes:
  """An integer of ``num_bytes`` bytes (LONG4) as a dict key."""
  return _key_into_dict(pickle.LONG4 + struct.pack("<i", num_bytes) + b"\x7f" * num_bytes)


def long4_declared(num_bytes: int) -> bytes:
  """LONG4 declaring ``num_bytes`` bytes that the file does not have."""
  return _P2 + pickle.LONG4 + struct.pack("<i", num_bytes) + pickle.STOP


def binunicode8_declared(size: int) -> bytes:
  """BINUNICODE8 declaring ``size`` bytes that the file does not have."""
  return _P5 + pickle.BINUNICODE8 + struct.pack("<Q", size) + b"abc" + pickle.STOP


def binbytes8_declared(size: int) -> bytes:
  """BINBYTES8 declaring ``size`` bytes that the file does not have."""
  return _P5 + pickle.BINBYTES8 + struct.pack("<Q", size) + b"abc" + pickle.STOP


def frame_declared(size: int) -> bytes:
  """A protocol-4 FRAME declaring ``size`` bytes that the file does not have."""
  return pickle.PROTO + b"\x04" + pickle.FRAME + struct.pack("<Q", size) + pickle.NONE + pickle.STOP


def namedtuple_fields(num_fields: int) -> bytes:
  """dill's ``_create_namedtuple('T', (f0, f1, ...), 'm')`` with ``num_fields`` fields."""
  fields = b"".join(_unicode(f"f{i}") for i in range(num_fields))
  return (_P2 + pickle.GLOBAL + b"dill._dill\n_create_namedtuple\n" + _unicode("T")
          + pickle.MARK + fields + pickle.TUPLE + _unicode("m") + pickle.TUPLE3 + pickle.REDUCE
          + pickle.STOP)


def huge_key(num_chars: int) -> bytes:
  """A valid pickle ``{<num_chars-character str>: 1}``: refused for its layout, not its size."""
  return _key_into_dict(_unicode("a" * num_chars))


def huge_module_name(num_chars: int) -> bytes:
  """A release dict whose only module name is ``num_chars`` characters and whose leaf is a str."""
  tree = {"experiment_state": {"online_params": {"\x1b[2J" + "a" * num_chars: {"w": "x"}},
                               "online_state": {}}}
  return pickle.dumps(tree, protocol=2)


def control_characters_in_global() -> bytes:
  """A GLOBAL whose module / name carry terminal escape sequences."""
  return (_P2 + pickle.GLOBAL + b"os\x1b[31m\nsystem\x07\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
          + pickle.STOP)


def self_containing_list() -> bytes:
  """``a = []; a.append(a)``: a cycle."""
  return (_P2 + pickle.EMPTY_LIST + pickle.MEMOIZE + pickle.BINGET + b"\x00" + pickle.APPEND
          + pickle.STOP)


def wide_list(num_items: int) -> bytes:
  """A list of ``num_items`` Nones added in batches of 1000 (as pickle writes them)."""
  batch = pickle.MARK + pickle.NONE * 1000 + pickle.APPENDS
  return _P2 + pickle.EMPTY_LIST + batch * (num_items // 1000) + pickle.STOP


def memo_flood(count: int) -> bytes:
  """``count`` memo entries of one object."""
  return _P5 + pickle.NONE + pickle.MEMOIZE * count + pickle.STOP


def corpus(scale: float = 1.0) -> dict[str, bytes]:
  """name -> file bytes. ``scale`` < 1 shrinks the sizes that only cost time to write (each
  stays far beyond the loader's limits)."""
  deep, marks, fields = int(1_000_000 * scale), int(1_000_000 * scale), int(1_000_000 * scale)
  chars = int(50_000_000 * scale)
  return {
      "bytearray8 declaring 6 GiB": bytearray_declared(6 << 30),
      "bytearray8 declaring 2^63 bytes": bytearray_declared(1 << 63),
      f"tuple {deep:,} deep as dict key": deep_tuple_key(deep),
      "tuple 2,000 deep as dict key": deep_tuple_key(2_000),
      "lists 50,000 deep": deep_lists(50_000),
      "dicts 50,000 deep": deep_dicts(50_000),
      f"{marks:,} MARKs": many_marks(marks),
      "4,000-byte integer key": wide_int_key(4_000),
      "LONG4 declaring 2 GiB": long4_declared(2**31 - 1),
      "BINUNICODE8 declaring 2^62 bytes": binunicode8_declared(1 << 62),
      "BINBYTES8 declaring 2^62 bytes": binbytes8_declared(1 << 62),
      "FRAME declaring 2^62 bytes": frame_declared(1 << 62),
      f"namedtuple with {fields:,} fields": namedtuple_fields(fields),
      "namedtuple with 5,000 fields": namedtuple_fields(5_000),
      "list of 200,000 items": wide_list(200_000),
      "2,000,000 memo entries": memo_flood(2_000_000),
      f"{chars:,}-character dict key": huge_key(chars),
      f"{chars:,}-character module name": huge_module_name(chars),
      "control characters in a global's name": control_characters_in_global(),
      "list containing itself": self_containing_list(),
  }
