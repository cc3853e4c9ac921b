"""Host input pipeline throughput on mock ImageNet JPEGs, one pinned CPU core (issue #20).

Usage:
  TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python experiments/bench_input.py [--images=768] [--batch=64]
      [--core=0] [--distinct=64] [--height=375] [--width=500] [--quality=90]

Writes `--distinct` mock JPEGs (smooth random colour fields plus pixel noise, ~ImageNet's
typical 500 x 375, JPEG quality 90) to a temporary directory and runs, in one process pinned to
one core (`os.sched_setaffinity`; TensorFlow's intra/inter-op pools and tf.data's private pool
at 1 thread), these pipelines over `--images` images each (after one warm-up batch):

  decode     read + `pipelines.decode_full` + batch (the floor);
  old        `pipelines.semi_supervised_dataset` with `MultiCrop(antialias=True)`: read, decode,
             4 x 224 + 2 x 96 random-resized crops with the antialiased float32 bicubic resize
             (the pipeline before issue #20);
  new        the same with the default `MultiCrop()` (bicubic without antialiasing).

`old` and `new` are the function the ImageNet and image-folder training paths run (labelled and
unlabelled streams of `--batch // 2` images each, zipped). It prints images per CPU-second
(process CPU time, all threads: the throughput one busy core gives) and per wall-second.
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mock_jpegs(directory, count, height, width, quality, seed=0):
  """Writes `count` JPEGs: smooth random colour fields (bicubic-upsampled 25 px noise) with
  per-pixel noise, so the DCT has natural-image-like content. Returns their paths."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    coarse = rng.normal(size=(1, height // 25 + 2, width // 25 + 2, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, [height, width], method="bicubic")[0].numpy()
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 220 + 15
    image = np.clip(smooth + rng.normal(scale=12.0, size=smooth.shape), 0, 255)
    path = os.path.join(directory, f"mock_{i:05d}.jpg")
    tf.io.write_file(path, tf.io.encode_jpeg(image.astype(np.uint8), quality=quality))
    paths.append(path)
  return paths


def single_core_options():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return options


def measure(ds, batches, batch):
  """Iterates one warm-up batch, then `batches` timed ones; returns (images/CPU-s, images/s)."""
  it = iter(ds)
  next(it)
  cpu, wall = time.process_time(), time.perf_counter()
  for _ in range(batches):
    next(it)
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  return batches * batch / cpu, batches * batch / wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=768, help="timed images per pipeline")
  parser.add_argument("--batch", type=int, default=64,
                      help="host batch (even: half labelled, half unlabelled)")
  parser.add_argument("--core", type=int, default=0, help="the CPU core to pin to")
  parser.add_argument("--distinct", type=int, default=64, help="distinct mock JPEGs")
  parser.add_argument("--height", type=int, default=375)
  parser.add_argument("--width", type=int, default=500)
  parser.add_argument("--quality", type=int, default=90)
  args = parser.parse_args()
  if args.batch < 2 or args.batch % 2:
    parser.error(f"--batch must be an even number >= 2, got {args.batch}")
  # Pin before TensorFlow starts its thread pools.
  os.sched_setaffinity(0, {args.core})
  sys.path.insert(0, ROOT)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  from semppl_jax.data import pipelines  # pylint: disable=g-import-not-at-top

  batches = max(1, args.images // args.batch)
  half = args.batch // 2
  with tempfile.TemporaryDirectory() as tmp:
    paths = mock_jpegs(tmp, args.distinct, args.height, args.width, args.quality)
    size = sum(os.path.getsize(p) for p in paths) / len(paths)
    records = tf.data.Dataset.from_tensor_slices((paths, tf.zeros([len(paths)], tf.int64)))

    def decode(path):
      return pipelines.decode_full(tf.io.read_file(path))

    def train(crops):
      ds = pipelines.semi_supervised_dataset(
          records, len(paths), records, len(paths), decode_fn=decode, crops=crops.check(),
          labelled_batch_size=half, unlabelled_batch_size=half, seed=0, start_step=0,
          shuffle_buffer=len(paths), process_index=0)
      return ds.with_options(single_core_options())

    decode_only = (records.repeat().map(lambda path, label: decode(path))
                   .batch(args.batch).with_options(single_core_options()))
    rows = [("decode", "read + decode_full + batch", decode_only),
            ("old", "4x224 + 2x96 crops, antialiased bicubic (float32)",
             train(pipelines.MultiCrop(antialias=True))),
            ("new", "4x224 + 2x96 crops, bicubic, no antialias (float32)",
             train(pipelines.MultiCrop()))]
    print(f"core {args.core} (affinity {sorted(os.sched_getaffinity(0))}), TF "
          f"{tf.__version__}, {args.distinct} mock JPEGs {args.width}x{args.height} "
          f"q{args.quality} (mean {size / 1024:.0f} KiB), batch {args.batch}, "
          f"{batches * args.batch} timed images per row")
    print(f"| {'pipeline':8s} | {'what':54s} | images / CPU-s | images / wall-s |")
    print(f"|{'-' * 10}|{'-' * 56}|---------------:|----------------:|")
    for name, what, ds in rows:
      per_cpu, per_wall = measure(ds, batches, args.batch)
      print(f"| {name:8s} | {what:54s} | {per_cpu:14.1f} | {per_wall:15.1f} |", flush=True)


if __name__ == "__main__":
  main()
