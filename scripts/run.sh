#!/usr/bin/env bash
# The main job on a fresh machine: install, then run on the embedded default.
# Extra arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh ffcv
exec .venv/bin/speed-fast plan --out runs/plan.png "$@"
