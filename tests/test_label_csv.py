"""CSV safety of experiments/label.py (issue 21): formula-like cells neutralised, no silent
overwrite."""
import numpy as np
import pytest

from experiments import label
from semppl_jax import labelling

HOSTILE = ("=HYPERLINK(\"http://x\",\"y\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx")


@pytest.mark.parametrize("text", HOSTILE)
def test_formula_like_text_is_neutralised(text):
  assert labelling.csv_text(text) == "'" + text


@pytest.mark.parametrize("text", ["cat", "img 1.png", "a=b", "", "'quoted"])
def test_plain_text_is_kept(text):
  assert labelling.csv_text(text) == text


def test_written_csv_has_no_cell_starting_a_formula(tmp_path):
  classes = ("=cmd|' /C calc'!A0", "+dog", "emu")
  labelled = label.Images(names=("@a.png", "b.png", "-c.png"), labels=np.array([0, 1, 2]),
                          class_names=classes, batches=None)
  unlabelled = label.Images(names=("=1+1.png", "\tz.png"), labels=np.array([1, 0]),
                            class_names=classes, batches=None)
  result = label.Labels(predicted=np.array([0, 1]), vote_share=np.array([1.0, 0.5]),
                        nearest=np.array([0, 2]), nearest_similarity=np.array([-0.5, 0.25]))
  path = tmp_path / "labels.csv"
  label.write_csv(str(path), unlabelled, labelled, result, with_truth=True)
  rows = label.read_csv(str(path))
  for row in rows:
    for column, cell in row.items():
      if column not in ("predicted_index", "vote_share", "nearest_similarity"):
        assert not cell.startswith(labelling._FORMULA_START), (column, cell)
  assert rows[0]["file"] == "'=1+1.png" and rows[0]["predicted_class"] == "'=cmd|' /C calc'!A0"
  assert rows[0]["nearest_labelled_file"] == "'@a.png"
  assert rows[1]["nearest_similarity"] == "0.2500" and rows[0]["nearest_similarity"] == "-0.5000"


def test_existing_output_needs_overwrite(tmp_path):
  (tmp_path / "labels.csv").write_text("file\n")
  args = label.parse_args(["--checkpoint=/nonexistent", "--dataset=fashion_mnist",
                           f"--output_dir={tmp_path}"])
  with pytest.raises(ValueError, match=rf"--output_dir: {tmp_path}/labels.csv exists; pass "
                                       "--overwrite"):
    label.run(args)
  args = label.parse_args(["--checkpoint=/nonexistent", "--dataset=fashion_mnist",
                           f"--output_dir={tmp_path}", "--overwrite"])
  with pytest.raises(ValueError, match="nonexistent"):  # Past the check: the checkpoint.
    label.run(args)
