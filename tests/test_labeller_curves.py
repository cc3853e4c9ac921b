"""experiments/labeller_curves.py: reads study runs' curves and plots them."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import labeller_curves  # noqa: E402  pylint: disable=g-import-not-at-top


def _run(tmp_path, name, values):
  run_dir = tmp_path / name
  run_dir.mkdir()
  rows = [{"step": 50 * (i + 1), "train_pseudo_label_accuracy": v, "queue_knn_top1": v / 2}
          for i, v in enumerate(values)]
  rows.append({"step": 999, "loss": 1.0})  # A row without the metric is skipped.
  (run_dir / "curves.json").write_text(json.dumps(rows))
  return str(run_dir)


def test_plots_every_run_and_summarises_the_last_values(tmp_path, capsys):
  a = _run(tmp_path, "a", [0.2, 0.3, 0.1])
  b = _run(tmp_path, "b", [0.3, 0.45])
  png = tmp_path / "out" / "curves.png"
  assert labeller_curves.main(["--run", f"collapse, k=5={a}", "--run", f"target={b}",
                               "--png", str(png)]) == 0
  assert png.stat().st_size > 0
  out = capsys.readouterr().out
  assert "collapse, k=5: 10.0% training, 5.0% held out" in out
  assert "target: 45.0% training, 22.5% held out" in out


def test_bad_runs_are_named(tmp_path):
  with pytest.raises(ValueError, match="--run: expected LABEL=RUN_DIR, got 'nolabel'"):
    labeller_curves.parse_run("nolabel")
  with pytest.raises(FileNotFoundError, match="no curves.json"):
    labeller_curves.read_curve(str(tmp_path), "queue_knn_top1")
