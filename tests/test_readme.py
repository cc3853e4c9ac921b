"""The README's functional-API example runs as written (and trains: the queue fills)."""
import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _api_example() -> str:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  section = text[text.index("## The functional API"):]
  return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_functional_api_example_runs():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(_api_example(), "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = out.getvalue()
  # Three steps of 8 labelled items in each of the 2 queues of 64 slots, before the third
  # step's enqueue: 16 of 64 slots.
  assert "'queue_fill': 0.25" in printed, printed
  loss = float(re.search(r"'loss': ([-0-9.e]+)", printed).group(1))
  assert 0.0 < loss < 100.0
