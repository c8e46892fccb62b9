#!/usr/bin/env bash
# Throughput of 1, 2 and 4 concurrent `extract --shard K/N` tasks on this machine, each set of
# tasks on a fresh store over the same images: images/s = images / wall time from the first
# start to the last exit. Checks that each union equals the first (unsharded-equivalent)
# store. Prints a markdown table (BENCHMARKS.md, "Sharded extraction").
#
#   scripts/slurm/bench_shards.sh [--images N] [--batch B] [--tasks "1 2 4"] [--split-threads]
#
# --split-threads gives each of T tasks RAYON_NUM_THREADS = cores / T (at least 1), as Slurm's
# --cpus-per-task would; by default each task's pool has one thread per core. Uses the
# repository's pipeline.toml with configs/shared.toml (../shared) and target/release binaries
# (PIPELINE_BIN to change; `cargo build --release -p extract`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGES=512
BATCH=128
TASKS="1 2 4"
SPLIT=""
while [ $# -gt 0 ]; do
    case $1 in
    --images) IMAGES=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --tasks) TASKS=$2; shift 2 ;;
    --split-threads) SPLIT=1; shift ;;
    *) echo "bench_shards: unknown argument $1" >&2; exit 2 ;;
    esac
done
BIN=${PIPELINE_BIN:-$ROOT/target/release}
[ -x "$BIN/extract" ] || { echo "bench_shards: no $BIN/extract (cargo build --release -p extract)" >&2; exit 1; }
export PIPELINE_CONFIG_LAYER=$ROOT/configs/shared.toml
WORK=$(mktemp -d /tmp/bench-shards.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
CORES=$(nproc)

echo "| tasks | threads per task | images | wall (s) | images/s | vs 1 task | load avg before |"
echo "|---|---|---|---|---|---|---|"
first=""
base=""
for t in $TASKS; do
    out=$WORK/store-$t
    threads=$CORES
    [ -n "$SPLIT" ] && threads=$(( CORES / t > 0 ? CORES / t : 1 ))
    load=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s.%N)
    pids=()
    for k in $(seq 0 $((t - 1))); do
        RAYON_NUM_THREADS=$threads "$BIN/extract" --config "$ROOT/pipeline.toml" \
            --set "data.limit=$IMAGES" --set "extract.batch_size=$BATCH" --set extract.device=cpu \
            --set "extract.out=$out" --shard "$k/$t" >"$WORK/log-$t-$k" 2>&1 &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        wait "$p" || { echo "bench_shards: a task failed:" >&2; cat "$WORK"/log-"$t"-* >&2; exit 1; }
    done
    end=$(date +%s.%N)
    if [ -z "$first" ]; then
        first=$out
    else
        diff -r --exclude=parts --exclude=.lock "$first" "$out" >/dev/null ||
            { echo "bench_shards: the $t-task store differs from the first" >&2; exit 1; }
    fi
    wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    rate=$(awk -v n="$IMAGES" -v w="$wall" 'BEGIN { printf "%.2f", n / w }')
    [ -z "$base" ] && base=$rate
    speedup=$(awk -v r="$rate" -v b="$base" 'BEGIN { printf "%.2fx", r / b }')
    echo "| $t | $threads | $IMAGES | $wall | $rate | $speedup | $load |"
done
