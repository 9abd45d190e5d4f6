#!/usr/bin/env bash
# The one-shot GPU measurement: stage one and stage two at the GPU's pace, and the demo's accuracy on CUDA.
#
# Made for a lent machine that has python3 with torch but none of our other packages and no network: the
# wheels travel in .whl/ (see benchmarks/RESULTS.md, "The GPU run", for how to fetch them). Run from the
# repository root:
#
#     OUT=/some/dir bash benchmarks/gpu.sh          # QUICK=1 for a tiny CPU smoke run of the same steps
#
# Every step is bounded by `timeout`; a step that fails or times out is reported and the others still run.
# Results: $OUT/gpu.json (one object: every step's JSON) and $OUT/gpu.log; each step's log in $OUT/<step>.log.
set -uo pipefail
OUT=${OUT:-/tmp/dist-cache-gpu}
QUICK=${QUICK:-0}
WORK=${WORK:-/tmp/dist-cache-gpu-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
started=$(date +%s)
log() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/gpu.log"; }

# Install the carried wheels only where our packages are missing (the lent machine), not into a working venv.
if ! python3 -c "import open_clip, decord, zarr, av, crc32c" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { log "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
log "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"

if [ "$QUICK" = 1 ]; then
    DEVICE=cpu; MODEL=dist-tiny; DATA_ARGS="--videos 4 --repeat 2 --seconds 2"; Q=--quick
else
    DEVICE=cuda; MODEL=ViT-B-16; DATA_ARGS="--videos 64 --repeat 12 --seconds 10"; Q=
fi

# step NAME SECONDS COMMAND...: run with a time limit, keep its log, and its last stdout line as its JSON.
step() {
    local name=$1 limit=$2; shift 2
    log "$name: start (limit ${limit}s)"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log"
    local rc=$?
    log "$name: exit $rc"
    echo "$rc" >"$OUT/$name.rc"
}

step data 120 python3 -m benchmarks.gpu_data --out "$WORK/data" --model "$MODEL" $DATA_ARGS
step extract 200 python3 -m benchmarks.gpu_extract --videos "$WORK/data/videos" --manifest "$WORK/data/train.csv" \
    --checkpoint "$WORK/data/$MODEL-random.pt" --model "$MODEL" --store "$WORK/train.zarr" --device "$DEVICE" \
    --out "$OUT/extract.json" $Q
step store_write 120 env DIST_BENCH_TMP="$WORK" python3 -m benchmarks.store_write $Q
step decode_pool 120 python3 -m benchmarks.decode_pool $Q
step train 200 python3 -m benchmarks.gpu_train --store "$WORK/train.zarr" --device "$DEVICE" --out "$OUT/train.json" \
    --pretrained "$WORK/data/$MODEL-random.pt" $Q  # the online phases rebuild CLIP: a store never picks the file
# The same cached phases on a compact copy (int8 PCA codes, K 128; the fit on a sample of the store): bytes per clip
# and the training rate beside the fp16 store's (train.json).
step train_compact 300 bash -c "python3 -m cli copy '$WORK/train.zarr' '$WORK/train-pca128-int8.zarr' --pca 128 \
    --dtype int8 && python3 -m benchmarks.gpu_train --store '$WORK/train-pca128-int8.zarr' --device '$DEVICE' \
    --out '$OUT/train_compact.json' --cached-only $Q"
DEMO_ARGS=""; [ "$QUICK" = 1 ] && DEMO_ARGS="--videos-per-class 4 --epochs 2"
step demo 240 python3 -m cli demo --workdir "$WORK/demo" $DEMO_ARGS  # device auto: the GPU where there is one

python3 -m benchmarks.gpu_summary "$OUT" | tee "$OUT/gpu.json"
log "done"
