"""What the non-finite guard costs in the compiled pre-training step (issue #20).

Compiles (ahead of time, nothing is allocated) the SemPPL step of a tiny network with a large
queue, so that the queue dominates the state, with the state donated as the experiment does,
in three variants:

* ``guard``: ``train.train_step`` as it is (the guard checks the items enqueued this step, and
  the enqueue runs after its decision, in place);
* ``guard_queue_in_cond``: the enqueue before the guard, the updated queue chosen by the
  guard's conditional (the step before round five of issue #20);
* ``guard_whole_queue``: the guard re-reading the whole updated queue (what it did before
  issue #20, also ``enqueued=None``);
* ``no_guard``: the updated state returned as it is (the lower bound).

For each: bytes accessed by the program and its temporaries (``compiled_cost.program_cost``),
both in units of one queue (``L x Q x D`` float32), the number of copies of the queue in the
optimised HLO, the HLO's size and the compile time.

Usage:
  python experiments/bench_guard.py                    # Q = 65536, D = 64, L = 2
  python experiments/bench_guard.py --queue-size 16384
"""
import argparse
import functools
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from semppl_jax import compiled_cost  # pylint: disable=g-import-not-at-top
from semppl_jax import nonfinite_guard  # pylint: disable=g-import-not-at-top
from semppl_jax import train  # pylint: disable=g-import-not-at-top

DIM = 64


def _config(queue_size: int) -> train.TrainConfig:
  return train.TrainConfig(
      objective="semppl", num_classes=4, labelled_batch_size=8, unlabelled_batch_size=8,
      queue_size=queue_size, training_steps=10, num_shards=1,
      views=train.ViewConfig(num_large=2, num_small=1, large_size=12, small_size=8,
                             large_scale=(0.5, 1.0), small_scale=(0.3, 0.6)),
      network=train.NetworkConfig(encoder="tiny_resnet", small_images=True,
                                  projector_hidden_size=32, projection_size=DIM,
                                  predictor_hidden_size=32),
      optim=train.OptimConfig(base_learning_rate=1.0, warmup_steps=2))


def _variants():
  guard = nonfinite_guard.guard_nonfinite
  # train_step passes its enqueue as update_queue (run after the decision); the other variants
  # enqueue first, as the step did before, and put the updated queue into new_state.
  enqueued_first = lambda n, update_queue: (
      n if update_queue is None else n._replace(queue=update_queue(True)))
  return {
      "guard": guard,
      "guard_queue_in_cond": lambda s, n, m, enqueued=None, update_queue=None: guard(
          s, enqueued_first(n, update_queue), m, enqueued=enqueued),
      "guard_whole_queue": lambda s, n, m, enqueued=None, update_queue=None: guard(
          s, enqueued_first(n, update_queue), m),
      "no_guard": lambda s, n, m, enqueued=None, update_queue=None: enqueued_first(
          n, update_queue),
  }


def measure(queue_size: int) -> list:
  """One row per variant: name, bytes and temporaries (in queues), queue copies, HLO lines,
  compile seconds."""
  config = _config(queue_size)
  state = jax.eval_shape(lambda: train.init_train_state(config, jax.random.PRNGKey(0)))
  images = jax.ShapeDtypeStruct((8, 16, 16, 1), jnp.uint8)
  labels = jax.ShapeDtypeStruct((8,), jnp.int32)
  batch = {"labelled_images": images, "labels": labels, "unlabelled_images": images,
           "unlabelled_labels": labels}
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  queue_bytes = state.queue.embeddings.size * 4
  queue_type = re.escape(f"f32[{','.join(map(str, state.queue.embeddings.shape))}]")
  copy = re.compile(r"= " + queue_type + r"(\{[^}]*\})? copy(-start)?\(")
  rows, original = [], nonfinite_guard.guard_nonfinite
  try:
    for name, guard in _variants().items():
      nonfinite_guard.guard_nonfinite = guard
      t0 = time.time()
      compiled = jax.jit(functools.partial(train.train_step, config), donate_argnums=0).lower(
          state, batch, key).compile()
      seconds = time.time() - t0
      cost = compiled_cost.program_cost(compiled)
      hlo = compiled.as_text()
      rows.append((name, cost.bytes_accessed / queue_bytes, cost.temp_bytes / queue_bytes,
                   len(copy.findall(hlo)), len(hlo.splitlines()), seconds))
  finally:
    nonfinite_guard.guard_nonfinite = original
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--queue-size", type=int, default=65536)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; queue 2 x {args.queue_size} x "
        f"{DIM} float32 = {2 * args.queue_size * DIM * 4 / 2**20:.0f} MiB")
  print("| variant | bytes accessed (queues) | temporaries (queues) | queue copies | HLO lines "
        "| compile s |\n|---|---|---|---|---|---|")
  for name, accessed, temp, copies, lines, seconds in measure(args.queue_size):
    print(f"| {name} | {accessed:.2f} | {temp:.2f} | {copies} | {lines} | {seconds:.0f} |")


if __name__ == "__main__":
  main()
