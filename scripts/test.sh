#!/usr/bin/env bash
# The test suite on a fresh machine: install everything (dev extras included), then pytest.
# Extra arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh ffcv,dev
exec .venv/bin/python -m pytest -q tests "$@"
