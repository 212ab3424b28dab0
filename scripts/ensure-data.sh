#!/usr/bin/env bash
# Make sure Fashion-MNIST (Debian dataset-fashion-mnist) is present; install it when possible.
set -u
DIR=/usr/share/datasets/fashion-mnist
have_data() {
  if [ -n "${EDGESLIM_DATA:-}" ]; then
    for d in "$EDGESLIM_DATA" "$EDGESLIM_DATA/fashion-mnist"; do
      ls "$d"/t10k-labels-idx1-ubyte* >/dev/null 2>&1 && return 0
    done
  fi
  [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]
}
if have_data; then
  # optional real text for MiniLM; the package ships sentences when it is missing
  if [ ! -f /usr/share/games/fortunes/fortunes ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq fortunes-min >/dev/null 2>&1 || true
  fi
  exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo -n"
if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
  echo "Installing Fashion-MNIST: $SUDO apt-get install dataset-fashion-mnist"
  $SUDO apt-get update -qq >/dev/null 2>&1
  $SUDO apt-get install -y -qq dataset-fashion-mnist fortunes-min >/dev/null 2>&1 \
    || $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if have_data; then exit 0; fi
cat >&2 <<MSG
Fashion-MNIST is missing and could not be installed automatically. Run:
    sudo apt-get install dataset-fashion-mnist
or put the four IDX files (train/t10k images and labels, .gz or not) in a directory and
set EDGESLIM_DATA=that/directory, then run make again.
MSG
exit 1
