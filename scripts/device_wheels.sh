#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with exactly the Python packages that the lent GPU machine's image
# lacks for scripts/gpu_smoke.sh and scripts/gpu_convergence.sh, checks them, and prints the one
# `device` call to make. Run it here (a machine with the package registries), after
# `bash scripts/install.sh ffcv,dev` (it builds DeepSpeed's wheel with .venv's torch).
#
#   bash scripts/device_wheels.sh                  # CPython 3.12 manylinux x86_64 (the device image)
#   bash scripts/device_wheels.sh --python 3.11 --dest .whl-3.11   # the same set for this machine,
#                                                  # installed and imported here (a rehearsal)
#
# The device image (the `device` tool's KINDS.md) is Python 3.12 with torch 2.11 + Triton 3.6,
# numpy, scipy, scikit-learn, matplotlib, tensorboard, numba, pillow, tqdm, pytest,
# pytest-timeout, psutil, py-cpuinfo, msgpack, einops, ninja, packaging; no network, no FFCV, no
# DeepSpeed. FFCV cannot be had there (no cp312 wheel, it compiles against OpenCV and libjpeg-turbo
# headers the image lacks): the scripts use the memmap loader instead (--loader auto). What is
# missing, and so carried:
#   deepspeed      built here from its sdist (its only upload for our versions; `pip download
#                  --only-binary=:all: deepspeed` silently picks an ancient 0.3.1.dev5 wheel),
#                  the newest release that pyproject.toml's `deepspeed` requirement admits,
#                  DS_BUILD_OPS=0 (the trainer uses a torch AdamW: no DeepSpeed op is compiled)
#   hjson, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions
#                  DeepSpeed's requirements that the image lacks (pydantic's own, and a
#                  typing-extensions new enough for it)
#   diffusers and its requirements that the image lacks (huggingface-hub, safetensors, regex,
#                  requests, pyyaml, hf-xet, ...): gpu_smoke.sh's sample step decodes latents with a
#                  random-weight AutoencoderKL of Stable Diffusion's shape (no weights travel)
# Versions are those of this checkout's .venv, so the device runs what the tests ran here.
# Also copies CIFAR-10's train.tar.gz (../shared/data/cifar10 or $CIFAR10_DIR) to .device-data/ for
# gpu_convergence.sh, and checks that everything that travels stays under the 64 MiB limit.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYVER="${2:?--python needs a version such as 3.12}"; shift ;;
        --dest) DEST="${2:?--dest needs a folder}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "device_wheels.sh: unknown argument '$1' (expected --python X.Y, --dest DIR or --help)" >&2; exit 2 ;;
    esac
    shift
done
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "device_wheels.sh: no .venv here; run 'bash scripts/install.sh ffcv,dev' first" >&2
    exit 2
fi
LIMIT_MB=64

version_of() {  # the version of a distribution installed in .venv
    "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}
# deepspeed: the newest sdist that pyproject.toml's requirement admits.
DS_REQ="$("$PY" - <<'EOF'
import re
text = open("pyproject.toml").read()
print(re.search(r'"(deepspeed[^"]*)"', text).group(1))
EOF
)"
PURE=(hjson annotated-types typing-inspection typing-extensions pydantic
      diffusers huggingface-hub requests certifi idna urllib3 filelock fsspec importlib-metadata zipp lazy-importer
      click anyio h11 httpcore2 httpx2 truststore)
BINARY=(pydantic-core safetensors regex pyyaml hf-xet charset-normalizer)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "[wheels] deepspeed: sdist for '$DS_REQ', built here (DS_BUILD_OPS=0)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$tmp/sdist" "$DS_REQ"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$DEST" "$tmp"/sdist/deepspeed-*.tar.gz
DS_VERSION="$(basename "$DEST"/deepspeed-*.whl | cut -d- -f2)"

platform=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64)
for name in "${PURE[@]}"; do
    v="$(version_of "$name")"
    echo "[wheels] $name==$v"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST" "$name==$v"
done
for name in "${BINARY[@]}"; do
    v="$(version_of "$name")"
    echo "[wheels] $name==$v (CPython $PYVER manylinux x86_64)"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version "$PYVER" --implementation cp "${platform[@]}" -d "$DEST" "$name==$v"
done

# One version of each (two stop the device's install), and the import check in a scratch target.
dupes="$(ls "$DEST" | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)"
if [ -n "$dupes" ]; then
    echo "device_wheels.sh: more than one wheel of: $dupes" >&2
    exit 1
fi
here="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [ "$here" = "$PYVER" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --target "$tmp/site" "$DEST"/*.whl
    PYTHONPATH="$tmp/site" "$PY" -c "
import deepspeed, diffusers, hjson, pydantic
assert deepspeed.__version__ == '$DS_VERSION', deepspeed.__version__
assert diffusers.__file__.startswith('$tmp/site'), diffusers.__file__
from diffusers import AutoencoderKL
import importlib.metadata as md, sys
# Every module imported from outside the carried set must be one the device image has.
image = {'numpy', 'scipy', 'scikit-learn', 'matplotlib', 'tensorboard', 'numba', 'pillow', 'tqdm', 'pytest',
         'pytest-timeout', 'psutil', 'py-cpuinfo', 'msgpack', 'einops', 'ninja', 'packaging', 'torch', 'triton',
         'setuptools', 'pip',
         'sympy', 'mpmath', 'networkx', 'jinja2', 'markupsafe'}  # torch's own requirements: there with torch
owners = md.packages_distributions()
outside = set()
for name, mod in list(sys.modules.items()):
    f = getattr(mod, '__file__', None) or ''
    if '/site-packages/' in f and not f.startswith('$tmp/site'):
        outside.update(d.lower().replace('_', '-') for d in owners.get(name.split('.')[0], []))
missing = sorted(d for d in outside if d not in image and not d.startswith('nvidia-'))
assert not missing, f'imported from this venv, not carried and not in the image: {missing}'
print(f'[wheels] import check: deepspeed {deepspeed.__version__}, pydantic {pydantic.VERSION}, diffusers {diffusers.__version__}')"
else
    # Another Python's binary wheels cannot be imported here: check what can be checked.
    for f in "$DEST"/pydantic_core-*.whl; do
        case "$f" in *"cp${PYVER/./}"*manylinux*x86_64*) ;; *) echo "device_wheels.sh: $f is not for CPython $PYVER x86_64" >&2; exit 1 ;; esac
    done
    echo "[wheels] import check: skipped (this machine runs Python $here, the wheels are for $PYVER; build the"
    echo "         same set for $here with --python $here --dest .whl-$here to check it here)"
fi

# gpu_convergence.sh's CIFAR-10 (../shared does not travel to the device): .device-data/cifar10,
# ignored by git, carried.
data_kb=0
if [ "$DEST" = .whl ]; then
    for d in "${CIFAR10_DIR:-}" ../shared/data/cifar10; do
        if [ -n "$d" ] && [ -f "$d/train.tar.gz" ]; then
            mkdir -p .device-data/cifar10
            cp "$d/train.tar.gz" .device-data/cifar10/train.tar.gz
            data_kb="$(du -sk .device-data | cut -f1)"
            echo "[wheels] CIFAR-10 for gpu_convergence.sh: .device-data/cifar10/train.tar.gz ($((data_kb / 1024)) MiB)"
            break
        fi
    done
    [ "$data_kb" = 0 ] && echo "[wheels] no CIFAR-10 found (../shared/data/cifar10 or \$CIFAR10_DIR): gpu_convergence.sh will not run there"
fi

# What travels: the tracked and untracked-not-ignored tree, plus the carried folders (64 MiB in all).
tree_kb="$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -ck 2>/dev/null | tail -n 1 | cut -f1)"
whl_kb="$(du -sk "$DEST" | cut -f1)"
total_mb=$(( (tree_kb + whl_kb + data_kb + 1023) / 1024 ))
echo "[wheels] $(ls "$DEST" | wc -l) wheels in $DEST: $((whl_kb / 1024)) MiB; data $((data_kb / 1024)) MiB; working tree $((tree_kb / 1024)) MiB; total ${total_mb} MiB of ${LIMIT_MB}"
if [ "$total_mb" -ge "$LIMIT_MB" ]; then
    echo "device_wheels.sh: ${total_mb} MiB would travel, over the device's ${LIMIT_MB} MiB" >&2
    exit 1
fi
if [ "$DEST" = .whl ]; then
    install='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;'
    cat <<EOF

The device calls (tool 'device', verb 'run'), in this order; a lent machine gives 15 minutes of
device time per task (start ~30 s, at most 10 minutes per call), so the smoke is two calls and
scripts/gpu_convergence.sh, ~8 minutes, needs a task of its own. Give the machine back
(give_back) after the last call. Each call's files come back under /work/.device/N/.
  1. carry [".whl"], timeout_s 560 (measured: ~330 s on an H200 before sample,fid were added):
     $install bash scripts/gpu_smoke.sh --only setup,env,compile,tests,train,resume,sample,fid
  2. carry [".whl"], timeout_s 420:
     $install bash scripts/gpu_smoke.sh --only setup,bench,mfu
  (another task) carry [".whl", ".device-data"], timeout_s 560:
     $install bash scripts/gpu_convergence.sh
EOF
fi
