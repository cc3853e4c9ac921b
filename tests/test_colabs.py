"""Executes the notebooks in colabs/ headless (nbclient) with small injected parameters, and
checks that they are committed with the outputs colabs/build_notebooks.py produces.

Each notebook runs in a fresh kernel of this interpreter (a kernelspec written to a temporary
folder, so whatever `python` is on PATH does not matter) with one CPU device: the kernel's
XLA_FLAGS is emptied, overriding conftest's 8 fake devices. The install cell (tagged `install`)
gets `PACKAGE_SOURCE` = this checkout (already importable: nothing is installed). The
parameters cell (tagged `parameters`) is replaced by the test's values:

* load_released_checkpoint.ipynb: a random ResNet-18 (plus a projector head) written locally in
  the release format with `export_release_checkpoint`, 32 px images; read from the local path,
  or downloaded from an HTTP server on localhost (no outside network);
* train_on_your_data.ipynb: example folders of 2 labelled images per class and 40 unlabelled
  Fashion-MNIST images, 4 steps of 8 + 24 images, 16 px / 8 px views (skipped without Debian's
  dataset-fashion-mnist).
"""
import csv
import functools
import http.server
import json
import os
import re
import sys
import threading

import haiku as hk
import jax
import jax.numpy as jnp
import nbclient
from nbclient.exceptions import CellExecutionError
import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

import haiku_testlib

from semppl_jax import checkpointing
from semppl_jax import networks
from semppl_jax.data import fashion_mnist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO_ROOT, "colabs")
KERNEL_NAME = "semppl-colab-test"
HAVE_FASHION_MNIST = all(
    os.path.exists(p) for p in fashion_mnist.idx_file_paths("test", fashion_mnist.DEFAULT_DATA_DIR)
) and all(
    os.path.exists(p) for p in fashion_mnist.idx_file_paths("train", fashion_mnist.DEFAULT_DATA_DIR))


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernelspec folder whose kernel is this interpreter with one CPU device."""
  root = tmp_path_factory.mktemp("kernels")
  spec_dir = root / KERNEL_NAME
  spec_dir.mkdir()
  spec = {
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "semppl_jax test kernel",
      "language": "python",
      # Merged into the environment the kernel inherits from pytest.
      "env": {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
              "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return str(root)


def _execute(name, parameters, kernel_dir):
  """Runs colabs/<name> with its parameters cell replaced; returns the executed notebook."""
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  install = [c for c in nb.cells if "install" in c.metadata.get("tags", [])]
  assert len(install) == 1 and nb.cells[0] is install[0], f"{name}: the first cell installs"
  assert install[0].source.count("\nPACKAGE_SOURCE = ''\n") == 1
  install[0].source = install[0].source.replace("\nPACKAGE_SOURCE = ''\n",
                                                f"\nPACKAGE_SOURCE = {REPO_ROOT!r}\n")
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, f"{name}: expected exactly one cell tagged 'parameters'"
  params[0].source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
  km = KernelManager(kernel_name=KERNEL_NAME,
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
  client = nbclient.NotebookClient(nb, km=km, kernel_name=KERNEL_NAME, timeout=300,
                                   resources={"metadata": {"path": REPO_ROOT}})
  client.execute()
  return nb


def _text(nb):
  """All stream text and text/plain results of the executed notebook, concatenated."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "stream":
        parts.append(out.text)
      elif out.output_type in ("execute_result", "display_data"):
        parts.append(out.data.get("text/plain", ""))
      elif out.output_type == "error":
        parts.append("\n".join(out.traceback))
  return "\n".join(parts)


def _num_pngs(nb):
  return sum("image/png" in out.get("data", {})
             for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("name, min_pngs", [("load_released_checkpoint.ipynb", 3),
                                             ("train_on_your_data.ipynb", 4)])
def test_notebooks_are_committed_with_outputs(name, min_pngs):
  """Executed top to bottom without errors by colabs/build_notebooks.py, pictures included,
  with the note on how the outputs were made and no build-only cell or temporary path left."""
  nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
  nbformat.validate(nb)
  tags = [set(c.metadata.get("tags", [])) for c in nb.cells]
  assert "install" in tags[0] and sum("parameters" in t for t in tags) == 1
  assert not any("injected-parameters" in t for t in tags)
  notes = [c for c, t in zip(nb.cells, tags) if "outputs-note" in t]
  assert len(notes) == 1 and "colabs/build_notebooks.py" in notes[0].source
  counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
  # Every cell ran, in order (a gap: the injected-parameters cell, removed after the run).
  assert None not in counts and counts == sorted(set(counts)), counts
  assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
  assert _num_pngs(nb) >= min_pngs
  text = _text(nb)
  assert "nothing to install" in text and "runtime: cpu" in text
  assert "/tmp/" not in text and REPO_ROOT not in text


# ----------------------------------------------------------------------------------------------
# load_released_checkpoint.ipynb
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
  """A random ResNet-18 + projector head in the release format; (path, #arrays, #params)."""

  def forward(images):
    return networks.make_encoder("resnet18")(images, is_training=True)

  # Shapes only (no compilation), then numpy values: keeps the fixture fast.
  params, state = haiku_testlib.random_like(jax.eval_shape(
      hk.transform_with_state(forward).init, jax.random.PRNGKey(3),
      jnp.zeros((1, 32, 32, 3), jnp.float32)), seed=3)
  rng = np.random.default_rng(0)
  head = {"projector/~/linear": {"w": rng.normal(size=(512, 16)).astype(np.float32),
                                 "b": np.zeros((16,), np.float32)}}
  path = str(tmp_path_factory.mktemp("release") / "semppl_test_resnet18.pkl")
  checkpointing.export_release_checkpoint(path, params, state, step=123,
                                          rng=jax.random.PRNGKey(1), head_params=head)
  leaves = jax.tree_util.tree_leaves(params)
  return path, len(leaves), sum(int(np.prod(x.shape)) for x in leaves)


def _nb1_parameters(path, output_dir, architecture="resnet18"):
  return dict(CHECKPOINT_URL="", CHECKPOINT_PATH=path, ARCHITECTURE=architecture,
              WIDTH_MULTIPLIER=1, SMALL_IMAGES=False, IMAGE_SIZE=32,
              CACHE_DIR=str(output_dir), FASHION_MNIST_DIR=fashion_mnist.DEFAULT_DATA_DIR,
              FASHION_MNIST_DOWNLOAD=False,
              PROBE_TRAIN_PER_CLASS=5, PROBE_TEST_PER_CLASS=5, BATCH_SIZE=32,
              OUTPUT_DIR=str(output_dir))


@pytest.fixture(scope="module")
def release_url(release_file):
  """The release file served over HTTP on localhost (the notebook's download path, offline)."""
  directory = os.path.dirname(release_file[0])
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=directory)
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(release_file[0])}"
  server.shutdown()
  server.server_close()


# Two runs: a local file with Fashion-MNIST (when installed), and a download without it (the
# sample-image fallback).
@pytest.mark.e2e
@pytest.mark.parametrize("source", ["local_file", "download"])
def test_load_released_checkpoint_notebook(release_file, release_url, kernel_dir, tmp_path,
                                           source):
  fashion_mnist_installed = source == "local_file"
  if fashion_mnist_installed and not HAVE_FASHION_MNIST:
    pytest.skip("dataset-fashion-mnist not installed")
  path, num_arrays, num_params = release_file
  parameters = _nb1_parameters(path, tmp_path)
  if source == "download":
    parameters.update(CHECKPOINT_URL=release_url, CHECKPOINT_PATH=None,
                      CACHE_DIR=str(tmp_path / "cache"),
                      FASHION_MNIST_DIR=str(tmp_path / "no_fashion_mnist"))
  nb = _execute("load_released_checkpoint.ipynb", parameters, kernel_dir)
  text = _text(nb)

  if source == "download":
    cached = tmp_path / "cache" / os.path.basename(path)
    assert f"Downloading {release_url}" in text
    with open(cached, "rb") as got, open(path, "rb") as want:
      assert got.read() == want.read()
    assert not os.path.exists(str(cached) + ".part")
  else:
    assert "(no download)" in text
  # Load: encoder scope, replica axis (export writes one), head module, step.
  assert (f"encoder scope 'res_net18': {num_params:,} parameters, guessed resnet18 x1, "
          "saved at step 123") in text
  assert "replica axis stripped: True; head modules: ['projector/~/linear']" in text
  # The verification summary.
  assert "resnet18 x1 (encoder scope 'res_net18', step 123)" in text
  assert (f"params: {num_arrays} arrays, {num_params:,} parameters (expected {num_arrays} "
          f"arrays, {num_params:,})") in text
  assert "head modules not compared: 1" in text
  assert "names and shapes match" in text

  # Gallery: 5 matplotlib sample images x 4 views (+ 3 Fashion-MNIST images x 10 classes).
  n_gallery = 20 + (30 if fashion_mnist_installed else 0)
  assert f"gallery: {n_gallery} images of 32 x 32" in text
  assert re.search(r"Nearest neighbour from the same source/class: \d+% of "
                   f"{10 if fashion_mnist_installed else 5} queries", text)
  assert os.path.getsize(tmp_path / "nearest_neighbours.png") > 0
  assert os.path.getsize(tmp_path / "embeddings_pca.png") > 0
  assert re.search(f"PCA: {n_gallery} embeddings, the first two components keep "
                   r"\d+\.\d% of the variance", text)
  assert _num_pngs(nb) >= 3  # sample images, neighbour grid, PCA map
  assert "nothing to install" in text

  num_classes = 10 if fashion_mnist_installed else 5
  assert (f"{num_classes} classes, {5 * num_classes} labelled / {5 * num_classes} held-out "
          "images") in text
  for pattern in (r"Linear probe accuracy on held-out images: (\d+\.\d)%",
                  r"Weighted kNN \(k=20\) accuracy on held-out images: (\d+\.\d)%"):
    match = re.search(pattern, text)
    assert match, pattern
    assert 0.0 <= float(match.group(1)) <= 100.0


@pytest.mark.e2e
def test_load_released_checkpoint_notebook_stops_on_wrong_architecture(
    release_file, kernel_dir, tmp_path):
  path, _, _ = release_file
  with pytest.raises(CellExecutionError) as info:
    _execute("load_released_checkpoint.ipynb",
             _nb1_parameters(path, tmp_path, architecture="resnet34"), kernel_dir)
  message = str(info.value)
  assert "does not match resnet34 x1" in message
  assert not (tmp_path / "nearest_neighbours.png").exists()


# ----------------------------------------------------------------------------------------------
# train_on_your_data.ipynb
# ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="dataset-fashion-mnist not installed")
def test_train_on_your_data_notebook(kernel_dir, tmp_path):
  steps = 4
  out = tmp_path / "out"
  parameters = dict(
      LABELLED_DIR=None, UNLABELLED_DIR=None, TEST_DIR=None, EXAMPLE_DIR=str(tmp_path / "data"),
      FASHION_MNIST_DIR=fashion_mnist.DEFAULT_DATA_DIR, LABELLED_PER_CLASS=2,
      UNLABELLED_IMAGES=40, TEST_PER_CLASS=2, IMAGE_SIZE=16, TRAINING_STEPS=steps,
      LABELLED_BATCH_SIZE=8, UNLABELLED_BATCH_SIZE=24, LARGE_VIEW_SIZE=16, SMALL_VIEW_SIZE=8,
      NUM_SMALL_VIEWS=1, QUEUE_SIZE=64, OBJECTIVE="semppl", PSEUDO_LABEL_EVERY=2, KNN_K=3,
      LOG_EVERY=2, OUTPUT_DIR=str(out))
  nb = _execute("train_on_your_data.ipynb", parameters, kernel_dir)
  text = _text(nb)

  # The example folders.
  data = tmp_path / "data"
  assert sorted(os.listdir(data)) == ["labelled", "test", "unlabelled"]
  assert len(os.listdir(data / "labelled")) == 10
  assert all(len(os.listdir(data / "labelled" / d)) == 2 for d in os.listdir(data / "labelled"))
  unlabelled = sorted(os.listdir(data / "unlabelled"))
  assert len(unlabelled) == 40
  assert "20 labelled images in 10 classes" in text and "40 unlabelled images" in text
  assert "1 device(s); 4 steps of 8 labelled + 24 unlabelled images; tiny_resnet" in text

  # Pseudo-label accuracy at step 0 (random encoder) and every 2 steps.
  seen = {int(m.group(1)): float(m.group(2)) for m in re.finditer(
      r"step +(\d+): kNN pseudo-label accuracy +(\d+\.\d)%", text)}
  assert sorted(seen) == [0, 2, 4] and all(0 <= v <= 100 for v in seen.values())
  summary = re.search(r"pseudo-label accuracy: (\d+\.\d)% at step 0 -> (\d+\.\d)% at step 4",
                      text)
  assert summary and float(summary.group(2)) == seen[4]
  assert os.path.getsize(out / "pseudo_label_accuracy.png") > 0

  # Every unlabelled file labelled, with a class of the labelled folder.
  with open(out / "labels.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted(r["file"] for r in rows) == unlabelled
  classes = sorted(os.listdir(data / "labelled"))
  assert all(r["predicted_class"] in classes and 0 < float(r["vote_share"]) <= 1 for r in rows)
  assert all(r["nearest_labelled_file"].split("/")[0] in classes for r in rows)
  assert re.search(r"accuracy \d+\.\d% on all 40 images", text)
  assert os.path.getsize(out / "labelled_examples.png") > 0
  assert _num_pngs(nb) >= 4  # labelled grid, curves, labelled examples, confusion matrix

  # The exported encoder reads back in the release format and matches tiny_resnet.
  assert "names and shapes match" in text
  ckpt = checkpointing.load_released_checkpoint_full(out / "semppl_encoder.pkl")
  assert ckpt.architecture == "tiny_resnet" and ckpt.step == steps
