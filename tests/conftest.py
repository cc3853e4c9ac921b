"""Test-wide setup: 8 fake CPU devices (set before jax is imported), quiet TensorFlow, and a
persistent JAX compilation cache.

The cache lives in ``.pytest_cache/jax_compilation_cache`` (git-ignored with the rest of
``.pytest_cache``): a second run of the same tests loads the compiled XLA programs instead of
compiling them again. Entries are keyed by the program, the devices and the jax version, so
changed code simply misses; a damaged or half-written entry (two xdist workers share the folder)
is reported by jax as a warning and recompiled. The folder is emptied at the start of a session
once it holds more than ``_CACHE_MAX_BYTES``; delete it to start cold.

The processes the e2e tests start (launcher, scripts, notebook kernels) share the cache through
jax's environment variables: most launches compile a program an earlier launch already compiled
(the same tiny config on the same devices: the fault-injection, multi-process and resume tests
relaunch it again and again), and loading it instead cuts a tiny launch's CPU time by more than
half (52 -> 21 CPU-s measured). What a launch computes does not change: a hit loads the very
executable the first compile produced, and the bit-identity tests compare runs across such
loads. Multi-process launches drop it (tests/test_multiprocess.py says why).
``SEMPPL_TEST_JAX_CACHE=0`` switches the cache off for both.
"""
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after XLA_FLAGS: the device count is read when jax starts)

# The checkout's root: tests import the launchable configs and tools of experiments/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

_CACHE_DIR = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")
_CACHE_MAX_BYTES = 2 * 1024**3
_CACHE_ON = os.environ.get("SEMPPL_TEST_JAX_CACHE", "1") != "0"


def _folder_bytes(path):
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def pytest_configure(config):
  if not _CACHE_ON:
    return
  # Only the controlling process trims (never an xdist worker, which could race its siblings).
  if not hasattr(config, "workerinput") and os.path.isdir(_CACHE_DIR):
    if _folder_bytes(_CACHE_DIR) > _CACHE_MAX_BYTES:
      shutil.rmtree(_CACHE_DIR, ignore_errors=True)
  os.makedirs(_CACHE_DIR, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
  # Cache every program that takes a tenth of a second to compile (the default is 1 s, which
  # would leave out most of the small jitted functions the unit tests compile).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # The same settings for the processes the tests start: jax reads each option from the
  # environment variable of its upper-cased name, and every launch helper builds its
  # environment from os.environ.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_collection_modifyitems(config, items):
  """Under xdist, the files in ``suite_order``'s order (heaviest first; each file's tests keep
  their order); a serial run keeps pytest's order."""
  if not hasattr(config, "workerinput"):
    return
  import suite_order  # pylint: disable=g-import-not-at-top  (tests/ is on sys.path)
  position = {nodeid: i for i, nodeid in enumerate(
      suite_order.heavy_files_first([item.nodeid for item in items]))}
  items.sort(key=lambda item: position[item.nodeid])
