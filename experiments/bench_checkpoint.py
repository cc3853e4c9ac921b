"""How long a checkpoint save blocks training: synchronous vs asynchronous saves (issue #20).

Saves a state with a large queue (``L x Q x D`` float32 embeddings + int32 labels, as
``semppl_jax.queue.Queue``, plus a few MiB of "parameters") through the jaxline checkpointer
(``checkpointing.OrbaxCheckpointer``) the way pre-training does: the experiment's
``snapshot_state`` copies every array on the device first (the next step donates the state's
buffers), then ``save`` writes it with Orbax and the checksum manifest.

Reported per mode (median of ``--repeats`` saves, each after the previous one has finished, as
when saves are many steps apart):

* ``blocking``: the time ``save`` keeps the training thread (sync: everything; async: the
  device copy and Orbax's host copy);
* ``background``: async only, from ``save`` returning until ``wait_for_checkpointing_to_finish``
  returns (Orbax's write and commit, then the manifest's SHA-256 of every file);
* ``total``: the two together;
* ``manifest``: of these, the checksum manifest alone (:func:`checkpointing.write_manifest` of
  the last checkpoint, rewritten once more), which the synchronous save also does in line.

Usage:
  python experiments/bench_checkpoint.py                          # L=2, Q=2^18, D=128 (256 MiB)
  python experiments/bench_checkpoint.py --queue-size 1048576 --dim 128   # the paper's queue
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from semppl_jax import checkpointing  # pylint: disable=g-import-not-at-top


class _Module:
  """What the checkpointer needs of an experiment: a state whose snapshot is a device copy."""

  def __init__(self, num_queues: int, queue_size: int, dim: int):
    rng = np.random.RandomState(0)
    self.state = {
        "queue": {"embeddings": jnp.asarray(rng.randn(num_queues, queue_size, dim),
                                            jnp.float32),
                  "labels": jnp.asarray(rng.randint(0, 1000, (num_queues, queue_size)),
                                        jnp.int32),
                  "position": jnp.zeros((), jnp.int32)},
        "params": jnp.asarray(rng.randn(1 << 20), jnp.float32)}

  def snapshot_state(self):
    # As MeshExperiment.snapshot_state: copies, since the next step donates the buffers.
    return {"train_state": jax.tree_util.tree_map(jnp.copy, self.state)}

  def restore_from_snapshot(self, snapshot):
    self.state = snapshot["train_state"]


def measure(save_async: bool, module: _Module, directory: str, repeats: int) -> dict:
  """Seconds per save: lists of blocking / background / total times, and one manifest time."""
  ckpt = checkpointing.OrbaxCheckpointer(directory, max_to_keep=2, save_async=save_async)
  state = ckpt.get_experiment_state("latest")
  state.experiment_module = module
  times = {"blocking": [], "background": [], "total": [], "manifest": []}
  for step in range(repeats + 1):  # The first save (Orbax's set-up) is not counted.
    state.global_step = step
    t0 = time.perf_counter()
    ckpt.save("latest")
    t1 = time.perf_counter()
    ckpt.wait_for_checkpointing_to_finish()
    t2 = time.perf_counter()
    if step:
      times["blocking"].append(t1 - t0)
      times["background"].append(t2 - t1)
      times["total"].append(t2 - t0)
  ckpt.close()
  t0 = time.perf_counter()
  checkpointing.write_manifest(os.path.join(directory, "latest", str(repeats)))
  times["manifest"].append(time.perf_counter() - t0)
  return times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-queues", type=int, default=2)
  parser.add_argument("--queue-size", type=int, default=1 << 18)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
  args = parser.parse_args(argv)
  module = _Module(args.num_queues, args.queue_size, args.dim)
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves(module.state))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; state {size / 2**20:.0f} MiB "
        f"(queue {args.num_queues} x {args.queue_size} x {args.dim} float32 + labels, 4 MiB "
        f"params); median of {args.repeats} saves")
  print("| mode | blocking s | background s | total s | of which manifest s |\n"
        "|---|---|---|---|---|")
  for save_async in (False, True):
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
      times = measure(save_async, module, directory, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    background = f"{med['background']:.3f}" if save_async else "-"
    print(f"| {'async' if save_async else 'sync'} | {med['blocking']:.3f} | {background} | "
          f"{med['total']:.3f} | {med['manifest']:.3f} |")


if __name__ == "__main__":
  main()
