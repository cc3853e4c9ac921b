"""Fixtures of the checkpointing tests: a random ResNet-50 tree with the release names, heads,
a jitted forward and an 8-device mesh (the fake CPU devices of tests/conftest.py)."""
import haiku as hk
import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from semppl_jax import checkpointing as ck
from semppl_jax import networks


def _random_tree(shapes, rng):
  """Random leaves for a {module: {name: ShapeDtypeStruct}} tree (finite ResNet activations)."""
  def leaf(module, name, sd):
    shape = sd.shape
    if name == "w":
      return (rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    if name == "scale":
      return (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    if name == "counter":
      return np.asarray(rng.randint(1, 1000), np.int32)
    if module.endswith("var_ema"):
      return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    return (0.1 * rng.normal(size=shape)).astype(np.float32)
  return {m: {n: leaf(m, n, sd) for n, sd in leaves.items()} for m, leaves in shapes.items()}


@pytest.fixture(scope="module")
def r50():
  """(params, state) of ResNet-50 1x with random values, as plain numpy dicts."""
  shapes_p, shapes_s = ck.expected_tree("resnet50")
  rng = np.random.RandomState(0)
  return _random_tree(shapes_p, rng), _random_tree(shapes_s, rng)


@pytest.fixture(scope="module")
def heads():
  """Projector / predictor / classifier entries as the release's BYOL-style heads."""
  rng = np.random.RandomState(1)
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  params, state = {}, {}
  for head in ("projector", "predictor"):
    d_in = 2048 if head == "projector" else 16
    params[f"{head}/linear"] = {"w": f(d_in, 32), "b": f(32)}
    params[f"{head}/batch_norm"] = {"scale": f(1, 32), "offset": f(1, 32)}
    params[f"{head}/linear_1"] = {"w": f(32, 16)}
    for ema in ("mean_ema", "var_ema"):
      state[f"{head}/batch_norm/~/{ema}"] = {"counter": np.asarray(3, np.int32),
                                             "hidden": f(1, 32), "average": f(1, 32)}
  params["classifier"] = {"w": f(2048, 10), "b": f(10)}
  return params, state


@pytest.fixture(scope="module")
def forward():
  """Jitted ResNet-50 inference forward on a fixed [2, 32, 32, 3] batch (one compilation)."""
  model = hk.transform_with_state(lambda x: networks.ResNet50()(x, is_training=False))
  apply = jax.jit(model.apply)
  images = np.random.RandomState(2).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  return lambda params, state: np.asarray(apply(params, state, None, images)[0])



@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))
