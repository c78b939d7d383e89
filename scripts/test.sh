#!/usr/bin/env bash
# The test suite on a fresh machine: install everything (dev extras included), then pytest.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh ffcv,dev
# Idle OpenMP threads sleep instead of spinning: the suite starts many processes (DeepSpeed ranks,
# loaders) on few cores, where spinning threads slow each other down several times over.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec .venv/bin/python -m pytest -q tests "$@"
