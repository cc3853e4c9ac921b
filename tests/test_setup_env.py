"""scripts/setup_env.sh says what it does and finds Fashion-MNIST without apt or root (issue
#22): run in a scratch copy of the checkout with an up-to-date stub .venv and stub commands, so
nothing is installed or downloaded."""
import hashlib
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("bash", "sha256sum", "cut", "cat", "dirname", "env", "id")


def _script(path, body):
  with open(path, "w") as f:
    f.write("#!/bin/sh\n" + body + "\n")
  os.chmod(path, 0o755)


@pytest.fixture
def checkout(tmp_path):
  """A scratch checkout: setup_env.sh, requirements, an installed-looking .venv whose python
  records what it is asked to run, and a bin/ of the basic tools (no apt-get, no sudo)."""
  root = tmp_path / "checkout"
  (root / "scripts").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "scripts", "setup_env.sh"), root / "scripts")
  for name in ("requirements.txt", "pyproject.toml"):
    shutil.copy(os.path.join(ROOT, name), root)
  venv_bin = root / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  _script(venv_bin / "python", f'echo "python $*" >> {tmp_path}/calls')
  digests = "".join(
      f"{hashlib.sha256((root / n).read_bytes()).hexdigest()}  {n}\n"
      for n in ("requirements.txt", "pyproject.toml"))
  (root / ".venv" / ".requirements.sha256").write_text(
      hashlib.sha256(digests.encode()).hexdigest() + "\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in TOOLS:
    os.symlink(shutil.which(tool), bin_dir / tool)
  return root, bin_dir, tmp_path


def _source(root, bin_dir, **env):
  return subprocess.run(
      [str(bin_dir / "bash"), "-c", f"source {root}/scripts/setup_env.sh && echo SOURCED"],
      env={"PATH": str(bin_dir), "HOME": str(root),
           "SEMPPL_FASHION_MNIST_DIR": str(root / "none"), **env},
      capture_output=True, text=True, timeout=60)


def test_without_apt_it_uses_tfds_and_says_so(checkout):
  root, bin_dir, tmp = checkout
  out = _source(root, bin_dir)
  assert out.returncode == 0 and "SOURCED" in out.stdout, out.stderr
  assert "[setup_env] .venv is up to date" in out.stderr
  assert "no apt or no root/sudo here (apt-get not found); using tfds 'fashion_mnist'" in (
      out.stderr)
  assert "Fashion-MNIST ready through tfds" in out.stderr
  assert "download_and_prepare" in (tmp / "calls").read_text()


def test_without_root_or_sudo_it_uses_tfds(checkout):
  root, bin_dir, tmp = checkout
  _script(bin_dir / "apt-get", f'echo "apt-get $*" >> {tmp}/calls; exit 1')
  os.unlink(bin_dir / "id")
  _script(bin_dir / "id", "echo 1000")
  out = _source(root, bin_dir)
  assert out.returncode == 0, out.stderr
  assert "not root, and sudo needs a password or is missing" in out.stderr
  assert "apt-get" not in (tmp / "calls").read_text()


def test_apt_errors_are_shown_and_tfds_is_the_fallback(checkout):
  root, bin_dir, tmp = checkout
  _script(bin_dir / "apt-get", 'echo "E: Unable to locate package $4" >&2; exit 100')
  os.unlink(bin_dir / "id")
  _script(bin_dir / "id", "echo 0")
  out = _source(root, bin_dir)
  assert out.returncode == 0, out.stderr
  assert "installing Debian's dataset-fashion-mnist with apt-get" in out.stderr
  assert "E: Unable to locate package" in out.stderr  # apt's own error, not hidden.
  assert "apt-get could not install dataset-fashion-mnist); using tfds" in out.stderr


def test_idx_files_present_need_nothing(checkout):
  root, bin_dir, tmp = checkout
  (root / "idx").mkdir()
  (root / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  out = _source(root, bin_dir, SEMPPL_FASHION_MNIST_DIR=str(root / "idx"))
  assert out.returncode == 0, out.stderr
  assert f"Fashion-MNIST: Debian's IDX files in {root}/idx" in out.stderr
  assert not (tmp / "calls").exists()
