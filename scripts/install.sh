#!/usr/bin/env bash
# Set-up shared by scripts/run.sh and scripts/test.sh: system packages FFCV needs,
# a virtual environment in .venv, torch, and speed_fast with the given extras.
# Safe to re-run: it only installs what is missing.
#
#   bash scripts/install.sh ffcv,dev
#
# torch: CPU machines get the pinned CPU build (SPEED_FAST_TORCH, default torch==2.13.0);
# on a machine with an NVIDIA GPU the default is an unpinned torch (a CUDA build), and a
# torch already present in .venv (e.g. one you installed for your CUDA version) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-ffcv}"
python="${PYTHON:-python3}"

missing=()
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
pkg-config --exists opencv4 2>/dev/null || missing+=(libopencv-dev)
pkg-config --exists libturbojpeg 2>/dev/null || [ -e /usr/include/turbojpeg.h ] || missing+=(libturbojpeg0-dev)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "[install] apt-get install ${missing[*]} (needed to build FFCV)"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q "${missing[@]}" >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; }
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        default_torch="torch"
    else
        default_torch="torch==2.13.0"
    fi
    echo "[install] ${SPEED_FAST_TORCH:-$default_torch}"
    "${pip[@]}" "${SPEED_FAST_TORCH:-$default_torch}"
fi

echo "[install] speed_fast[$extras]"
"${pip[@]}" -e ".[$extras]"
