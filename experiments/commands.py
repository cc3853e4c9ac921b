"""Console-script entries that are not the launcher (``semppl-train`` / ``semppl-eval`` are
``experiments.launch:run`` / ``run_eval``).

``semppl-label`` runs ``experiments/label.py``; without ``--output_dir`` it writes under the
run directory it labels with (``<run dir>/labels``; a released ``.pkl``: ``labels/`` next to
the file), not into the current directory.
"""
import os
import sys
from typing import Optional, Sequence


def default_output_dir(argv: Sequence[str]) -> Optional[str]:
  """``<checkpoint>/labels`` for a run directory, ``<dir of the .pkl>/labels`` for a file; None
  when ``--output_dir`` is given or ``--checkpoint`` is missing (label.py then decides)."""
  checkpoint = None
  for i, arg in enumerate(argv):
    if arg == "--output_dir" or arg.startswith("--output_dir="):
      return None
    if arg.startswith("--checkpoint="):
      checkpoint = arg.split("=", 1)[1]
    elif arg == "--checkpoint" and i + 1 < len(argv):
      checkpoint = argv[i + 1]
  if not checkpoint:
    return None
  if os.path.isfile(checkpoint):
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "labels")
  return os.path.join(checkpoint, "labels")


def label(argv: Optional[Sequence[str]] = None) -> int:
  """``semppl-label``: ``experiments/label.py``'s command line, output under the run dir."""
  argv = list(sys.argv[1:] if argv is None else argv)
  output = default_output_dir(argv)
  if output:
    argv.append(f"--output_dir={output}")
  from experiments import label as label_lib  # pylint: disable=g-import-not-at-top
  return label_lib.main(argv)


if __name__ == "__main__":
  sys.exit(label())
