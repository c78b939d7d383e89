#!/usr/bin/env bash
# The main job on a fresh machine: install, then train the embedded default (the `digits`
# preset: a small class-conditional DiT with SpeeD on scikit-learn's 8x8 digits) to completion
# with DeepSpeed, one rank per GPU or one CPU rank. Extra arguments go to train/main.py
# (e.g. --max-steps 500, --strategy uniform, --preset imagenet-dit-xl2 --data latents.beton).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh ffcv
exec .venv/bin/deepspeed train/main.py "$@"
