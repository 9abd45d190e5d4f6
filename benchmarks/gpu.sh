#!/usr/bin/env bash
# The one-shot GPU measurement: stage one and stage two at the GPU's pace, and the demo's accuracy on CUDA.
#
# Made for a lent machine that has python3 with torch but not all of our packages and no network: the wheels travel
# in .whl/ (`python -m benchmarks.gpu_wheels` fetches them; benchmarks/RESULTS.md, "The GPU run", has the commands).
# Run from the repository root:
#
#     OUT=/some/dir bash benchmarks/gpu.sh          # QUICK=1 for a tiny CPU smoke run of the same steps
#
# 1. Preflight (benchmarks.gpu_preflight): every package and module the run imports, and a CUDA device. Anything
#    missing is printed; the carried wheels are installed into /tmp/site and the preflight runs again; if anything
#    is still missing the script stops there, within seconds, before any device time goes into a doomed run.
# 2. The steps, most valuable first, under one overall budget (BUDGET seconds from the script's start, default 480,
#    which leaves a 600 s device command room to start and copy back): each step runs under `timeout` with
#    min(its own limit, the time left less RESERVE); a step with under 10 s left is skipped. A step that fails or
#    times out is reported and the others still run.
# 3. Results: $OUT/gpu.json (every step's JSON, benchmarks.gpu_summary), rewritten after every step and from the
#    exit trap, so a run cut short still reports each finished step; $OUT/gpu.log; each step's log in $OUT/<step>.log.
set -uo pipefail
OUT=${OUT:-/tmp/dist-cache-gpu}
QUICK=${QUICK:-0}
WORK=${WORK:-/tmp/dist-cache-gpu-work}
WHEELS=${WHEELS:-.whl}
BUDGET=${BUDGET:-$([ "$QUICK" = 1 ] && echo 900 || echo 480)}  # QUICK: a smoke test on a CPU that may be shared
RESERVE=${RESERVE:-30}  # for the timeout's kill grace (10 s), the summary and the copy back
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
started=$(date +%s)
deadline=$((started + BUDGET))
log() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/gpu.log"; }

summarize() {  # gpu.json from whatever steps have finished; atomic, so a cut run never leaves half a file
    python3 -m benchmarks.gpu_summary "$OUT" >"$OUT/gpu.json.tmp" 2>"$OUT/summary.txt" \
        && mv "$OUT/gpu.json.tmp" "$OUT/gpu.json"
}
running=""  # the step in progress (its `timeout` process), which an interruption stops first
finish() {
    local rc=$?
    trap - EXIT TERM INT
    summarize
    tee -a "$OUT/gpu.log" <"$OUT/summary.txt"
    log "done (exit $rc): $OUT/gpu.json"
    exit "$rc"
}
interrupted() {
    log "interrupted${running:+: stopping the step in progress}"
    [ -n "$running" ] && kill -TERM "$running" 2>/dev/null && wait "$running"
    exit 143
}
trap finish EXIT
trap interrupted TERM INT

if [ "$QUICK" = 1 ]; then
    DEVICE=cpu; MODEL=dist-tiny; DATA_ARGS="--videos 4 --repeat 2 --seconds 2"; Q=--quick; CUDA=
else
    DEVICE=cuda; MODEL=ViT-B-16; DATA_ARGS="--videos 64 --repeat 12 --seconds 10"; Q=; CUDA=--cuda
fi

preflight() { timeout 60 python3 -m benchmarks.gpu_preflight $CUDA >"$OUT/preflight.out" 2>&1; }
if ! preflight && compgen -G "$WHEELS/*.whl" >/dev/null; then
    tee -a "$OUT/gpu.log" <"$OUT/preflight.out"
    log "installing the carried wheels ($(ls "$WHEELS"/*.whl | wc -l) in $WHEELS) into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl >>"$OUT/gpu.log" 2>&1 || { log "wheel install failed (see gpu.log)"; exit 2; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    preflight
fi
tee -a "$OUT/gpu.log" <"$OUT/preflight.out"
grep -q "^preflight: ok" "$OUT/preflight.out" || { log "preflight failed: no step was run"; exit 2; }
log "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')"

# step NAME SECONDS COMMAND...: run under min(SECONDS, time left less RESERVE), keep its output and log.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((deadline - $(date +%s) - RESERVE))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        log "$name: skipped (${left}s of the ${BUDGET}s budget left)"
        echo "skipped" >"$OUT/$name.rc"
        return
    fi
    log "$name: start (limit ${limit}s)"
    # In the background and waited for, so that a TERM reaches the trap at once rather than after the step.
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log" &
    running=$!
    wait "$running"
    local rc=$?
    running=""
    log "$name: exit $rc$([ "$rc" = 124 ] && echo ' (timed out)')"
    echo "$rc" >"$OUT/$name.rc"
    summarize
}
# The budget gpu_extract shares out among its parts: 15 s under the step's limit, so it reports rather than dies.
extract_budget() {
    local left=$((deadline - $(date +%s) - RESERVE)) limit=$1
    [ "$left" -lt "$limit" ] && limit=$left
    echo $((limit > 25 ? limit - 15 : 10))
}

step data 90 python3 -m benchmarks.gpu_data --out "$WORK/data" --model "$MODEL" $DATA_ARGS
step extract 150 python3 -m benchmarks.gpu_extract --videos "$WORK/data/videos" --manifest "$WORK/data/train.csv" \
    --checkpoint "$WORK/data/$MODEL-random.pt" --model "$MODEL" --store "$WORK/train.zarr" --device "$DEVICE" \
    --out "$OUT/extract.json" --budget-s "$(extract_budget 150)" $Q
step train 150 python3 -m benchmarks.gpu_train --store "$WORK/train.zarr" --device "$DEVICE" --out "$OUT/train.json" \
    --pretrained "$WORK/data/$MODEL-random.pt" $Q  # the online phases rebuild CLIP: a store never picks the file
# The same cached phases on the compact store this project targets (int8 PCA codes, K 128, fitted on a sample of the
# store; JPEG dense frames, decoded on the GPU by nvjpeg): bytes per clip and the training rate beside the fp16
# store's raw frames (train.json).
step train_compact 200 bash -c "python3 -m cli copy '$WORK/train.zarr' '$WORK/train-compact.zarr' --pca 128 \
    --dtype int8 --frames-format jpeg && python3 -m benchmarks.gpu_train --store '$WORK/train-compact.zarr' \
    --device '$DEVICE' --out '$OUT/train_compact.json' --cached-only $Q"
DEMO_ARGS=""; [ "$QUICK" = 1 ] && DEMO_ARGS="--videos-per-class 4 --epochs 2"
step demo 150 python3 -m cli demo --workdir "$WORK/demo" $DEMO_ARGS  # device auto: the GPU where there is one
step decode_pool 90 python3 -m benchmarks.decode_pool $Q
step store_write 90 env DIST_BENCH_TMP="$WORK" python3 -m benchmarks.store_write $Q
step jpeg_frames 90 env DIST_BENCH_TMP="$WORK" python3 -m benchmarks.jpeg_frames $Q
