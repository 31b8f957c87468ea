#!/usr/bin/env bash
# Sets up everything lmoe_jax needs on a fresh Debian/Ubuntu machine, offline data included:
#   - the Debian package dataset-fashion-mnist (idx files in /usr/share/datasets/fashion-mnist/)
#   - a virtual environment in .venv with requirements.txt (and requirements-test.txt with --test)
#   - the animal-mnist wheel, installed WITHOUT its dependencies: it declares the full
#     `tensorflow` package, which would put a second TensorFlow beside tensorflow-cpu.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "[setup] installing Debian package dataset-fashion-mnist" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
req=requirements.txt
[ "$want_tests" = 1 ] && req=requirements-test.txt
echo "[setup] pip install -r $req (into .venv)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps animal-mnist==0.4
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "[setup] done: .venv is ready" >&2
