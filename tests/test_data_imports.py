"""The data package's modules import each other without cycles, and numpy-only modules do not
pull in TensorFlow."""
import ast
import importlib.util
import os
import subprocess
import sys

import pytest

import semppl_jax.data

PACKAGE = "semppl_jax.data"
FOLDER = os.path.dirname(semppl_jax.data.__file__)
MODULES = sorted(f[:-3] for f in os.listdir(FOLDER) if f.endswith(".py") and f != "__init__.py")


def _imported_submodules(module: str) -> set[str]:
  """Sibling modules that `module` imports anywhere (top level, inside functions, or through
  `importlib.import_module("semppl_jax.data.x")`)."""
  with open(os.path.join(FOLDER, module + ".py")) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)):
      names = [node.args[0].value]
    for name in names:
      if name.startswith(PACKAGE + ".") and name.split(".")[2] in MODULES:
        found.add(name.split(".")[2])
  return found - {module}


def test_the_module_list_is_what_we_think():
  assert {"batching", "fashion_mnist", "splits", "pipelines", "imagenet",
          "image_folder"} <= set(MODULES)


def test_no_import_cycles():
  graph = {m: _imported_submodules(m) for m in MODULES}
  assert "fashion_mnist" not in graph["splits"]  # splits is dataset-agnostic
  # Depth-first search for a back edge.
  state = {}

  def visit(m, path):
    state[m] = "open"
    for n in sorted(graph[m]):
      assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [n])}"
      if n not in state:
        visit(n, path + [n])
    state[m] = "done"

  for m in MODULES:
    if m not in state:
      visit(m, [m])


def test_splits_names_no_dataset():
  with open(os.path.join(FOLDER, "splits.py")) as f:
    assert "fashion" not in f.read().lower()


@pytest.mark.slow
def test_each_module_imports_alone_in_a_fresh_interpreter():
  # One interpreter per numpy-only module (cheap: no TensorFlow), so that a module that only
  # works after another one was imported first fails here.
  for module in ("batching", "fashion_mnist", "info", "splits"):
    code = (f"import sys, {PACKAGE}.{module}; "
            f"assert 'tensorflow' not in sys.modules, '{module} imported tensorflow'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
        os.path.dirname(FOLDER)))
  assert importlib.util.find_spec(f"{PACKAGE}.pipelines") is not None
