"""tests/suite_order.py: the order in which the suite's workers receive the test files."""
import os

import suite_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_listed_heavy_file_exists_once():
  # A renamed file would silently lose its place at the front.
  for path in suite_order.HEAVY_FILES_FIRST:
    assert os.path.isfile(os.path.join(ROOT, path)), path
  assert len(set(suite_order.HEAVY_FILES_FIRST)) == len(suite_order.HEAVY_FILES_FIRST)


def test_heavy_files_first_then_most_tests_first_each_file_in_its_own_order():
  heavy = suite_order.HEAVY_FILES_FIRST
  nodeids = ["tests/a.py::t1", "tests/a.py::t2",
             f"{heavy[1]}::x[1]", f"{heavy[1]}::x[0]",
             "tests/b.py::t1", "tests/b.py::t2", "tests/b.py::t3",
             f"{heavy[0]}::y",
             "tests/c.py::t9", "tests/c.py::t8"]
  assert suite_order.heavy_files_first(nodeids) == [
      f"{heavy[0]}::y", f"{heavy[1]}::x[1]", f"{heavy[1]}::x[0]",
      "tests/b.py::t1", "tests/b.py::t2", "tests/b.py::t3",
      "tests/a.py::t1", "tests/a.py::t2", "tests/c.py::t9", "tests/c.py::t8"]
