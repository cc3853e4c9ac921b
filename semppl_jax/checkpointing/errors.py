"""The error type of :mod:`semppl_jax.checkpointing` and safe text for its messages.

Error messages quote values read from untrusted files. :func:`describe` and :func:`clip` keep
that bounded (a hostile file can hold a 50 MB string, a 4,000-digit integer or a 100,000-level
nested tuple, whose ``repr()`` would be huge, fail, or overflow the C stack) and escape
non-printable characters (so a file cannot put terminal escape sequences into a log).
"""
from typing import Any, Iterable

import numpy as np

# Characters of a file-controlled string quoted in one message.
TEXT_LIMIT = 80
# Integers wider than this are described by their width, not printed.
_INT_BITS_SHOWN = 128


class CheckpointError(ValueError):
  """A checkpoint file is missing, malformed, unsafe, or does not match what was expected."""


def clip(text: str, limit: int = TEXT_LIMIT) -> str:
  """``text`` for a message: its first ``limit`` characters, non-printable ones escaped.

  Args:
    text: any str.
    limit: characters kept (> 0); a longer text ends in ``... (N characters)``.

  Returns:
    A printable str of at most ``10 * limit + 30`` characters (each escape is <= 10 chars).
  """
  head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                 for c in text[:limit])
  return head if len(text) <= limit else f"{head}... ({len(text):,} characters)"


def describe(obj: Any, limit: int = TEXT_LIMIT) -> str:
  """A bounded, printable stand-in for ``repr(obj)`` that never recurses into ``obj``.

  str / bytes are quoted (clipped), small ints and floats shown, arrays by dtype and shape,
  anything else (containers included) by its type name and length.
  """
  if obj is None or isinstance(obj, (bool, float)):
    return repr(obj)
  if isinstance(obj, int):
    bits = obj.bit_length()
    return repr(obj) if bits <= _INT_BITS_SHOWN else f"<int of {bits:,} bits>"
  if isinstance(obj, str):
    return "'" + clip(obj, limit) + "'"
  if isinstance(obj, (bytes, bytearray)):
    shown = repr(bytes(obj[:limit]))
    return shown if len(obj) <= limit else f"{shown}... ({len(obj):,} bytes)"
  if isinstance(obj, np.ndarray):
    return f"<array {obj.dtype.str} {obj.shape}>"
  if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
    return repr(obj)
  name = clip(type(obj).__name__, limit)
  if isinstance(obj, (tuple, list, dict, set, frozenset)):
    return f"<{name} of {len(obj):,} items>"
  return f"<{name}>"


def describe_all(items: Iterable[Any], max_items: int = 20) -> str:
  """``[a, b, ...]`` of the first ``max_items`` items (each via :func:`describe`) and the count.

  Items are described in iteration order (sorting file-controlled keys could compare huge or
  deeply nested values).
  """
  shown, count = [], 0
  for item in items:
    if count < max_items:
      shown.append(describe(item))
    count += 1
  more = f", ... ({count:,} in all)" if count > max_items else ""
  return "[" + ", ".join(shown) + more + "]"
