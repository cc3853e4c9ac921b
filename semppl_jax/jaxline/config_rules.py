"""The vocabulary of config checks shared by the experiments' validators.

Each rule reads one field of an ``ml_collections.ConfigDict`` (or any nested mapping) by its
dotted path and raises ``ValueError("config.<field>: ...")`` naming the field, the value it got
and what is allowed. The experiments run every rule before anything loads or compiles.
"""
import math
import numbers
from typing import Any, Iterable, Optional, Sequence, Tuple

from semppl_jax import parallel


def fail(field: str, message: str) -> None:
  """Raises ``ValueError('config.<field>: <message>')``."""
  raise ValueError(f"config.{field}: {message}")


def get(config: Any, field: str) -> Any:
  """The value at dotted path ``field`` (e.g. ``'data.batch_size'``)."""
  node = config
  for i, part in enumerate(field.split(".")):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      fail(".".join(field.split(".")[: i + 1]), "is missing.")
  return node


def require_fields(config: Any, fields: Iterable[str], example: str) -> None:
  """Raises one error listing every missing dotted field (``example``: a complete config)."""
  missing = []
  for field in fields:
    try:
      get(config, field)
    except ValueError:
      missing.append(field)
  if missing:
    raise ValueError(f"config is missing the field(s) {', '.join(missing)}; see {example} for "
                     "a complete config.")


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def one_of(config: Any, field: str, allowed: Sequence[Any]) -> Any:
  """The value, which must be one of ``allowed``."""
  value = get(config, field)
  if value not in tuple(allowed):
    fail(field, f"got {value!r}, allowed: {', '.join(repr(a) for a in allowed)}.")
  return value


def boolean(config: Any, field: str) -> bool:
  """The value, which must be True or False."""
  value = get(config, field)
  if not isinstance(value, bool):
    fail(field, f"must be True or False, got {value!r}.")
  return value


def integer(config: Any, field: str, low: Optional[int] = None,
            high: Optional[int] = None) -> int:
  """The value, an int in ``[low, high]`` (either bound optional)."""
  value = get(config, field)
  if not _is_int(value):
    fail(field, f"must be an int, got {value!r}.")
  if (low is not None and value < low) or (high is not None and value > high):
    fail(field, f"must be in [{'-inf' if low is None else low}, "
         f"{'inf' if high is None else high}], got {value}.")
  return int(value)


def number(config: Any, field: str, low: Optional[float] = None, high: Optional[float] = None,
           *, low_open: bool = False, high_open: bool = False) -> float:
  """The value, a finite real number in the interval given by the bounds.

  ``low_open`` / ``high_open`` exclude the bound itself (e.g. a temperature: ``low=0,
  low_open=True``).
  """
  value = get(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    fail(field, f"must be a finite number, got {value!r}.")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    fail(field, f"must be in {left}{'-inf' if low is None else low}, "
         f"{'inf' if high is None else high}{right}, got {value}.")
  return float(value)


def interval(config: Any, field: str, low: float, high: float,
             *, low_open: bool = False) -> Tuple[float, float]:
  """The value, a pair ``(a, b)`` of finite numbers with ``low <= a <= b <= high`` (``low < a``
  with ``low_open``, e.g. a crop's area fraction)."""
  value = get(config, field)
  try:
    a, b = (float(x) for x in value)
  except (TypeError, ValueError):
    fail(field, f"must be a pair (low, high), got {value!r}.")
  above_low = a > low if low_open else a >= low
  if not (math.isfinite(a) and math.isfinite(b) and above_low and a <= b <= high):
    fail(field, f"must be (a, b) with {low} {'<' if low_open else '<='} a <= b <= {high}, "
         f"got {tuple(value)}.")
  return a, b


def int_tuple(config: Any, field: str, low: int = 1) -> Tuple[int, ...]:
  """The value, a non-empty sequence of ints, each ``>= low``."""
  value = get(config, field)
  values = tuple(value) if isinstance(value, (tuple, list)) else None
  if not values or any(not _is_int(v) or v < low for v in values):
    fail(field, f"must be a non-empty tuple of ints >= {low}, got {value!r}.")
  return values


def multiple_of(config: Any, field: str, divisor: int, what: str) -> int:
  """The value, a positive int that is a multiple of ``divisor`` (``what`` says why)."""
  value = integer(config, field, low=1)
  if value % divisor:
    fail(field, f"{value} is not a multiple of {what} ({divisor}); use a multiple of "
         f"{divisor}.")
  return value


def batch_divisible(config: Any, field: str, *, num_devices: int, num_processes: int) -> int:
  """A global batch size >= 1 that splits evenly over every device and every process
  (``parallel.check_batch_divisible``)."""
  value = integer(config, field, low=1)
  parallel.check_batch_divisible(field, value, num_devices, num_processes)
  return value
