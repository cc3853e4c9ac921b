"""The launcher's command line (issue #22): config errors as one line naming the flag (exit
status 2), ``--print_config``, shipped configs by name from any directory, the console-script
entries, and the README's override flags. Everything here stops before a config compiles, except
one short launch from outside the checkout."""
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import eval_fashion_mnist  # noqa: E402  pylint: disable=g-import-not-at-top

TINY_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny_fashion_mnist.py")
E = "--config.experiment_kwargs.config"


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)
  # The package from this checkout, as an installed one would be found: not through the cwd.
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  return env


def _launch(*args, cwd=ROOT, timeout=300, entry=None):
  """The launcher (``experiments/launch.py``), or a console-script entry by its target
  ``module:function`` as the installed command calls it."""
  if entry:
    module, function = entry.split(":")
    cmd = [sys.executable, "-c",
           f"import sys; sys.argv[0] = 'semppl'; from {module} import {function}; "
           f"sys.exit({function}())", *args]
  else:
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "launch.py"), *args]
  return subprocess.run(cmd, cwd=cwd, env=_env(SEMPPL_TEST_RUN_DIR=str(cwd)),
                        capture_output=True, text=True, timeout=timeout)


def _error_lines(out):
  # TensorFlow / XLA's C++ start-up lines (I0000 ..., 'WARNING: All log messages ...') come
  # before any flag is read; the launcher's own output is what follows.
  return [l for l in out.stderr.splitlines()
          if l.strip() and not re.match(r"(I|W)\d{4} |WARNING: All log messages", l)]


@pytest.mark.parametrize("override, expected", [
    (f"{E}.optimizer.momentum=1.5",
     f"error: {E}.optimizer.momentum: must be in [0.0, 1.0), got 1.5."),
    (f"{E}.objective=bogus",
     f"error: {E}.objective: got 'bogus', allowed: 'semppl', 'relic', 'supervised'."),
    ("--config.E.objective=relic", "error: --config.E.objective: the config has no field 'E'"),
    ("--config.experiment_class=foo",
     "error: --config.experiment_class: got 'foo', allowed: 'pretrain', 'eval'."),
])
def test_a_bad_config_value_is_one_line_naming_the_flag(tmp_path, override, expected):
  out = _launch(f"--config={TINY_CONFIG}", override, cwd=tmp_path)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = _error_lines(out)
  assert len(lines) == 1 and lines[0].startswith(expected), lines
  assert "Traceback" not in out.stderr + out.stdout
  # Checked before jaxline starts: no checkpoint or TensorBoard directory (the run directory's
  # lock is taken before anything is written, and the log file of the launch itself is set up
  # next, so that jax's start-up lines go there).
  assert set(os.listdir(tmp_path)) <= {"logs", "run.lock"}


def test_verbosity_shows_the_traceback(tmp_path):
  out = _launch(f"--config={TINY_CONFIG}", f"{E}.objective=bogus", "--verbosity=1",
                cwd=tmp_path)
  assert out.returncode != 0 and "Traceback" in out.stderr
  assert "ValueError: config.objective: got 'bogus'" in out.stderr


def test_an_unknown_config_name_is_one_line(tmp_path):
  out = _launch("--config=no_such_config", cwd=tmp_path)
  assert out.returncode == 2
  (line,) = _error_lines(out)
  assert line.startswith("error: --config=no_such_config: no such config file") and (
      "fashion_mnist" in line), line


def test_print_config_of_a_shipped_config_by_name_from_anywhere(tmp_path):
  out = _launch("--config=fashion_mnist:smoke", "--config.training_steps=5", "--print_config",
                cwd=tmp_path, entry="experiments.launch:run")
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"^training_steps: 5$", out.stdout, re.M), out.stdout
  assert "warmup_steps: 0\n" in out.stdout  # Fitted to the run before printing.
  assert "checkpoint_dir: runs/fashion_mnist_smoke" in out.stdout
  assert not os.listdir(tmp_path)
  out = _launch("--print_config", cwd=tmp_path, entry="experiments.launch:run_eval")
  assert out.returncode == 0 and "protocol: fine_tune" in out.stdout, out.stderr[-3000:]


def test_console_scripts_point_at_existing_entries():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  scripts = project["project"]["scripts"]
  assert sorted(scripts) == ["semppl-eval", "semppl-label", "semppl-train"]
  import importlib  # pylint: disable=g-import-not-at-top
  for target in scripts.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target
  # The configs and the launcher ship in the wheel: the experiments package is included.
  assert "experiments" in project["tool"]["setuptools"]["packages"]["find"]["include"]


def _readme_override_flags():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("### Common overrides"):text.index("### What a run writes")]
  return re.findall(r"--config\.([\w.]+)=", section)


def test_readme_override_table_uses_real_flags():
  flags = _readme_override_flags()
  assert len(flags) >= 10
  configs = (fashion_mnist.get_config(), eval_fashion_mnist.get_config())
  for path in flags:
    def has(config):
      node = config
      for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
          return False
        node = node[part]
      return True
    assert any(has(c) for c in configs), f"README flag --config.{path} is not a config field"


def test_semppl_train_runs_a_shipped_config_from_outside_the_checkout(tmp_path):
  """`semppl-train --config=fashion_mnist --config.training_steps=2` (the entry the installed
  command calls) in a directory outside the checkout: the demo's 100 warm-up steps are fitted
  to the run, the run ends with its checkpoint and next commands, and it writes under the
  current directory. Evaluation on 512 test images and no pictures, to stay cheap."""
  out = _launch("--config=fashion_mnist", "--config.training_steps=2",
                f"{E}.evaluation.max_examples=512", f"{E}.evaluation.every_steps=0",
                f"{E}.summaries.images_every_steps=0", f"{E}.summaries.plots=False",
                cwd=tmp_path, entry="experiments.launch:run", timeout=900)
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
  assert "[setup] training_steps=2 is shorter than these step counts, fitted to the run: " \
      "optimizer.warmup_steps 100 -> 0" in out.stdout
  assert "[train] step 2/2 |" in out.stdout and "[eval]   online-probe top-1" in out.stdout
  run_dir = tmp_path / "runs" / "fashion_mnist"
  assert f"[done] checkpoint: {run_dir}/checkpoints/latest" in out.stdout
  assert (f"[next] evaluate: semppl-eval --config=eval_fashion_mnist "
          f"{E}.checkpoint.path={run_dir}/checkpoints") in out.stdout
  assert f"[next] label images: semppl-label --checkpoint={run_dir} --dataset=fashion_mnist" \
      in out.stdout
  assert "2" in os.listdir(run_dir / "checkpoints" / "latest")


def test_semppl_label_writes_under_the_run_directory_by_default(tmp_path):
  from experiments import commands  # pylint: disable=g-import-not-at-top
  run = str(tmp_path / "runs" / "demo")
  assert commands.default_output_dir([f"--checkpoint={run}", "--dataset=fashion_mnist"]) == (
      os.path.join(run, "labels"))
  assert commands.default_output_dir(["--checkpoint", run]) == os.path.join(run, "labels")
  pkl = tmp_path / "release.pkl"
  pkl.write_bytes(b"")
  assert commands.default_output_dir([f"--checkpoint={pkl}"]) == str(tmp_path / "labels")
  assert commands.default_output_dir([f"--checkpoint={run}", "--output_dir=x"]) is None
  assert commands.default_output_dir(["--dataset=fashion_mnist"]) is None
