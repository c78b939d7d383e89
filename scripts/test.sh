#!/usr/bin/env bash
# The test suite on a fresh machine: install everything (dev extras included), then pytest.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh ffcv,dev
# Idle OpenMP threads sleep instead of spinning: the suite starts many processes (DeepSpeed ranks,
# loaders) on few cores, where spinning threads slow each other down several times over.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Two test files at a time (pytest-xdist; a file's tests stay in one worker, so its module fixtures
# run once): most tests wait on process start-up or on one rank, so two keep 2 cores busy.
# SPEED_FAST_TEST_WORKERS=N for another count (0: no workers, one process).
exec .venv/bin/python -m pytest -q -n "${SPEED_FAST_TEST_WORKERS:-2}" --dist loadfile tests "$@"
