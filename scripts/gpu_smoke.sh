#!/usr/bin/env bash
# The first thing to run on a GPU machine (one H100/H200; ~6-7 minutes per call of the two below).
#
#   bash scripts/gpu_smoke.sh                 # prints a PASS/FAIL/SKIP table; with $OUT set, writes there
#                                             # gpu_smoke.json, the benchmarks' JSON, train_metrics.jsonl and
#                                             # smoke_logs.tgz (every step's log): 5 files
#   OUT=/tmp/smoke bash scripts/gpu_smoke.sh
#   bash scripts/gpu_smoke.sh --rehearse      # the same steps on a CPU machine (no GPU), scaled down
#   bash scripts/gpu_smoke.sh --only train,resume   # some of the steps (resume needs train)
#
# Python: $PYTHON, else .venv/bin/python when it exists, else the machine's python3 with its own
# torch and Triton (a lent GPU image: offline, no .venv, nothing installed). The project runs from
# this source tree (PYTHONPATH; the C++ extension builds on first use); nothing is installed and
# scripts/install.sh is never started. What the image lacks (DeepSpeed and its requirements) is
# carried as wheels: scripts/device_wheels.sh fills .whl/ and prints the exact `device` call. FFCV
# is optional: without it the trainer reads the same batches through the memmap loader.
#
# Steps, each with its own time limit (their sum is 17.5 minutes, the most they may take; the first
# H200 run took 5 minutes for setup,env,compile,tests,train,resume), each run even if an earlier
# one failed; each reports PASS, FAIL or SKIP with the reason. A lent machine takes at most 10
# minutes per call, so there the smoke is two calls (scripts/device_wheels.sh prints both):
#   --only setup,env,compile,tests,train,resume,sample,fid   (~5.5 min measured without sample,fid)
#   --only setup,bench,mfu                          (at most 7 min; not yet measured)
#   setup     which Python, torch, Triton, DeepSpeed and loader this run uses (FAIL: no triton)
#   env       speed-fast env: the triton backend is active (its test launch matched the reference)
#   compile   speed-fast env --compile for this GPU's architecture: every kernel variant compiles
#   tests     the fused-op tests with triton on CUDA against the torch reference
#   bench     benchmarks/bench_fused_step.py: step times, and the kernels' GB/s against the peak
#   mfu       benchmarks/bench_train_step.py: DiT-XL/2 at micro-batch 32 with the trainer's GPU set-up
#             (compiled, bf16 autocast over fp32 weights, SDPA, triton ops): ms/step, img/s, MFU
#   train     DiT-XL/2 on synthetic latents, deepspeed --num_gpus 1, bf16, 30 steps (eager: no
#             torch.compile, no evaluation): finite, falling loss, step time, peak GPU memory, a checkpoint
#   resume    the same command to step 35: resumes from that checkpoint (~11 GB with AdamW state
#             and EMA, SHA-256-verified on load) and continues
#   sample    torchrun --nproc_per_node 1 speed-fast sample of that run: 256 samples, DDPM-50, guidance
#             1.5, bf16, decoded by a random-weight AutoencoderKL of Stable Diffusion's shape (no
#             weights travel) into ADM's .npz (arr_0 uint8 [256, 256, 256, 3]): img/s, and the minutes
#             that predicts for 50,000 DDPM-250 samples on 8 such GPUs
#   fid       torchrun speed-fast eval of those samples against a random uint8 reference: ADM's metrics
#             with the Inception network when it is available offline (cache or $SPEED_FAST_INCEPTION),
#             else the raw features, saying why (a check of the path and its time, not of quality)
# --rehearse: TRITON_INTERPRET=1 for env/tests, sm_90 compile, bench --quick, DiT-S/2 on 8x8
# latents for 30 + 4 steps on the CPU (SMOKE_STEPS, SMOKE_MORE), 8 samples of 5 steps decoded by a
# small AutoencoderKL, time limits x6: checks the script
# itself without a GPU. With tests/no_ffcv first on PYTHONPATH and PYTHON set it rehearses the lent
# machine's conditions (no FFCV, no install): tests/test_device_rehearsal.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT="$(pwd)"

REHEARSE=0
STEPS_ALL="setup,env,compile,tests,bench,mfu,train,resume,sample,fid"
ONLY="$STEPS_ALL"
STEP=""  # internal: run one step (the script calls itself under `timeout`, which needs a program)
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearse) REHEARSE=1 ;;
        --only) ONLY="${2:-}"; shift ;;
        --step) STEP="${2:-}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_smoke.sh: unknown argument '$1' (expected --rehearse, --only STEPS or --help)" >&2; exit 2 ;;
    esac
    shift
done

for name in ${ONLY//,/ }; do
    case "$name" in
        setup|env|compile|tests|bench|mfu|train|resume|sample|fid) ;;
        *) echo "gpu_smoke.sh: --only takes $STEPS_ALL; got '$name'" >&2; exit 2 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi
# The project from this source tree, ahead of whatever is installed; carried wheels stay on the path.
[ -z "$STEP" ] && export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "$REHEARSE" = 1 ]; then
    ARCH=sm_90
    MODEL="DiT-S/2"; LATENT=8; SAMPLES=256; BATCH=32; STEPS="${SMOKE_STEPS:-30}"; MORE="${SMOKE_MORE:-4}"
    PRECISION=auto
    NSAMPLE=8; SAMPLE_STEPS=5; SAMPLE_BATCH=4; VAE_SHAPE=small
    BENCH_ARGS=(--quick --no-compile)
    MFU_ARGS=(--quick --rounds 3)  # no GPU: the CPU section, a check of the script path only
    TEST_ENV=(TRITON_INTERPRET=1)
    export CUDA_VISIBLE_DEVICES=""
else
    if [ -z "$STEP" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "[smoke] torch sees no CUDA device (use --rehearse to check the script without a GPU)" >&2
        exit 1
    fi
    ARCH="${SMOKE_ARCH:-}"
    MODEL="DiT-XL/2"; LATENT=32; SAMPLES=1024; BATCH=64; STEPS=30; MORE=5; PRECISION=bf16
    NSAMPLE=256; SAMPLE_STEPS=50; SAMPLE_BATCH=128; VAE_SHAPE=sd
    BENCH_ARGS=(--iters 20 --no-compile)
    MFU_ARGS=(--no-cpu --gpu-batches 32)
    TEST_ENV=()
fi
JOBS="$(nproc 2>/dev/null || echo 2)"
WORKERS=$((JOBS < 4 ? JOBS : 4))  # loader threads: at most the cores (numba's pool)

# run_step NAME SECONDS: runs step_NAME (this script with --step NAME) with a time limit (timeout
# signals the step's whole process group), logs to $WORK/logs/NAME.log, records PASS/FAIL, the
# seconds taken and a detail: the last "RESULT:" line the step printed.
run_step() {
    local name="$1" limit="$2"
    case ",$ONLY," in *",$name,"*) ;; *) return 0 ;; esac
    local log="$WORK/logs/$name.log" start end status detail
    local flags=()
    # A small CPU is not the target: rehearsal limits are 6x (SMOKE_LIMIT_SCALE to change).
    [ "$REHEARSE" = 1 ] && flags=(--rehearse) && limit=$((limit * ${SMOKE_LIMIT_SCALE:-6}))
    echo "[smoke] $name (limit ${limit}s) ..."
    start=$(date +%s)
    timeout --kill-after=10 "$limit" bash "$ROOT/scripts/gpu_smoke.sh" --step "$name" "${flags[@]}" > "$log" 2>&1
    status=$?
    end=$(date +%s)
    detail="$(grep -a '^RESULT:' "$log" | tail -n 1 | cut -c9- | tr '\t' ' ')"
    if [ "$status" -eq 0 ]; then
        printf '%s\tPASS\t%s\t%s\n' "$name" "$((end - start))" "${detail:-ok}" >> "$RESULTS"
    elif [ "$status" -eq "$SKIP" ]; then
        printf '%s\tSKIP\t%s\t%s\n' "$name" "$((end - start))" "${detail:-skipped}" >> "$RESULTS"
    else
        [ "$status" -eq 124 ] && detail="timed out after ${limit}s; ${detail}"
        # Else the last error message (e.g. "ValueError: ..." of a rank), else the last line.
        [ -z "$detail" ] && detail="$(grep -a -E '(Error|error):' "$log" | tail -n 1 | cut -c1-200 | tr '\t' ' ')"
        [ -z "$detail" ] && detail="$(grep -a -v '^\s*$' "$log" | tail -n 1 | cut -c1-200 | tr '\t' ' ')"
        detail="exit $status: $detail"
        printf '%s\tFAIL\t%s\t%s\n' "$name" "$((end - start))" "$detail" >> "$RESULTS"
    fi
    # Each result as soon as it is known: a device call cut short still brings back what finished.
    if [ -n "${OUT:-}" ]; then cp "$RESULTS" "$OUT/results.tsv"; fi
}

SKIP=3  # a step's exit status for "cannot run here" (its RESULT line says why)

# Whether deepspeed imports for this Python (train and resume need it).
have_deepspeed() { "$PY" -c "import deepspeed" > /dev/null 2>&1; }

step_setup() {
    "$PY" - <<'EOF'
import importlib.util, platform, sys
import torch
parts = [f"Python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}"]
try:
    import triton
    parts.append(f"triton {triton.__version__}")
except ImportError as exc:
    parts.append(f"no triton ({exc})")
try:
    import deepspeed
    parts.append(f"deepspeed {deepspeed.__version__}")
except Exception as exc:
    parts.append(f"no deepspeed ({type(exc).__name__}; carry .whl: scripts/device_wheels.sh)")
from speed_fast.data import resolve_loader
loader, note = resolve_loader("auto")
parts.append(f"loader {loader}" + (" (FFCV not importable)" if note else ""))
import speed_fast
parts.append(f"speed_fast from {speed_fast.__file__.rsplit('/speed_fast/', 1)[0]}")
print("RESULT: " + "; ".join(parts))
sys.exit(0 if importlib.util.find_spec("triton") else 1)
EOF
}

# Rehearsal only: whether this Triton's interpreter runs a loop with a runtime bound (every kernel
# here has one). Triton 3.6.0's interpreter cannot under numpy 2; a GPU compiles the kernels instead.
interpreter_runs_loops() {
    [ "$REHEARSE" = 1 ] || return 0
    local why
    why="$(TRITON_INTERPRET=1 "$PY" - 2>&1 <<'EOF'
import numpy, torch, triton
import triton.language as tl

@triton.jit
def k(x, n, BLOCK: tl.constexpr):
    for i in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
        off = i * BLOCK + tl.arange(0, BLOCK)
        tl.store(x + off, tl.load(x + off, mask=off < n) + 1, mask=off < n)

x = torch.zeros(40)
try:
    k[(2,)](x, 40, BLOCK=16)
except Exception as exc:
    print(f"Triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound under numpy "
          f"{numpy.__version__} ({type(exc).__name__}: {exc}); the compile step checks the kernels instead")
EOF
)"
    if [ -n "$why" ]; then
        echo "RESULT: $why"
        return 1
    fi
}

step_env() {
    interpreter_runs_loops || return "$SKIP"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
    env "${TEST_ENV[@]}" "$PY" -m speed_fast.cli env || return 1
    env "${TEST_ENV[@]}" "$PY" - <<'EOF'
import torch, triton
from speed_fast.ops import backend_status
ok, why = backend_status("triton")
where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter)"
print(f"RESULT: triton {triton.__version__}, torch {torch.__version__}, {where}: triton {'active' if ok else 'unavailable'}")
raise SystemExit(0 if ok else f"triton backend unavailable: {why}")
EOF
}

step_compile() {
    env -u TRITON_INTERPRET "$PY" -m speed_fast.cli env --compile "$ARCH" --jobs "$JOBS" > "$WORK/compile.txt"
    local status=$?
    cat "$WORK/compile.txt"
    echo "RESULT: $(head -n 1 "$WORK/compile.txt")"
    return $status
}

step_tests() {
    interpreter_runs_loops || return "$SKIP"
    env "${TEST_ENV[@]}" "$PY" -m pytest -q -p no:cacheprovider -x -k "triton or launch or synchronise" \
        tests/test_sample_timesteps.py tests/test_sample_and_noise.py tests/test_weighted_mse.py \
        tests/test_launchers.py tests/test_backends.py > "$WORK/tests.txt" 2>&1
    local status=$?
    cat "$WORK/tests.txt"
    echo "RESULT: $(grep -a -E '[0-9]+ (passed|failed)' "$WORK/tests.txt" | tail -n 1)"
    return $status
}

step_bench() {
    "$PY" benchmarks/bench_fused_step.py "${BENCH_ARGS[@]}" --out "$WORK/fused_step.json" || return 1
    [ -n "${OUT:-}" ] && cp "$WORK/fused_step.json" "$OUT/fused_step.json"
    "$PY" - "$WORK/fused_step.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r.get("gb_per_s")]
best = {}
for r in rows:
    if r["gb_per_s"] > best.get(r["name"], {}).get("gb_per_s", 0):
        best[r["name"]] = r
parts = [f"{n.split()[1]} {r['gb_per_s']:.0f} GB/s ({100 * r['fraction_of_peak']:.0f}% of peak) at {r['shape']}"
         if r.get("fraction_of_peak") else f"{n.split()[1]} {r['gb_per_s']:.0f} GB/s at {r['shape']}"
         for n, r in best.items()]
print("RESULT: " + ("; ".join(parts) if parts else "step times only (no GPU: no bandwidth rows)"))
EOF
}

step_mfu() {
    "$PY" benchmarks/bench_train_step.py "${MFU_ARGS[@]}" --out "$WORK/train_step.json" || return 1
    [ -n "${OUT:-}" ] && cp "$WORK/train_step.json" "$OUT/train_step.json"
    "$PY" - "$WORK/train_step.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r.get("mfu") is not None]
parts = [f"{r['variant']} {r['ms_p50']:.0f} ms/step, {r['img_per_s']:.0f} img/s, MFU {100 * r['mfu']:.1f}%"
         for r in rows]
print("RESULT: " + (f"{rows[0]['name']}: " + "; ".join(parts) if rows else "no MFU rows (no GPU: CPU section only)"))
EOF
}

make_latents() {
    "$PY" - "$WORK" "$SAMPLES" "$LATENT" <<'EOF'
import sys
import numpy as np
work, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
np.save(f"{work}/latents.npy", rng.standard_normal((n, 4, size, size), dtype=np.float32))
np.save(f"{work}/labels.npy", np.arange(n) % 1000)  # every class of 1000 once n >= 1000
EOF
    "$PY" -m speed_fast.cli write-latents "$WORK/latents.npy" --labels "$WORK/labels.npy" \
        --out "$WORK/synthetic.beton" --no-progress
}

train_cmd() {  # train_cmd MAX_STEPS
    "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" train/main.py \
        --preset imagenet-dit-xl2 --model "$MODEL" --data "$WORK/synthetic.beton" --run-dir "$WORK/run" \
        --global-batch "$BATCH" --max-steps "$1" --precision "$PRECISION" --log-every 1 \
        --ckpt-every "$STEPS" --eval-every 0 --sample-steps 10 --no-compile --num-workers "$WORKERS" --no-progress \
        --loader auto
}

# Peak GPU memory of the training job, sampled once a second (MiB), while the job runs; every 10 s
# a progress line (the last logged step), so a step cut at its time limit shows how far it got.
watch_memory() {
    local peak=0 used ticks=0
    while kill -0 "$1" 2>/dev/null; do
        ticks=$((ticks + 1))
        if [ $((ticks % 10)) -eq 0 ]; then
            echo "[smoke] $(date +%T) last logged step: $(tail -n 1 "$WORK/run/metrics.jsonl" 2>/dev/null | cut -c1-120)"
        fi
        used="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)"
        case "$used" in ''|*[!0-9]*) ;; *) [ "$used" -gt "$peak" ] && peak="$used" ;; esac
        echo "$peak" > "$WORK/peak_mib"
        sleep 1
    done
}

# train_watched MAX_STEPS: train_cmd with watch_memory beside it; the training job's exit status.
train_watched() {
    train_cmd "$1" &
    local job=$!
    watch_memory "$job" &
    local watcher=$!
    wait "$job"
    local status=$?
    wait "$watcher"
    return "$status"
}

step_train() {
    if ! have_deepspeed; then
        echo "RESULT: deepspeed does not import for $PY: carry it (scripts/device_wheels.sh)"
        return "$SKIP"
    fi
    make_latents || return 1
    echo 0 > "$WORK/peak_mib"
    train_watched "$STEPS" || return
    [ -n "${OUT:-}" ] && cp "$WORK/run/metrics.jsonl" "$OUT/train_metrics.jsonl"
    SMOKE_LOADER="$(grep -q 'memmap loader reads the data' "$WORK/logs/train.log" && echo memmap || echo ffcv)" \
    "$PY" - "$WORK/run" "$STEPS" "$(cat "$WORK/peak_mib")" <<'EOF'
import json, math, os, statistics, sys
run, steps, peak = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
losses = [r["loss"] for r in recs]
assert [r["step"] for r in recs][-1] == steps, f"last logged step {recs[-1]['step']}, expected {steps}"
assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
k = max(1, len(losses) // 5)
first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
assert last < first, f"loss did not fall: mean of the first {k} steps {first:.4f}, of the last {k} {last:.4f}"
ckpt = os.path.join(run, "checkpoints", f"step-{steps:08d}")
assert os.path.isdir(ckpt), f"no checkpoint at {ckpt}"
step_s = statistics.median(r["step_s"] for r in recs[len(recs) // 2:])
mem = f", peak GPU memory {peak / 1024:.1f} GiB" if peak else ""
print(f"RESULT: loss {first:.3f} -> {last:.3f}, {step_s * 1e3:.0f} ms/step{mem}, checkpoint step {steps}, "
      f"loader {os.environ.get('SMOKE_LOADER', '?')}")
EOF
}

step_resume() {  # (checks below)
    if ! have_deepspeed; then
        echo "RESULT: deepspeed does not import for $PY: carry it (scripts/device_wheels.sh)"
        return "$SKIP"
    fi
    if [ ! -d "$WORK/run/checkpoints" ]; then
        echo "RESULT: no checkpoint from the train step to resume from"
        return "$SKIP"
    fi
    train_watched "$((STEPS + MORE))" || return
    if ! grep -a -q "resuming from .*(step $STEPS)" "$WORK/logs/resume.log"; then
        echo "RESULT: the run did not say it resumed from step $STEPS"
        return 1
    fi
    "$PY" - "$WORK/run" "$STEPS" "$MORE" <<'EOF'
import json, math, os, sys
run, steps, more = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
after = [r for r in recs if r["step"] > steps]
assert [r["step"] for r in after] == list(range(steps + 1, steps + more + 1)), [r["step"] for r in recs]
assert all(math.isfinite(r["loss"]) for r in after)
assert os.path.isdir(os.path.join(run, "checkpoints", f"step-{steps + more:08d}"))
print(f"RESULT: resumed at step {steps}, continued to {steps + more}, loss {after[-1]['loss']:.3f}")
EOF
}

have_diffusers() { "$PY" -c "import diffusers" > /dev/null 2>&1; }

# A random-weight diffusers AutoencoderKL in $WORK/vae: Stable Diffusion's shape (what DiT's
# sd-vae-ft-ema has: 4 latent channels, 8x downsampling, 83.7M parameters) on a GPU, a small one
# (2x downsampling) in a rehearsal. Decoding cost, not image quality, is what it stands for.
make_vae() {
    "$PY" - "$WORK/vae" "$VAE_SHAPE" <<'EOF'
import sys
import torch
from diffusers import AutoencoderKL
out, shape = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
if shape == "sd":
    channels, layers = (128, 256, 512, 512), 2
else:
    channels, layers = (32, 32), 1
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels,
                    down_block_types=("DownEncoderBlock2D",) * len(channels),
                    up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=layers,
                    norm_num_groups=32, scaling_factor=0.18215)
vae.save_pretrained(out)
print(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters, {2 ** (len(channels) - 1)}x downsampling")
EOF
}

launch_one() {  # torchrun with one process: the launcher path a lab uses with 8
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m speed_fast.cli "$@"
}

step_sample() {
    if [ ! -d "$WORK/run/checkpoints" ]; then
        echo "RESULT: no checkpoint from the train step to sample"
        return "$SKIP"
    fi
    if ! have_diffusers; then
        echo "RESULT: diffusers does not import for $PY (the VAE decode needs it): carry it (scripts/device_wheels.sh)"
        return "$SKIP"
    fi
    make_vae || return 1
    local start end
    start=$(date +%s.%N)
    launch_one sample --ckpt "$WORK/run" --ema --num-samples "$NSAMPLE" --steps "$SAMPLE_STEPS" --cfg 1.5 \
        --vae "$WORK/vae" --precision bf16 --batch-size "$SAMPLE_BATCH" --out "$WORK/samples.npz" \
        --grid "$WORK/grid.png" --no-progress || return 1
    end=$(date +%s.%N)
    [ -n "${OUT:-}" ] && cp "$WORK/samples.npz.json" "$OUT/samples.json"
    "$PY" - "$WORK/samples.npz" "$NSAMPLE" "$SAMPLE_STEPS" "$start" "$end" <<'EOF'
import json, sys
import numpy as np
path, n, steps, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
with np.load(path) as f:
    images, labels = f["arr_0"], f["arr_1"]
assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[0] == n and images.shape[3] == 3, images.shape
assert labels.shape == (n,) and labels.dtype == np.int64, (labels.shape, labels.dtype)
json.load(open(path + ".json"))  # the settings sidecar
wall = end - start
rate = n / wall  # the whole command: start-up, model and VAE load, sampling, decoding, writing
# 50,000 DDPM-250 samples on 8 such GPUs at this rate (sampling time scales with the step count)
predicted = 50000 * (250 / steps) / rate / 8 / 60
print(f"RESULT: {n} samples {images.shape[1]}x{images.shape[2]}, DDPM-{steps}, cfg 1.5, bf16, one rank: "
      f"{wall:.0f} s, {rate:.2f} img/s incl. start-up; 50K DDPM-250 on 8 GPUs at this rate: ~{predicted:.0f} min")
EOF
}

step_fid() {
    if [ ! -f "$WORK/samples.npz" ]; then
        echo "RESULT: no samples from the sample step to score"
        return "$SKIP"
    fi
    "$PY" - "$WORK/samples.npz" "$WORK/ref.npz" <<'EOF' || return 1
import sys
import numpy as np
with np.load(sys.argv[1]) as f:
    shape = f["arr_0"].shape
np.savez(sys.argv[2], arr_0=np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8))
EOF
    local features=raw why start end
    why="$(SPEED_FAST_OFFLINE=1 "$PY" -c "
from speed_fast.evaluation import resolve_inception
try:
    resolve_inception(None)
except Exception as exc:
    print(str(exc).splitlines()[0][:200])" 2>&1)"
    [ -z "$why" ] && features=inception
    start=$(date +%s.%N)
    SPEED_FAST_OFFLINE=1 launch_one eval --gen "$WORK/samples.npz" --ref "$WORK/ref.npz" --features "$features" \
        --no-ref-cache --json > "$WORK/eval.json" || return 1
    end=$(date +%s.%N)
    [ -n "${OUT:-}" ] && cp "$WORK/eval.json" "$OUT/eval.json"
    SMOKE_WHY="$why" "$PY" - "$WORK/eval.json" "$features" "$start" "$end" <<'EOF'
import json, math, os, sys
result = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
features, wall = sys.argv[2], float(sys.argv[4]) - float(sys.argv[3])
keys = ["fid", "sfid", "is", "precision", "recall"] if features == "inception" else ["fd_raw", "precision", "recall"]
values = {k: result.get(k) for k in keys}
for k, v in values.items():
    assert (v is None and result.get(f"{k}_unavailable")) or math.isfinite(v), (k, v, result)
shown = ", ".join(f"{k} {v:.4g}" if v is not None else f"{k} n/a" for k, v in values.items())
note = "" if features == "inception" else f" (no Inception offline: {os.environ['SMOKE_WHY']})"
print(f"RESULT: {features} features{note}: {shown} vs a random reference, "
      f"{result['n_generated']} + {result['n_reference']} images, {wall:.0f} s incl. start-up")
EOF
}

if [ -n "$STEP" ]; then  # one step, in the environment the main run exported
    WORK="$SMOKE_WORK"
    PORT="$SMOKE_PORT"
    case "$STEP" in
        setup|env|compile|tests|bench|mfu|train|resume|sample|fid) "step_$STEP"; exit $? ;;
        *) echo "gpu_smoke.sh: unknown step '$STEP'" >&2; exit 2 ;;
    esac
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/speed_fast_smoke.XXXXXX")"
mkdir -p "$WORK/logs"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi
RESULTS="$WORK/results.tsv"
: > "$RESULTS"
if [ "$REHEARSE" = 0 ]; then
    ARCH="$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")"
fi
export SMOKE_WORK="$WORK" SMOKE_ARCH="$ARCH"
SMOKE_PORT="$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")"
export SMOKE_PORT
START=$(date +%s)
run_step setup 20
run_step env 50      # includes building the C++ extension on first use
run_step compile 40
run_step tests 90
run_step bench 150   # 45 s was too little on the first H200 run (Triton JIT per shape, CPU reference)
run_step mfu 240     # torch.compile of DiT-XL/2 first; 90 s was too little on the first H200 run
run_step train 150   # DiT-XL/2's checkpoint: ~11 GB written, hashed and fsynced
run_step resume 110
run_step sample 150  # DiT-XL/2 checkpoint load, 256 x 50 x 2 forward passes (~6 PFLOP), 256 VAE decodes
run_step fid 60
TOTAL=$(($(date +%s) - START))

echo
echo "python: $PY"
printf '%-8s %-5s %6s  %s\n' step result secs detail
while IFS=$'\t' read -r name result secs detail; do
    printf '%-8s %-5s %6s  %s\n' "$name" "$result" "$secs" "$detail"
done < "$RESULTS"
echo "total ${TOTAL}s; logs in $WORK/logs$([ -n "${OUT:-}" ] && echo "; JSON and smoke_logs.tgz in $OUT")"

if [ -n "${OUT:-}" ]; then
    "$PY" - "$RESULTS" "$OUT/gpu_smoke.json" "$TOTAL" "$REHEARSE" <<'EOF'
import json, platform, sys
import torch
results, out, total, rehearse = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
steps = []
for line in open(results):
    name, result, secs, detail = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "result": result, "seconds": int(secs), "detail": detail})
meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (rehearsal)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "rehearsal": rehearse, "total_seconds": total}
json.dump({"meta": meta, "steps": steps}, open(out, "w"), indent=2)
EOF
    # The step logs as one file (a device call brings back at most 8 files).
    tar czf "$OUT/smoke_logs.tgz" -C "$WORK" logs
fi
! grep -q $'\tFAIL\t' "$RESULTS"
