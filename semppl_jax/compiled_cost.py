"""What a compiled SPMD program costs per device: FLOPs, bytes, temporaries and collectives.

Data parallelism is proven by the compiled program, not by equal values: GSPMD silently
replicates work when an op folds the batch into another axis, and replicated work gives the same
numbers. :func:`program_cost` reads ``compiled.cost_analysis()`` (the per-device program's FLOPs
and bytes accessed), ``compiled.memory_analysis()`` (temporaries) and the optimised HLO text
(every cross-device collective with its result size), so tests and benchmarks can assert that
per-device work scales as 1/devices and that no collective moves images or activations.
"""
import dataclasses
import math
import re
from typing import Any, Dict, List, Tuple

import numpy as np

# Collective ops in optimised HLO (async pairs are counted once, at their '-start').
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of the per-device program: its op, result shapes and result bytes."""
  op: str
  shapes: Tuple[str, ...]
  bytes: int


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """Per-device cost of one compiled program.

  Attributes:
    flops: float, FLOPs of the per-device program (``cost_analysis()['flops']``).
    bytes_accessed: float, bytes read and written by the per-device program.
    temp_bytes: int, temporaries of the per-device program (``memory_analysis()``).
    collectives: every cross-device collective, in program order.
  """
  flops: float
  bytes_accessed: float
  temp_bytes: int
  collectives: Tuple[Collective, ...]

  def count(self, op: str) -> int:
    """How many collectives of kind ``op`` (e.g. 'all-reduce') the program runs."""
    return sum(c.op == op for c in self.collectives)

  def largest(self, op: str) -> int:
    """Bytes of the largest collective of kind ``op`` (0 if none)."""
    return max((c.bytes for c in self.collectives if c.op == op), default=0)

  def total_bytes(self) -> int:
    """Bytes of all collectives' results together."""
    return sum(c.bytes for c in self.collectives)


def _array_bytes(dtype: str, dims: str) -> int:
  shape = [int(d) for d in dims.split(",") if d]
  return _DTYPE_BYTES.get(dtype, 4) * int(math.prod(shape))


def collectives(hlo_text: str) -> List[Collective]:
  """The collectives of optimised HLO text, each with its result's shapes and bytes.

  An async collective (``all-gather-start`` / ``-done``) is counted once; a tuple result (a
  combined all-reduce of several arrays) counts all its arrays.
  """
  found = []
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    result_type = m.group(1)
    arrays = _ARRAY.findall(result_type)
    if m.group(3) and m.group(2) == "all-gather" and len(arrays) > 1:
      arrays = arrays[len(arrays) // 2:]  # all-gather-start returns (operands, results).
    elif m.group(3) and m.group(2) == "collective-permute" and len(arrays) > 1:
      arrays = arrays[1:2]  # (operand, result, contexts...).
    found.append(Collective(m.group(2), tuple(f"{t}[{d}]" for t, d in arrays),
                            sum(_array_bytes(t, d) for t, d in arrays)))
  return found


def program_cost(compiled: Any) -> ProgramCost:
  """Per-device cost of ``jax.jit(f).lower(...).compile()``.

  Args:
    compiled: a ``jax.stages.Compiled``.

  Returns:
    A :class:`ProgramCost`.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax returned one dict per program.
    analysis = analysis[0]
  memory = compiled.memory_analysis()
  temp = int(getattr(memory, "temp_size_in_bytes", 0)) if memory is not None else 0
  return ProgramCost(flops=float(analysis.get("flops", 0.0)),
                     bytes_accessed=float(analysis.get("bytes accessed", 0.0)),
                     temp_bytes=temp, collectives=tuple(collectives(compiled.as_text())))


def summary(cost: ProgramCost) -> Dict[str, float]:
  """A flat dict for tables: GFLOP, GiB accessed, temp MiB, collective counts and MiB."""
  row = {"gflop": cost.flops / 1e9, "gib_accessed": cost.bytes_accessed / 2**30,
         "temp_mib": cost.temp_bytes / 2**20, "collectives": len(cost.collectives),
         "collective_mib": cost.total_bytes() / 2**20,
         "largest_collective_mib": max((c.bytes for c in cost.collectives), default=0) / 2**20}
  for op in COLLECTIVES:
    row[op] = cost.count(op)
  return row


def largest_collective(cost: ProgramCost) -> Collective:
  """The collective with the most result bytes (a placeholder of 0 bytes if there is none)."""
  if not cost.collectives:
    return Collective("none", (), 0)
  return cost.collectives[int(np.argmax([c.bytes for c in cost.collectives]))]
