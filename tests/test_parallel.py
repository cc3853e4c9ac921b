"""Tests for semppl_jax.parallel, including a real 2-process (multi-host) run on CPU."""
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from semppl_jax import parallel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_mesh_and_shardings():
  mesh = parallel.make_mesh()
  assert isinstance(mesh, jax.sharding.Mesh)
  assert mesh.axis_names == ("data",)
  assert mesh.shape["data"] == len(jax.devices()) == 8
  assert list(mesh.devices) == jax.devices()
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)

  sub = parallel.make_mesh(jax.devices()[:2])
  assert sub.shape["data"] == 2
  with pytest.raises(ValueError, match="devices"):
    parallel.make_mesh([])

  assert parallel.data_sharding(mesh).spec == P("data")
  assert parallel.data_sharding(mesh).mesh == mesh
  assert parallel.replicated_sharding(mesh).spec == P()
  assert parallel.replicated_sharding(mesh).is_fully_replicated


def test_ambient_data_axis_size():
  mesh = parallel.make_mesh()
  assert parallel.ambient_data_axis_size() == 1
  seen = []

  def body(x):
    seen.append(parallel.ambient_data_axis_size())
    return x

  with jax.set_mesh(mesh):
    assert parallel.ambient_data_axis_size() == 8
    jax.jit(lambda x: (seen.append(parallel.ambient_data_axis_size()), x)[1])(jnp.zeros(8))
    jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P("data"))(jnp.zeros(8))
  assert seen == [8, 1]  # Inside shard_map the axis is manual: run the local computation.


def test_host_local_round_trip_single_process():
  mesh = parallel.make_mesh()
  tree = {"images": np.arange(16 * 3, dtype=np.float32).reshape(16, 3),
          "labels": np.arange(16, dtype=np.int32)}
  global_tree = parallel.host_local_to_global(tree, mesh)
  for name, leaf in global_tree.items():
    assert isinstance(leaf, jax.Array)
    assert leaf.shape == tree[name].shape and leaf.dtype == tree[name].dtype
    assert leaf.sharding.spec == P("data")
    assert leaf.addressable_shards[1].data.shape[0] == 2
    np.testing.assert_array_equal(leaf, tree[name])
  back = parallel.global_to_host_local(global_tree)
  for name in tree:
    assert isinstance(back[name], np.ndarray)
    np.testing.assert_array_equal(back[name], tree[name])

  replicated = jax.device_put(jnp.arange(5), parallel.replicated_sharding(mesh))
  np.testing.assert_array_equal(parallel.global_to_host_local(replicated), np.arange(5))
  np.testing.assert_array_equal(parallel.global_to_host_local([1, 2]), [1, 2])

  with pytest.raises(ValueError, match="multiple of the 8 local devices"):
    parallel.host_local_to_global(np.zeros((6, 2)), mesh)


def test_initialize_distributed_single_process_and_bad_input():
  parallel.initialize_distributed("", 1, 0)  # No-op: nothing to connect.
  parallel.initialize_distributed("localhost:1234", 1, 0)
  assert not jax.distributed.is_initialized()
  with pytest.raises(ValueError, match="num_processes"):
    parallel.initialize_distributed("localhost:1234", 0, 0)
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="coordinator_address"):
    parallel.initialize_distributed("", 2, 0)
  with pytest.raises(ValueError, match="process_id"):
    parallel.initialize_distributed("localhost:1234", 2, None)
  for name in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
    with pytest.raises(ValueError, match=name):
      parallel.initialize_distributed("localhost:1234", 2, 0, **{name: 0})
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("value,devices,processes", [
    (0, 8, 2), (16, 8, 2), (24, 8, 1), (12, 4, 2), (12, 6, 4)])
def test_check_batch_divisible_accepts_multiples(value, devices, processes):
  parallel.check_batch_divisible("data.labelled_batch_size", value, devices, processes)


@pytest.mark.parametrize("value,devices,processes,multiple", [
    (12, 8, 2, 8),    # not a multiple of the devices
    (9, 3, 2, 6),     # uneven devices per process: a multiple of 3 but not of 2
    (6, 2, 4, 4),     # more processes than devices: each process still needs rows
])
def test_check_batch_divisible_names_field_counts_and_multiple(value, devices, processes,
                                                               multiple):
  with pytest.raises(ValueError) as info:
    parallel.check_batch_divisible("evaluation.batch_size", value, devices, processes)
  message = str(info.value)
  assert message.startswith(f"config.evaluation.batch_size: {value} is not divisible")
  assert f"devices ({devices})" in message and f"processes ({processes})" in message
  assert f"use a multiple of {multiple}" in message


def test_check_batch_divisible_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r"config.data.batch_size: must be an int >= 0"):
    parallel.check_batch_divisible("data.batch_size", -8, 8, 1)
  with pytest.raises(ValueError, match="num_devices"):
    parallel.check_batch_divisible("data.batch_size", 8, 0, 1)
  with pytest.raises(ValueError, match="num_processes"):
    parallel.check_batch_divisible("data.batch_size", 8, 8, True)


WORKER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from semppl_jax import knn, parallel

    process_id, port = int(sys.argv[1]), sys.argv[2]
    parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
    parallel.initialize_distributed(f"localhost:{port}", 2, process_id)  # Idempotent.
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    assert len(jax.local_devices()) == 2
    mesh = parallel.make_mesh()

    # Both processes know the full data (same seed) but only feed their own half.
    rng = np.random.default_rng(0)
    batch, size, dim, classes = 8, 32, 4, 3
    queries = rng.integers(-1, 2, size=(batch, dim)).astype(np.float32)
    keys = rng.integers(-1, 2, size=(size, dim)).astype(np.float32)
    labels = rng.integers(-1, classes, size=size).astype(np.int32)
    mine = lambda x: np.split(x, 2)[process_id]
    arrays = parallel.host_local_to_global(
        {"queries": mine(queries), "keys": mine(keys), "labels": mine(labels)}, mesh)
    assert arrays["keys"].shape == (size, dim)
    assert not arrays["keys"].is_fully_addressable

    with jax.set_mesh(mesh):
      votes = jax.jit(lambda q, e, l: knn.knn_vote(q, e, l, k=3, num_classes=classes))(
          arrays["queries"], arrays["keys"], arrays["labels"])

    # Plain numpy reference over the full data: top 3 valid by (-score, index), majority.
    expected = []
    for q in queries:
      scores = keys @ q
      order = sorted(np.flatnonzero(labels >= 0), key=lambda j: (-scores[j], j))[:3]
      counts = np.bincount(labels[order], minlength=classes)
      sums = np.bincount(labels[order], weights=scores[order], minlength=classes)
      # Most votes, then the largest summed similarity, then the smallest label.
      expected.append(min(range(classes), key=lambda c: (-counts[c], -sums[c], c)))
    local = parallel.global_to_host_local(arrays)
    assert np.array_equal(local["keys"], mine(keys))
    got = parallel.global_to_host_local(votes).tolist()
    print("RESULT", process_id, got == expected, got, flush=True)
""")


def _free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@pytest.mark.e2e
def test_two_processes_sharded_knn_vote(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # Multi-process: see tests/test_multiprocess.py.
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=120)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  results = []
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, out
    lines = [l for l in out.splitlines() if l.startswith("RESULT")]
    assert len(lines) == 1, out
    _, process_id, ok, votes = lines[0].split(" ", 3)
    assert process_id == str(i) and ok == "True", out
    results.append(votes)
  assert results[0] == results[1]
