"""Every jitted program does only its shard's work: proven by the compiled programs.

Equal values cannot show data parallelism (replicated work gives the same numbers), so each
program is compiled ahead of time (AOT, nothing runs) on 1 device and on 8 fake devices at the
same global batch, and the per-device programs are compared: FLOPs on 8 devices must be at most
0.2x those on 1 (ideal 0.125), no all-gather may move images or activations (the largest one is
bounded by the gathered projections / embeddings), and the pre-training step must all-reduce its
gradients (cross-replica BatchNorm statistics and the gradient sum are collectives in the HLO).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semppl_jax import compiled_cost
from semppl_jax import encoders
from semppl_jax import finetune
from semppl_jax import losses
from semppl_jax import parallel
from semppl_jax import train

DEVICES = 8
MAX_RATIO = 0.2
LABELLED, UNLABELLED = 16, 112  # 2 + 14 images per device on 8 devices.
IMAGE = 16


def _train_config(objective: str) -> train.TrainConfig:
  return train.TrainConfig(
      objective=objective, num_classes=4, labelled_batch_size=LABELLED,
      unlabelled_batch_size=UNLABELLED, queue_size=64, training_steps=10, num_shards=DEVICES,
      views=train.ViewConfig(num_large=2, num_small=1, large_size=12, small_size=8,
                             large_scale=(0.5, 1.0), small_scale=(0.3, 0.6)),
      network=train.NetworkConfig(encoder="tiny_resnet", small_images=True,
                                  projector_hidden_size=32, projection_size=16,
                                  predictor_hidden_size=32))


def _images(batch: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, IMAGE, IMAGE, 1), jnp.uint8)


def _labels(batch: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch,), jnp.int32)


def _compile(fn, args, in_shardings, out_shardings, num_devices):
  """``fn`` compiled on the first ``num_devices`` devices: its per-device cost."""
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  placed = lambda tree: jax.tree.map(lambda f: f(mesh) if callable(f) else f, tree)
  jitted = jax.jit(fn, in_shardings=placed(in_shardings), out_shardings=placed(out_shardings))
  with jax.set_mesh(mesh):
    return compiled_cost.program_cost(jitted.lower(*args).compile())


def _both(fn, args, in_shardings, out_shardings):
  return (_compile(fn, args, in_shardings, out_shardings, 1),
          _compile(fn, args, in_shardings, out_shardings, DEVICES))


def _replicated(mesh):
  return parallel.replicated_sharding(mesh)


def _data(mesh):
  return parallel.data_sharding(mesh)


def _assert_scales(one, many, what):
  ratio = many.flops / one.flops
  assert ratio <= MAX_RATIO, (
      f"{what}: per-device FLOPs on {DEVICES} devices are {ratio:.3f}x those on 1 device "
      f"(at most {MAX_RATIO}, ideal {1 / DEVICES}): work is replicated, not sharded. "
      f"Largest collective: {compiled_cost.largest_collective(many)}")


def _assert_gathers_at_most(cost, max_bytes, what):
  largest = cost.largest("all-gather")
  assert largest <= max_bytes, (
      f"{what}: an all-gather moves {largest} bytes (at most {max_bytes}, the gathered "
      f"projections): images or activations are gathered. "
      f"{[c for c in cost.collectives if c.op == 'all-gather' and c.bytes > max_bytes]}")


# ----------------------------------------------------------------------------------------------
# Pre-training: the three objectives.
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_costs():
  """{objective: (1-device cost, 8-device cost)} of the pre-training step."""
  out = {}
  for objective in train.OBJECTIVES:
    config = _train_config(objective)
    state = jax.eval_shape(lambda c=config: train.init_train_state(c, jax.random.PRNGKey(0)))
    batch = {"labelled_images": _images(LABELLED), "labels": _labels(LABELLED),
             "unlabelled_images": _images(UNLABELLED), "unlabelled_labels": _labels(UNLABELLED)}
    shardings = lambda mesh, s=state: train.train_state_shardings(s, mesh)
    out[objective] = _both(functools.partial(train.train_step, config),
                           (state, batch, jax.random.PRNGKey(0)),
                           (shardings, _data, None), (shardings, None))
    out[objective] += (state,)
  return out


@pytest.mark.slow  # Compiles the step of every objective twice (about a minute).
@pytest.mark.parametrize("objective", list(train.OBJECTIVES))
def test_train_step_flops_scale_with_devices(train_costs, objective):
  one, many, _ = train_costs[objective]
  _assert_scales(one, many, f"train_step[{objective}]")


@pytest.mark.slow  # Compiles the step of every objective twice (about a minute).
@pytest.mark.parametrize("objective", list(train.OBJECTIVES))
def test_train_step_gathers_no_images_or_activations(train_costs, objective):
  config = _train_config(objective)
  views = config.views.num_large + config.views.num_small
  # The loss compares every row with every other row's target projection, and kNN scores the
  # gathered queries against each queue shard: [V, B, D] float32 projections at most.
  bound = views * config.batch_size * config.network.projection_size * 4
  # One view of the batch's images (float32) is larger, and so is any encoder activation.
  images = config.batch_size * config.views.small_size ** 2 * 3 * 4
  assert bound < images  # Else the bound would not catch a gathered view.
  _, many, _ = train_costs[objective]
  _assert_gathers_at_most(many, bound, f"train_step[{objective}]")


@pytest.mark.slow  # Compiles the step of every objective twice (about a minute).
@pytest.mark.parametrize("objective", list(train.OBJECTIVES))
def test_train_step_all_reduces_gradients(train_costs, objective):
  one, many, state = train_costs[objective]
  assert one.count("all-reduce") == 0
  # The encoder's gradient is summed over devices (plus the heads' where the objective trains
  # them, BatchNorm statistics, metrics and the probe's gradient).
  encoder = {k: v for k, v in state.online_params.items()
             if not k.startswith(("projector", "predictor"))}
  param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(encoder))
  reduced = sum(c.bytes for c in many.collectives if c.op == "all-reduce")
  assert reduced >= param_bytes, (reduced, param_bytes)


# ----------------------------------------------------------------------------------------------
# Fine-tune / linear steps and the embedding programs of evaluation.
# ----------------------------------------------------------------------------------------------

_NETWORK = train.NetworkConfig(encoder="tiny_resnet", small_images=True)
_BATCH = 128


def _finetune_costs(protocol):
  config = finetune.FineTuneConfig(protocol=protocol, num_classes=4, network=_NETWORK,
                                   batch_size=_BATCH, training_steps=10, crop_size=12)
  params, enc_state = jax.eval_shape(
      lambda: finetune.encoder(_NETWORK).init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, 12, 12, 3)), True))
  state = jax.eval_shape(lambda: finetune.init_state(config, params, enc_state,
                                                     jax.random.PRNGKey(1)))
  return _both(functools.partial(finetune.train_step, config),
               (state, _images(_BATCH), _labels(_BATCH), jax.random.PRNGKey(0),
                jax.ShapeDtypeStruct((), jnp.int32)),
               (_replicated, _data, _data, None, None), (_replicated, None))


@pytest.mark.parametrize("protocol", list(finetune.PROTOCOLS))
def test_finetune_step_flops_scale_with_devices(protocol):
  one, many = _finetune_costs(protocol)
  _assert_scales(one, many, f"finetune.train_step[{protocol}]")
  width = 64  # Generous: the tiny ResNet's embedding is narrower; a view is 12*12*3 > 64.
  _assert_gathers_at_most(many, _BATCH * width * 4, f"finetune.train_step[{protocol}]")


def _embedder_cost(forward, weights, num_devices, image_size=None):
  """Per-device cost of ``encoders.make_embedder`` (the programs both experiments and the
  labelling CLI embed with) on the first ``num_devices`` devices."""
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  fn = encoders.make_embedder(forward, mesh, image_size=image_size)
  with jax.set_mesh(mesh):
    return compiled_cost.program_cost(fn.lower(weights, _images(_BATCH)).compile())


def test_embedding_programs_flops_scale_with_devices():
  """The encoder alone (evaluation, labelling) and the pre-training experiment's forward
  (online network + probe), each through ``encoders.make_embedder``."""
  forward = encoders.encoder_forward(_NETWORK.encoder, small_images=True)
  weights = jax.eval_shape(lambda: finetune.encoder(_NETWORK).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3)), True))
  one, many = (_embedder_cost(forward, weights, n, image_size=12) for n in (1, DEVICES))
  _assert_scales(one, many, "encoder embedding")
  assert many.count("all-gather") == 0, many.collectives

  config = _train_config("semppl")
  nets = train.build_networks(config.network, config.num_classes)
  state = jax.eval_shape(lambda: train.init_train_state(config, jax.random.PRNGKey(0)))

  def online_forward(weights, views):
    params, net_state, probe_params = weights
    (embedding, _, prediction), _ = nets.online.apply(params, net_state, None, views, False)
    return (losses.l2_normalize(embedding), losses.l2_normalize(prediction),
            nets.probe.apply(probe_params, None, embedding))

  weights = (state.online_params, state.online_state, state.probe_params)
  one, many = (_embedder_cost(online_forward, weights, n) for n in (1, DEVICES))
  _assert_scales(one, many, "pre-training embedding")
  assert many.count("all-gather") == 0, many.collectives


# ----------------------------------------------------------------------------------------------
# The measuring tool itself.
# ----------------------------------------------------------------------------------------------

def test_program_cost_sees_a_replicated_program_and_its_gather():
  """A program that gathers a sharded batch and then works on all of it: the ratio check and
  the gather bound must both fail on it (so the tests above can fail)."""
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((256, 256), jnp.float32)

  def replicated_work(x, w):
    x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())  # all-gather
    return jnp.tanh(x @ w) @ w

  one, many = _both(replicated_work, (x, w), (_data, _replicated), _replicated)
  assert many.flops / one.flops > 0.9
  assert many.largest("all-gather") == 64 * 256 * 4
  with pytest.raises(AssertionError, match="replicated, not sharded"):
    _assert_scales(one, many, "replicated_work")
  with pytest.raises(AssertionError, match="images or activations are gathered"):
    _assert_gathers_at_most(many, 1024, "replicated_work")

  def sharded_work(x, w):
    return jnp.tanh(x @ w) @ w

  one, many = _both(sharded_work, (x, w), (_data, _replicated), _data)
  np.testing.assert_allclose(many.flops / one.flops, 1 / DEVICES, rtol=0.05)
  assert many.collectives == ()


def test_collectives_parses_async_and_tuple_results():
  text = "\n".join([
      "  %ag = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}",
      "  %ars = (f32[3]{0}, bf16[2,2]{1,0}) all-reduce-start(f32[3]{0} %a, bf16[2,2]{1,0} %b)",
      "  %ard = (f32[3]{0}, bf16[2,2]{1,0}) all-reduce-done(%ars)",
      "  %ags = (f32[1,4]{1,0}, f32[8,4]{1,0}) all-gather-start(f32[1,4]{1,0} %q)",
      "  %add = f32[3]{0} add(%x, %y)",
  ])
  found = compiled_cost.collectives(text)
  assert [(c.op, c.bytes) for c in found] == [
      ("all-gather", 128), ("all-reduce", 12 + 8), ("all-gather", 128)]

