"""jaxline 0.0.8 runs on current JAX once semppl_jax.jaxline.compat.install() has run."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from semppl_jax.jaxline import compat as jaxline_compat

_DUMMY_LAUNCHER = textwrap.dedent('''
    import functools, sys
    from absl import app
    import jax, jax.numpy as jnp, numpy as np
    from semppl_jax.jaxline import compat as jaxline_compat
    jaxline_compat.install()
    from jaxline import base_config, experiment, platform

    class Dummy(experiment.AbstractExperiment):
      CHECKPOINT_ATTRS = {}
      NON_BROADCAST_CHECKPOINT_ATTRS = {"_w": "w"}

      def __init__(self, mode, init_rng, config=None):
        super().__init__(mode=mode, init_rng=init_rng)
        self._w = jnp.zeros(())

      def step(self, global_step, rng, writer=None):
        # The default jaxline loop passes per-device step and rng arrays.
        assert global_step.shape == (jax.local_device_count(),), global_step.shape
        self._w = self._w + 1.0
        return {"w": self._w}

      def evaluate(self, global_step, rng, writer=None):
        return {"w": self._w}

    def get_config():
      config = base_config.get_base_config()
      config.training_steps = 3
      config.interval_type = "steps"
      config.log_train_data_interval = 1
      config.log_tensors_interval = 1
      config.save_checkpoint_interval = 1
      config.checkpoint_dir = sys.argv[-1]
      config.experiment_kwargs = dict(config={})
      return config

    def main(argv):
      platform.main(Dummy, argv)
      from jaxline import utils
      state = utils.GLOBAL_CHECKPOINT_DICT["latest"].history[-1].pickle_nest
      print("FINAL", state.global_step, float(state.experiment_module["w"]))

    if __name__ == "__main__":
      app.run(main, argv=[sys.argv[0], f"--config={__file__}"])
''')


def test_install_restores_removed_names():
  jaxline_compat.install()
  jaxline_compat.install()  # idempotent
  tree = jax.tree_map(lambda x: x + 1, {"a": 1})
  assert tree == {"a": 2}
  devices = jax.local_devices()
  x = jax.device_put_sharded([np.full((2,), i, np.float32) for i in range(len(devices))], devices)
  assert x.shape == (len(devices), 2)
  np.testing.assert_array_equal(np.asarray(x)[:, 0], np.arange(len(devices)))
  r = jax.device_put_replicated(np.arange(3), devices)
  np.testing.assert_array_equal(np.asarray(r), np.tile(np.arange(3), (len(devices), 1)))


@pytest.mark.e2e
def test_dummy_experiment_trains_through_jaxline_platform(tmp_path):
  script = tmp_path / "dummy_launch.py"
  script.write_text(_DUMMY_LAUNCHER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "FINAL 3 3.0" in out.stdout, out.stdout[-2000:]
