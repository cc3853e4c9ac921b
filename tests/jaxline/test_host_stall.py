"""No host stall in the steady state: the training loop fetches nothing from the devices except
at log lines (and in the periodic actions jaxline runs at its own log intervals).

The loop runs under ``jax.transfer_guard_device_to_host('disallow')``. On GPU and TPU that guard
fails any device-to-host copy; on CPU jax arrays already live in host memory, so jax never sees
a transfer and the guard is silent. The ``device_to_host_guard`` fixture therefore makes it
bite on CPU too: every read of an array's host value (``float``, ``int``, ``.item()``,
``.tolist()``, ``jax.device_get``, ``np.asarray`` / ``np.array``) raises while the effective
guard is 'disallow'. Code that fetches on purpose says so with
``jax.transfer_guard_device_to_host('allow')``, as the loop does at its log lines.
"""
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array as jax_array
from jax._src import config as jax_config
from jaxline import utils as jaxline_utils

from semppl_jax.jaxline import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "configs"))
import tiny_fashion_mnist  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position


class HostFetchError(RuntimeError):
  """A device array was read on the host while the device-to-host guard said 'disallow'."""


@pytest.fixture
def device_to_host_guard(monkeypatch):
  """Makes ``transfer_guard_device_to_host('disallow')`` fail host reads on CPU as well."""
  def check(x):
    if (isinstance(x, jax.Array)
        and jax_config.transfer_guard_device_to_host.value == "disallow"):
      raise HostFetchError(f"device-to-host fetch of an array of shape {x.shape} under "
                           "jax.transfer_guard_device_to_host('disallow')")

  def guard(fn):
    def guarded(x, *args, **kwargs):
      check(x)
      return fn(x, *args, **kwargs)
    return guarded

  value = jax_array.ArrayImpl._value  # pylint: disable=protected-access
  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(guard(value.fget)))
  monkeypatch.setattr(jax_array.ArrayImpl, "item", guard(jax_array.ArrayImpl.item))
  # CPU arrays also export the buffer protocol, which numpy reads without calling Python.
  for name in ("asarray", "array", "asanyarray"):
    monkeypatch.setattr(np, name, guard(getattr(np, name)))


def test_guard_catches_stray_fetches(device_to_host_guard):
  del device_to_host_guard
  x = jax.jit(lambda a: a + 1.0)(jnp.zeros(()))
  for fetch in (float, int, lambda a: a.item(), lambda a: a.tolist(), np.asarray,
                jax.device_get):
    with jax.transfer_guard_device_to_host("disallow"):
      with pytest.raises(HostFetchError):
        fetch(x)
  with jax.transfer_guard_device_to_host("disallow"):
    with jax.transfer_guard_device_to_host("allow"):
      assert float(x) == 1.0


def _tiny_configs(steps, log_every, run_dir):
  """(jaxline launch config, experiment config) of the tiny test config."""
  config = tiny_fashion_mnist.get_config()
  config.training_steps = steps
  config.checkpoint_dir = str(run_dir)
  c = config.experiment_kwargs.config
  c.training_steps = steps
  c.log_every_steps = log_every
  c.evaluate_at_end = False
  return config, c


@pytest.mark.slow
def test_training_loop_fetches_only_at_log_steps(device_to_host_guard, capsys, tmp_path):
  """Seven steps (compile step included) with log lines every 3 steps and a jaxline periodic
  action every 3 steps: any other fetch of metrics, state or batch raises HostFetchError."""
  del device_to_host_guard
  steps, log_every = 7, 3
  loop_config, config = _tiny_configs(steps, log_every, tmp_path)
  exp = experiment.Experiment("train", jax.random.PRNGKey(0), config)
  fetched_at = []

  def write_scalars(step, scalars):
    del scalars  # Fetched by PeriodicAction (jax.device_get) right before this call.
    fetched_at.append(step)

  # jaxline's own PeriodicAction, as jaxline builds its writer and _log_outputs actions. In a
  # real run it fetches in a background thread, outside this thread's guard; here it runs
  # synchronously with fetches allowed, and `fetched_at` records when it fetched.
  periodic = jaxline_utils.PeriodicAction(write_scalars, interval_type="steps",
                                          interval=log_every, run_async=False)
  periodic.update_time(0.0, 0)

  def action(t, step, metrics):
    with jax.transfer_guard_device_to_host("allow"):
      periodic(t, step, metrics)

  state = types.SimpleNamespace(global_step=0)
  with jax.transfer_guard_device_to_host("disallow"):
    exp.train_loop(loop_config, state, [action])
  assert state.global_step == steps
  assert fetched_at == [3, 6]
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[train]")]
  # Log lines: the compile step, every log_every steps, the last step.
  assert [line.split()[2] for line in lines] == ["1/7", "3/7", "6/7", "7/7"]


@pytest.mark.slow
def test_next_batch_is_prefetched_while_the_step_runs(tmp_path):
  _, config = _tiny_configs(steps=3, log_every=10, run_dir=tmp_path)
  exp = experiment.Experiment("train", jax.random.PRNGKey(0), config)
  exp.step(global_step=0, rng=None)
  prefetched_step, batch = exp._prefetched  # pylint: disable=protected-access
  assert prefetched_step == 1
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(batch))
  assert exp._global_batch(1) is batch  # pylint: disable=protected-access
  exp.step(global_step=1, rng=None)
  exp.step(global_step=2, rng=None)
  assert exp._prefetched is None  # pylint: disable=protected-access  # Nothing after the last.
