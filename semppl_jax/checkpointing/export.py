"""Export in the released SemPPL checkpoint format: :func:`export_release_checkpoint`.

Writes an encoder (and optionally heads) as the official release ships them, a protocol-2
pickle of ``{'experiment_state': {'online_params': ..., 'online_state': ...}, 'step': ...,
'rng': ...}`` with numpy leaves (docs/design.md §5), atomically, with numpy's reconstructors named
as numpy 1.x (the release's environment) knows them.
:func:`~semppl_jax.checkpointing.release.load_released_checkpoint` reads the files back.
"""
import os
import pickle
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

from semppl_jax.checkpointing.release import ModuleTree
from semppl_jax.checkpointing.unpickler import NP_RECONSTRUCT, NP_SCALAR


class _Numpy1NamesPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pure-Python pickler writing numpy's reconstructors under their numpy-1 module names.

  numpy 2 pickles name ``numpy._core.multiarray``, which numpy 1.x (the release's environment)
  cannot import; ``numpy.core.multiarray`` loads on numpy 1.x and (as an alias) on numpy 2.
  """

  _RENAMED = {id(NP_RECONSTRUCT): ("numpy.core.multiarray", "_reconstruct"),
              id(NP_SCALAR): ("numpy.core.multiarray", "scalar")}

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
