"""load_released_checkpoint.ipynb with its defaults (no URL, no path) runs on a locally
produced encoder and says so first (issue #22): checked on the committed outputs, which
colabs/build_notebooks.py makes with the defaults (only OUTPUT_DIR set). Reads the notebook
only; tests/test_colabs.py executes the notebooks."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colabs", "load_released_checkpoint.ipynb")


def _cells():
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)["cells"]


def _stdout(cell):
  return "".join("".join(o.get("text", "")) for o in cell.get("outputs", [])
                 if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_committed_outputs_are_the_default_run_and_say_so():
  cells = _cells()
  (note,) = [c for c in cells if "outputs-note" in c.get("metadata", {}).get("tags", [])]
  note = "".join(note["source"])
  assert "default parameters except `OUTPUT_DIR = 'outputs'`" in note, note
  assert "CHECKPOINT_PATH =" not in note
  (resolve,) = [c for c in cells if "def resolve_checkpoint" in "".join(c["source"])]
  printed = _stdout(resolve).splitlines()
  assert printed[0].startswith(
      "No CHECKPOINT_URL or CHECKPOINT_PATH: this run uses the tiny ResNet trained and exported "
      "by train_on_your_data.ipynb, in the release format (outputs/semppl_encoder.pkl); it is "
      "NOT a released SemPPL checkpoint."), printed
  assert printed[1] == "Using the local file outputs/semppl_encoder.pkl (no download)."
  # The cell before it that prints anything prints only the jax version and devices.
  index = cells.index(resolve)
  earlier = [_stdout(c) for c in cells[1:index] if c["cell_type"] == "code" and _stdout(c)]
  assert all(text.startswith("jax ") for text in earlier), earlier


def test_without_the_trained_encoder_a_random_tiny_one_is_written(tmp_path):
  """The fallback of the default run when train_on_your_data.ipynb has not run: the
  notebook's own `local_encoder` writes a tiny ResNet in the release format, which loads."""
  import re  # pylint: disable=g-import-not-at-top
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from semppl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from semppl_jax import networks  # pylint: disable=g-import-not-at-top

  (resolve,) = [c for c in _cells() if "def resolve_checkpoint" in "".join(c["source"])]
  source = re.search(r"^def local_encoder.*?(?=^\S)", "".join(resolve["source"]),
                     re.M | re.S).group(0)
  scope = dict(os=os, hk=hk, jax=jax, jnp=jnp, networks=networks, checkpointing=checkpointing)
  exec(compile(source, "load_released_checkpoint.ipynb", "exec"), scope)  # pylint: disable=exec-used
  path, what = scope["local_encoder"](str(tmp_path / "outputs" / "semppl_encoder.pkl"))
  assert "initialised here at random" in what
  ckpt = checkpointing.load_released_checkpoint_full(path)
  assert (ckpt.architecture, ckpt.width_multiplier, ckpt.step) == ("tiny_resnet", 1, 0)
  assert checkpointing.verify_released_checkpoint(path, "tiny_resnet", 1,
                                                  small_images=True).ok
  # An existing file is used as it is.
  assert scope["local_encoder"](path)[1].startswith("the tiny ResNet trained")
