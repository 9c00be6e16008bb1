#!/usr/bin/env bash
# Train a recipe's leave-one-source-out folds and its all-source model side by side on the lent
# GPU machine, as one command that ends inside its time: the runs first train PROBE steps
# together (constant learning rate: the same steps whatever the total), the slowest one's step
# rate sets --steps so the rest fits BUDGET seconds, and they resume to it. Each run is then
# the same as `jobs/train_cofenet.py --steps S` on the same data.
#
# The device has no archive and no pydantic, and a call carries 64 MiB with the repository.
# Prepare here (build/ is git-ignored):
#   python jobs/train_cofenet.py --config jobs/configs/train_gated_warm.yaml --pack --out build/gpudata
#   (cd <site-packages> && tar -cJf build/gpudata/pydantic.tar.xz annotated_types* pydantic* \
#       typing_extensions* typing_inspection*)    # for cp312, as infra/device_pack.sh fetches
# then, with the device tool:
#   run(command="bash infra/device_train.sh", carry=["build/gpudata"], timeout_s=480)
# $OUT gets <run>.pt (fp16 weights), train_logs.tar.gz (logs, eval and registry JSON),
# summary.txt and, where they fit the device's limits, <run>.checkpoint.pt (resume a run here:
# copy it to <out>/checkpoint.pt and pass --resume with a larger --steps). RUNS, CONFIG,
# PROBE, BUDGET and INIT_FOLDS (see launch) are settings.
# Test here on the CPU: OUT=/tmp/t RUNS=hrf PROBE=2 BUDGET=60 bash infra/device_train.sh
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/device_out}"
PACK="${PACK:-$ROOT/build/gpudata}"
CONFIG="${CONFIG:-jobs/configs/train_gated_gpu.yaml}"
RUNS="${RUNS:-all hrf chase_db1 eyepacs mx_dme}"
PROBE="${PROBE:-60}"
BUDGET="${BUDGET:-300}"
WORK="${WORK:-/tmp/device_train}"
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
START=$SECONDS

PY="$ROOT/.venv/bin/python"
if ! { [[ -x "$PY" ]] && "$PY" -c "import pydantic, torch" 2>/dev/null; }; then
    PY="$(command -v python3)"
    if ! "$PY" -c "import pydantic" 2>/dev/null; then
        mkdir -p "$WORK/site" && tar -C "$WORK/site" -xJf "$PACK/pydantic.tar.xz" || exit 2
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
{
    "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: none"
    echo "cores: $(nproc); runs: $RUNS; probe $PROBE steps; budget $BUDGET s"
} > "$OUT/summary.txt"

launch() {  # launch RUN ARGS...: one run in the background, into $WORK/RUN
    local run=$1 hold=() init=()
    shift
    [[ $run != all ]] && hold=(--holdout-source "$run")
    # INIT_FOLDS: a fold starts from $INIT_FOLDS/fold-RUN's weights (the config's are the
    # all-source model's), e.g. jobs/weights/folds for training v3 further.
    if [[ -n ${INIT_FOLDS:-} && $run != all ]]; then
        local weights
        weights=$(ls "$INIT_FOLDS/fold-$run"/*.pt 2>/dev/null | head -n 1)
        [[ -z $weights ]] && { echo "no weights in $INIT_FOLDS/fold-$run" >> "$WORK/$run.out"; return; }
        init=(--init-weights "$weights")
    fi
    "$PY" jobs/train_cofenet.py --config "$CONFIG" --data-root "$PACK" --out "$WORK/$run" \
        "${hold[@]}" "${init[@]}" "$@" >> "$WORK/$run.out" 2>&1 &
}

for run in $RUNS; do launch "$run" --steps 1000000 --stop-at "$PROBE"; done
wait
slowest=0
for run in $RUNS; do
    rate=$(grep -o '[0-9.]*s/step' "$WORK/$run/train.log" 2>/dev/null | tail -n 1 | tr -d 's/tep')
    [[ -z $rate ]] && { echo "$run: no step rate (see below)"; tail -n 5 "$WORK/$run.out"; exit 3; }
    slowest=$("$PY" -c "print(max($slowest, $rate))")
done
left=$((BUDGET - (SECONDS - START) - 30))
STEPS=$("$PY" -c "print(max(2 * $PROBE, $PROBE + int($left / $slowest / 50) * 50))")
echo "probe: $((SECONDS - START)) s, slowest ${slowest} s/step with all runs on the device;" \
    "training to $STEPS steps" >> "$OUT/summary.txt"

for run in $RUNS; do launch "$run" --steps "$STEPS" --resume; done
wait

# The device returns at most 8 files of at most 16 MiB: each run's weights, the logs and the
# summary first, then the runs' checkpoints, in RUNS order, while they fit (the decoder
# recipe's are 12 MB; a whole-model checkpoint, 31 MB, stays on the device).
files=2
for run in $RUNS; do files=$((files + 1)); done
for run in $RUNS; do
    weights=$(ls "$WORK/$run"/*.pt 2>/dev/null | grep -v checkpoint.pt | head -n 1)
    [[ -n $weights ]] && cp "$weights" "$OUT/$run.pt"
    ckpt="$WORK/$run/checkpoint.pt"
    if [[ -f $ckpt ]]; then
        size=$(stat -c %s "$ckpt")
        if ((size < 16 * 1024 * 1024 && files < 8)); then
            cp "$ckpt" "$OUT/$run.checkpoint.pt" && files=$((files + 1))
        else
            echo "$run: checkpoint ($((size / 1048576)) MiB) not brought back (16 MiB, 8 files)" \
                >> "$OUT/summary.txt"
        fi
    fi
    {
        echo "== $run"
        grep -E "resumed|done:" "$WORK/$run/train.log" | tail -n 2
        grep -A 12 "shipped weights, held-out evaluation" "$WORK/$run/train.log" | tail -n 12
    } >> "$OUT/summary.txt"
done
tar -C "$WORK" -czf "$OUT/train_logs.tar.gz" --exclude='*.pt' --exclude=site .
echo "device_train: $((SECONDS - START)) s in all" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
