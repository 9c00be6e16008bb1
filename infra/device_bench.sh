#!/usr/bin/env bash
# The GPU measurement of issue 11 item 8 as one command: the Cofe-Net sweep (bench/enhance.py
# --device cuda) and the pipeline with GPU actors (bench/gpu_pipeline.py), each under its own
# `timeout`, ~8 minutes in all. JSON, logs and summary.txt go to $OUT (./device_out if unset).
#
# The lent GPU machine (/work/.library/device/) has python3 3.12 with torch+CUDA, numpy, pandas,
# pyarrow, opencv, scikit-image, ... but no Ray and no pydantic, and no network. Prepare here,
# once (network needed): `bash infra/device_pack.sh` -> build/device/site.tar.xz (~26 MB, a
# stripped Ray 2.60 + pydantic for cp312; build/ is git-ignored). Then, with the device tool:
#
#   run(command="bash infra/device_bench.sh", carry=["build/device"], timeout_s=540)
#
# Test here on the CPU with tiny sizes: OUT=/tmp/devtest bash infra/device_bench.sh --quick
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/device_out}"
mkdir -p "$OUT"
QUICK=0 SHORT=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
[[ "${1:-}" == "--short" ]] && SHORT=1  # ~4.5 minutes: after a training call in the same lease
# --pipeline: no sweep; the pipeline with the shipped model, then with a full-width one (~3 min)
PIPELINE_ONLY=0
[[ "${1:-}" == "--pipeline" ]] && PIPELINE_ONLY=1
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
START=$SECONDS

# Python: this checkout's venv when it has Ray and torch, else the machine's python3 plus the
# carried bundle (unpacked outside the tree, first on the path).
PY="$ROOT/.venv/bin/python"
if ! { [[ -x "$PY" ]] && "$PY" -c "import ray, torch" 2>/dev/null; }; then
    PY="$(command -v python3)"
    if ! "$PY" -c "import ray, pydantic" 2>/dev/null; then
        BUNDLE="$ROOT/build/device/site.tar.xz"
        if [[ ! -f "$BUNDLE" ]]; then
            echo "no Ray here and no $BUNDLE: run infra/device_pack.sh and carry build/device" \
                | tee "$OUT/summary.txt"
            exit 2
        fi
        SITE=/tmp/fundus_site
        rm -rf "$SITE" && mkdir -p "$SITE" && tar -C "$SITE" -xJf "$BUNDLE"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

{
    echo "python: $PY"
    "$PY" -c "import sys, torch, ray, pydantic; print(sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, \
'pydantic', pydantic.VERSION)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
        2>/dev/null || echo "nvidia-smi: none"
    echo "cores: $(nproc)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "setup took $((SECONDS - START)) s"

DEVICE=cpu
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && DEVICE=cuda
if ((QUICK)); then
    ENHANCE=(--models small --size 256 --images 1 --distinct 1 --rounds 1 --warmup 1
        --batch 1,2 --dtypes fp32,bf16 --budget-s 60)
    PIPE=(--images 4 --size 256 --enhance-batch 2 --distinct 2)
    T_ENHANCE=240 T_PIPE=240
elif ((PIPELINE_ONLY)); then
    ENHANCE=()
    PIPE=(--images 3000 --size 512 --enhance-batch 32)
    T_ENHANCE=0 T_PIPE=100
elif ((SHORT)); then
    ENHANCE=(--models full,small --size 512 --images 32 --rounds 2 --warmup 2
        --batch 8,32,64 --compile --budget-s 120)
    PIPE=(--images 2000 --size 512 --enhance-batch 32)
    T_ENHANCE=170 T_PIPE=100
else
    ENHANCE=(--models small,full --size 512 --images 64 --rounds 3 --warmup 3
        --batch 1,4,8,16,32,64 --compile --budget-s 250)
    PIPE=(--images 3000 --size 512 --enhance-batch 32)
    T_ENHANCE=300 T_PIPE=150
fi

RC_ENHANCE=0
touch "$OUT/enhance.log"
if ((T_ENHANCE > 0)); then
    echo "== enhance sweep on $DEVICE (limit ${T_ENHANCE} s)"
    timeout -k 10 "$T_ENHANCE" "$PY" bench/enhance.py --sweep --device "$DEVICE" \
        "${ENHANCE[@]}" --json "$OUT/enhance.json" > "$OUT/enhance.log" 2>&1
    RC_ENHANCE=$?
    tail -n 40 "$OUT/enhance.log"
fi

echo "== pipeline with GPU actors (limit ${T_PIPE} s)"
timeout -k 10 "$T_PIPE" "$PY" bench/gpu_pipeline.py "${PIPE[@]}" \
    --json "$OUT/gpu_pipeline.json" > "$OUT/gpu_pipeline.log" 2>&1
RC_PIPE=$?
tail -n 5 "$OUT/gpu_pipeline.log"
if ((PIPELINE_ONLY)); then
    echo "== pipeline with a full-width Cofe-Net (limit ${T_PIPE} s)"
    timeout -k 10 "$T_PIPE" "$PY" bench/gpu_pipeline.py --images 2000 --size 512 \
        --enhance-batch 32 --width 1.0 --json "$OUT/gpu_pipeline_full.json" \
        >> "$OUT/gpu_pipeline.log" 2>&1
    RC_PIPE=$((RC_PIPE | $?))
    tail -n 3 "$OUT/gpu_pipeline.log"
fi

{
    echo "device_bench: ${1:---full} run on $DEVICE," \
        "$((SECONDS - START)) s; exit codes: enhance $RC_ENHANCE, pipeline $RC_PIPE (124: timeout)"
    head -n 3 "$OUT/env.txt"
    grep -E "^(fastest|  WARNING|  torch.compile)" "$OUT/enhance.log"
    grep -E "^(images/s|GPU busy|[0-9]+ ok)" "$OUT/gpu_pipeline.log"
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"
((RC_ENHANCE == 0 && RC_PIPE == 0))
