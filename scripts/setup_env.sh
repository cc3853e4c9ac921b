# Sourced by scripts/demo.sh, test.sh, lint.sh: creates .venv with the pinned requirements and the
# package, and makes the embedded default dataset (Fashion-MNIST) available. Says what it does.
#
# Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files under
# /usr/share/datasets/fashion-mnist, installed with apt when root or sudo is available). Without
# apt or root the library reads it through tfds (`fashion_mnist`, ~30 MB downloaded once into
# ~/tensorflow_datasets); this script fetches it now so that a missing network shows up here.
# SEMPPL_SKIP_DATA=1 skips the data step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { echo "[setup_env] $*" >&2; }
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" -V 2>&1) (a few seconds)"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when requirements.txt or the package metadata (pyproject.toml) changed since
# the last successful install.
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing the pinned requirements into .venv (about 2.4 GB: 1-2 minutes on a fast" \
      "network, up to 6 on a busy machine; pip's errors are shown)"
  start=$SECONDS
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
  say "installed in $((SECONDS - start)) s"
else
  say ".venv is up to date with requirements.txt and pyproject.toml"
fi
export PATH="$ROOT/.venv/bin:$PATH"
# TensorFlow is used for tf.data only: keep it quiet and off any accelerator.
export TF_CPP_MIN_LOG_LEVEL=3

IDX_DIR="${SEMPPL_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
IDX="$IDX_DIR/train-images-idx3-ubyte.gz"
fetch_with_tfds() {
  say "Fashion-MNIST: no apt or no root/sudo here ($1); using tfds 'fashion_mnist' instead" \
      "(~30 MB, downloaded once into ${TFDS_DATA_DIR:-~/tensorflow_datasets}; needs network)"
  if ! python -c "import tensorflow_datasets as tfds; tfds.builder('fashion_mnist').download_and_prepare()" \
      >/dev/null; then
    say "ERROR: tfds could not fetch fashion_mnist (the error is above). Install Debian's" \
        "dataset-fashion-mnist, or copy a prepared ~/tensorflow_datasets/fashion_mnist here."
    return 1
  fi
  say "Fashion-MNIST ready through tfds"
}
if [ "${SEMPPL_SKIP_DATA:-0}" = 1 ]; then
  say "skipping the data step (SEMPPL_SKIP_DATA=1)"
elif [ -f "$IDX" ]; then
  say "Fashion-MNIST: Debian's IDX files in $IDX_DIR"
elif ! command -v apt-get >/dev/null 2>&1; then
  fetch_with_tfds "apt-get not found"
else
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO=sudo
    else
      SUDO=none
    fi
  fi
  if [ "$SUDO" = none ]; then
    fetch_with_tfds "not root, and sudo needs a password or is missing"
  else
    say "Fashion-MNIST: installing Debian's dataset-fashion-mnist with apt-get (~30 MB, about" \
        "a minute; apt's errors are shown)"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; then
      say "apt-get install failed; updating the package lists and trying again"
      $SUDO apt-get update -q >/dev/null || say "apt-get update failed (its errors are above)"
      if ! $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; then
        fetch_with_tfds "apt-get could not install dataset-fashion-mnist"
      fi
    fi
  fi
fi
