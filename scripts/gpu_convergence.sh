#!/usr/bin/env bash
# SpeeD vs uniform on CIFAR-10 pixels on one GPU (H100/H200), 2 seeds per arm, in at most ~8 minutes:
# writes convergence_cifar10.json and .png (benchmarks/bench_convergence.py) under $OUT (default
# benchmarks/results). Run it after scripts/gpu_smoke.sh has passed on the same machine.
#
#   bash scripts/gpu_convergence.sh                       # CIFAR-10 from ../shared/data/cifar10 or $CIFAR10_DIR
#   STEPS=4000 EVAL_EVERY=1000 bash scripts/gpu_convergence.sh
#
# Python: $PYTHON, else .venv/bin/python when it exists, else python3 (a GPU image's own torch); the
# project runs from this source tree (PYTHONPATH), nothing is installed. It needs deepspeed, numba,
# matplotlib, scikit-learn and pillow importable: on a machine without network access (a lent GPU
# image) carry DeepSpeed as wheels (scripts/device_wheels.sh, which also copies CIFAR-10 into
# .device-data/, since ../shared does not travel); FFCV is optional (the memmap loader reads the
# same batches without it). The script checks them first and says which are missing.
#
# Budget (one GPU): the 4 runs go 2 at a time on the one device (a DiT-S/2 on 32x32 pixels does not
# fill an H100); each stops at $STEPS steps; the whole benchmark is cut at $BUDGET_S seconds
# (default 420) and whatever finished is still summarised by rerunning the benchmark, which reuses
# finished runs. Nothing here has been run on a GPU yet: the first run on one measures its time.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}"
STEPS="${STEPS:-2000}"
EVAL_EVERY="${EVAL_EVERY:-500}"
EVAL_SAMPLES="${EVAL_SAMPLES:-1000}"
BUDGET_S="${BUDGET_S:-420}"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" data

cifar=""
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
for d in "${CIFAR10_DIR:-}" ../shared/data/cifar10 shared/data/cifar10 .device-data/cifar10; do
    if [ -n "$d" ] && [ -f "$d/train.tar.gz" ]; then cifar="$d"; break; fi
done
if [ -z "$cifar" ]; then
    echo "gpu_convergence: CIFAR-10 not found: set CIFAR10_DIR to a folder holding train.tar.gz" >&2
    exit 2
fi

"$py" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "deepspeed", "numba", "matplotlib", "sklearn", "PIL", "speed_fast")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_convergence: missing Python packages {missing} for {sys.executable}; "
             "install speed_fast with its extras (or carry the wheels: scripts/device_wheels.sh) first")
from speed_fast.data import resolve_loader
print(f"gpu_convergence: loader {resolve_loader('auto')[0]}", flush=True)
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_convergence: no CUDA device visible to torch")
print(f"gpu_convergence: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
EOF

beton=data/cifar10-train.beton
if [ ! -f "$beton" ]; then
    "$py" -m speed_fast.cli write-pixels "$cifar/train.tar.gz" --out "$beton" --no-progress
fi

bench=("$py" benchmarks/bench_convergence.py --dataset "$beton" --preset cifar10 --arms uniform,speed_dual
       --seeds 2 --steps "$STEPS" --eval-every "$EVAL_EVERY" --eval-samples "$EVAL_SAMPLES" --jobs 2
       --work-dir data/convergence_cifar10.runs --out "$OUT/convergence_cifar10.json"
       --trainer-arg=--num-workers=4)
start=$(date +%s)
status=0
timeout --signal=TERM --kill-after=30 "$BUDGET_S" "${bench[@]}" || status=$?
echo "gpu_convergence: benchmark exit $status after $(( $(date +%s) - start )) s"
if [ "$status" -eq 124 ]; then
    echo "gpu_convergence: the budget ran out before every run finished; raise BUDGET_S or lower STEPS" >&2
fi
exit "$status"
