"""Executes the notebooks in colabs/ and saves them with their outputs (tables, pictures).

    python colabs/build_notebooks.py            # both, the committed way
    python colabs/build_notebooks.py --only=train_on_your_data.ipynb

The notebooks run headless (nbclient) in a fresh kernel of this interpreter on one CPU device,
in a temporary working directory (relative paths in the outputs). ``train_on_your_data`` runs
with its own defaults (the Fashion-MNIST example folders) and exports its encoder;
``load_released_checkpoint`` then runs with its defaults too (only ``OUTPUT_DIR`` is set, in a
cell tagged ``injected-parameters`` that is removed again after the run; a note at the top says
so): without a URL it reads that exported encoder and says that it is not a released
checkpoint, since no released checkpoint has a public URL yet. The install cell finds this checkout and installs
nothing. Takes a few minutes on two CPU cores.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

COLABS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(COLABS)
KERNEL_NAME = "semppl-colab-build"
NOTE_TAG = "outputs-note"


def write_kernelspec(root: str) -> str:
  """A kernelspec folder whose kernel is this interpreter on one CPU device."""
  spec_dir = os.path.join(root, KERNEL_NAME)
  os.makedirs(spec_dir, exist_ok=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "semppl_jax", "language": "python",
          "env": {"XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                  "PYDEVD_DISABLE_FILE_VALIDATION": "1", "PYTHONPATH": REPO_ROOT}}
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump(spec, f)
  return root


def execute(nb, kernel_dir: str, cwd: str, timeout: int = 1800):
  """Runs ``nb`` in place in a fresh kernel started in ``cwd``."""
  km = KernelManager(kernel_name=KERNEL_NAME,
                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
  client = nbclient.NotebookClient(nb, km=km, kernel_name=KERNEL_NAME, timeout=timeout,
                                   resources={"metadata": {"path": cwd}})
  client.execute()
  return nb


def strip_build_cells(nb) -> None:
  """Removes cells added by an earlier build (the injected parameters, the outputs note)."""
  nb.cells = [c for c in nb.cells if not {"injected-parameters", NOTE_TAG} & set(
      c.metadata.get("tags", []))]


def inject(nb, parameters) -> None:
  """Adds a cell after the ``parameters`` cell that overrides ``parameters`` for this run."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  cell = nbformat.v4.new_code_cell(
      "# Injected by colabs/build_notebooks.py\n"
      + "\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(index + 1, cell)


# Start-up chatter of TensorFlow / absl on the kernel's stderr (no information for a reader).
_NOISE = ("WARNING: All log messages before absl::InitializeLog()", "oneDNN custom operations",
          "Kernel is running over TCP")


def drop_noise(nb) -> None:
  """Removes stderr lines of :data:`_NOISE` from the outputs (and outputs left empty)."""
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    kept = []
    for out in cell.outputs:
      if out.output_type == "stream" and out.name == "stderr":
        out.text = "".join(line for line in out.text.splitlines(keepends=True)
                           if not any(n in line for n in _NOISE))
        if not out.text.strip():
          continue
      kept.append(out)
    cell.outputs = kept


def finish(nb, parameters) -> None:
  """Drops the injected cell and start-up noise, puts a note about the outputs at the top."""
  strip_build_cells(nb)
  drop_noise(nb)
  text = ("*The outputs below were produced by `python colabs/build_notebooks.py` on a CPU "
          "with the default parameters")
  if parameters:
    text += " except " + ", ".join(f"`{k} = {v!r}`" for k, v in parameters.items())
  note = nbformat.v4.new_markdown_cell(text + ".*")
  note.metadata["tags"] = [NOTE_TAG]
  # After the install cell and the title.
  nb.cells.insert(2, note)
  nbformat.validate(nb)


def build(name: str, kernel_dir: str, cwd: str, parameters=None) -> None:
  path = os.path.join(COLABS, name)
  nb = nbformat.read(path, as_version=4)
  strip_build_cells(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  if parameters:
    inject(nb, parameters)
  print(f"executing {name} in {cwd} ...", flush=True)
  execute(nb, kernel_dir, cwd)
  finish(nb, parameters)
  nbformat.write(nb, path)
  print(f"wrote {path}", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", choices=("train_on_your_data.ipynb",
                                         "load_released_checkpoint.ipynb"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    kernel_dir = write_kernelspec(os.path.join(tmp, "kernels"))
    cwd = os.path.join(tmp, "work")
    os.makedirs(cwd)
    # The install cell looks for the checkout from the working directory: a link to it.
    os.symlink(REPO_ROOT, os.path.join(cwd, "semppl_jax_checkout"))
    if args.only != "load_released_checkpoint.ipynb":
      build("train_on_your_data.ipynb", kernel_dir, cwd)
    if args.only != "train_on_your_data.ipynb":
      encoder = os.path.join(cwd, "outputs", "semppl_encoder.pkl")
      if not os.path.exists(encoder):
        build("train_on_your_data.ipynb", kernel_dir, cwd)
      # The defaults: no URL, so the notebook runs on the encoder exported above and says so.
      build("load_released_checkpoint.ipynb", kernel_dir, cwd, dict(OUTPUT_DIR="outputs"))
    shutil.rmtree(cwd, ignore_errors=True)


if __name__ == "__main__":
  main()
