#!/usr/bin/env bash
# The CUDA path checked on a GPU machine that has no Rust toolchain, from prebuilt binaries
# (scripts/build_cuda.sh): one command, one table, under 8 minutes.
#
# Usage: scripts/gpu_check.sh [options]
#   --bin DIR          folder with `extract` and `backbone-check` (default: dist/cuda/bin, else
#                      target/release)
#   --weights FILE     VGG16 conv-base safetensors (default ../shared/weights/vgg16-oxford-...)
#   --reference DIR    *_vgg16_input.npy / *_vgg16_pool5.npy (default ../shared/reference)
#   --data DIR         folder with train.csv and images/ (default ../shared/data/emergency-vehicles)
#   --count N          images for the extract step (default 1024; at least 512 for the record)
#   --device D         cuda (default), cuda:N or cpu (the CPU run is what the test suite checks)
#   --computes "..."   arithmetics to check (default "f32 f16 bf16"; tf32 may be added)
#   --batch N          batch of the forward and extract steps (default 128)
#   --size S           input side of the bare forward (default 224)
#   --python PY        Python with torch for the reference step (default python3)
#   --out DIR          scratch folder (default a new temp dir)
#
# Steps, each under a time limit; a failing step prints FAILED with its reason and the rest run:
#   (a) parity: backbone-check parity on the reference inputs, per arithmetic (f32: max relative
#       error <= 1e-4 against the reference pool5; f16/bf16/tf32: cosine >= 0.999);
#   (b) the bare batched forward (backbone-check forward) and `extract` over --count images of the
#       study data at --batch, per arithmetic: images/s and the GPU's peak memory in use (sampled
#       with nvidia-smi every 50 ms, minus what was in use before the step); extract's rate as a
#       share of the bare forward's (the host pipeline's goal: >= 80%);
#   (c) PyTorch's same forward (scripts/bench_torch.py: cuDNN autotuned, channels_last, TF32 off
#       for f32) when `import torch` works, for the ratio ours/PyTorch.
# Exit status: 0 when every step passed or was skipped, 1 when one failed.
#
# Carrying it to a GPU machine (one call carries at most 64 MiB): first the weights and
# reference files, then `dist/cuda` as a tar.xz (scripts/build_cuda.sh --package) plus the
# images; see BENCHMARKS.md for the exact commands used.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="$ROOT/../shared"
BIN=""
WEIGHTS="$SHARED/weights/vgg16-oxford-imagenet-features.safetensors"
REFERENCE="$SHARED/reference"
DATA="$SHARED/data/emergency-vehicles"
COUNT=1024
DEVICE=cuda
COMPUTES="f32 f16 bf16"
BATCH=128
SIZE=224
PY=python3
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN="$2"; shift ;;
        --weights) WEIGHTS="$2"; shift ;;
        --reference) REFERENCE="$2"; shift ;;
        --data) DATA="$2"; shift ;;
        --count) COUNT="$2"; shift ;;
        --device) DEVICE="$2"; shift ;;
        --computes) COMPUTES="$2"; shift ;;
        --batch) BATCH="$2"; shift ;;
        --size) SIZE="$2"; shift ;;
        --python) PY="$2"; shift ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$BIN" ]; then
    if [ -x "$ROOT/dist/cuda/bin/extract" ]; then BIN="$ROOT/dist/cuda/bin"; else BIN="$ROOT/target/release"; fi
fi
[ -n "$OUT" ] || OUT="$(mktemp -d -t gpu-check.XXXXXX)"
mkdir -p "$OUT"
TABLE="$OUT/table.tsv"
: > "$TABLE"
FAILED=0
START=$SECONDS

# ---- GPU memory sampling -------------------------------------------------------------------
GPU_INDEX=0
case "$DEVICE" in cuda:*) GPU_INDEX="${DEVICE#cuda:}" ;; esac
HAVE_SMI=0
if [ "$DEVICE" != cpu ] && command -v nvidia-smi >/dev/null 2>&1; then HAVE_SMI=1; fi

gpu_used_mib() {
    nvidia-smi --id="$GPU_INDEX" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1 | tr -d ' '
}

# with_peak FILE CMD...: runs CMD, writing the peak GPU memory it added (MiB) to FILE ("n/a"
# without nvidia-smi). Returns CMD's status.
with_peak() {
    local file="$1"; shift
    if [ "$HAVE_SMI" = 0 ]; then
        echo "n/a" > "$file"
        "$@"
        return $?
    fi
    local base samples pid status
    base=$(gpu_used_mib)
    samples="$file.samples"
    nvidia-smi --id="$GPU_INDEX" --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$samples" 2>/dev/null &
    pid=$!
    "$@"
    status=$?
    sleep 0.2
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    awk -v base="${base:-0}" 'BEGIN { max = 0 } { v = $1 + 0; if (v > max) max = v }
        END { d = max - base; if (d < 0) d = 0; print d }' "$samples" > "$file"
    return $status
}

# row STEP COMPUTE RESULT IMAGES_PER_S PEAK NOTE
row() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$TABLE"
    printf 'gpu_check: %-28s %-5s %-8s %10s img/s %8s MiB  %s\n' "$@" >&2
}

# step NAME LIMIT_S LOG CMD...: runs CMD with a time limit; on failure records why (exit status
# and the last line of its output).
step() {
    local name="$1" limit="$2" log="$3"; shift 3
    timeout "$limit" "$@" > "$log" 2>&1
    local status=$?
    if [ $status -ne 0 ]; then
        local why
        if [ $status -eq 124 ]; then why="timed out after ${limit}s"; else why="exit $status: $(grep -v '^\s*$' "$log" | tail -n1 | cut -c1-160)"; fi
        echo "$why" > "$log.why"
    fi
    return $status
}

field() { sed -n "s/.*[ ^]$1=\([^ ]*\).*/\1/p" | head -n1; }

need_file() {
    if [ ! -e "$2" ]; then
        row "$1" "-" "FAILED" "-" "-" "missing $2"
        FAILED=1
        return 1
    fi
}

echo "gpu_check: device $DEVICE, binaries $BIN, scratch $OUT" >&2
if [ "$HAVE_SMI" = 1 ]; then
    echo "gpu_check: GPU $(nvidia-smi --id="$GPU_INDEX" --query-gpu=name,driver_version,memory.total --format=csv,noheader)" >&2
fi
echo "gpu_check: CPU $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1) ($(nproc) cores)" >&2

# ---- (a) parity ----------------------------------------------------------------------------
for compute in $COMPUTES; do
    for image in chelsea coffee; do
        name="parity $image"
        need_file "$name" "$BIN/backbone-check" || continue
        need_file "$name" "$REFERENCE/${image}_vgg16_input.npy" || continue
        log="$OUT/parity-$image-$compute.log"
        if step "$name" 120 "$log" "$BIN/backbone-check" parity --weights "$WEIGHTS" \
            --input "$REFERENCE/${image}_vgg16_input.npy" --expected "$REFERENCE/${image}_vgg16_pool5.npy" \
            --device "$DEVICE" --compute "$compute" --label "$image"; then
            line=$(grep '^PARITY' "$log")
            row "$name" "$compute" ok "-" "-" "max_rel $(echo "$line" | field max_rel), cosine $(echo "$line" | field cosine)"
        else
            row "$name" "$compute" FAILED "-" "-" "$(cat "$log.why")"
            FAILED=1
        fi
    done
done

# ---- (b) bare forward and extract ----------------------------------------------------------
SUBSET="$OUT/subset.csv"
if [ -f "$DATA/train.csv" ]; then
    head -n $((COUNT + 1)) "$DATA/train.csv" > "$SUBSET"
    ROWS=$(($(wc -l < "$SUBSET") - 1))
else
    ROWS=0
fi
for compute in $COMPUTES; do
    log="$OUT/forward-$compute.log"
    fwd_rate=""
    if need_file "forward batch $BATCH" "$BIN/backbone-check"; then
        if with_peak "$log.peak" step "forward" 300 "$log" "$BIN/backbone-check" forward --weights "$WEIGHTS" \
            --device "$DEVICE" --compute "$compute" --batch "$BATCH" --size "$SIZE" --iters 3; then
            fwd_rate=$(grep '^FORWARD' "$log" | field images_per_s)
            row "forward batch $BATCH" "$compute" ok "$fwd_rate" "$(cat "$log.peak")" "bare forward, best of 3"
        else
            row "forward batch $BATCH" "$compute" FAILED "-" "-" "$(cat "$log.why")"
            FAILED=1
        fi
    fi

    name="extract $ROWS images"
    need_file "$name" "$BIN/extract" || continue
    if [ "$ROWS" -lt 1 ]; then
        row "$name" "$compute" FAILED "-" "-" "no $DATA/train.csv"
        FAILED=1
        continue
    fi
    dir="$OUT/extract-$compute"
    mkdir -p "$dir"
    cat > "$dir/pipeline.toml" <<EOF
[data]
csv = "$SUBSET"
images = "$DATA/images"
image_column = "image_names"
label_column = "emergency_or_not"
[backbone]
weights = "$WEIGHTS"
[extract]
batch_size = $BATCH
device = "$DEVICE"
compute = "$compute"
out = "$dir/features"
EOF
    log="$dir/extract.log"
    if with_peak "$log.peak" step "$name" 300 "$log" "$BIN/extract" --config "$dir/pipeline.toml"; then
        # The compute phase's rate when extract prints one, else the whole run's.
        rate=$(grep -o 'compute phase [0-9.]* images/s' "$log" | grep -o '[0-9.]*' | tail -n1)
        [ -n "$rate" ] || rate=$(grep -o '[0-9.]* images/s' "$log" | tail -n1 | grep -o '^[0-9.]*')
        note="$(grep -o 'device [a-z0-9:]*' "$log" | tail -n1)"
        if [ -n "$fwd_rate" ] && [ -n "$rate" ]; then
            note="$note, $(awk -v a="$rate" -v b="$fwd_rate" 'BEGIN { printf "%.0f%% of the bare forward", 100 * a / b }')"
        fi
        row "$name" "$compute" ok "${rate:-?}" "$(cat "$log.peak")" "$note"
    else
        row "$name" "$compute" FAILED "-" "-" "$(cat "$log.why")"
        FAILED=1
    fi
done

# ---- (c) PyTorch ---------------------------------------------------------------------------
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    row "pytorch forward" "-" skipped "-" "-" "\`$PY -c 'import torch'\` failed"
else
    torch_device="$DEVICE"
    [ "$DEVICE" = cuda ] && torch_device="cuda:0"
    for compute in $COMPUTES; do
        log="$OUT/torch-$compute.log"
        if with_peak "$log.peak" step "pytorch" 300 "$log" "$PY" "$ROOT/scripts/bench_torch.py" --device "$torch_device" \
            --dtype "$compute" --mode channels_last --batch "$BATCH" --size "$SIZE" --reps 3 --threads "$(nproc)"; then
            line=$(grep '^RESULT' "$log")
            trate=$(echo "$line" | field images_per_s)
            ours=$(awk -F'\t' -v c="$compute" '$1 ~ /^forward/ && $2 == c && $3 == "ok" { print $4 }' "$TABLE")
            note="torch $(echo "$line" | field torch), allocator peak $(echo "$line" | field peak_mib) MiB"
            if [ -n "$ours" ]; then
                note="$note; ours/pytorch $(awk -v a="$ours" -v b="$trate" 'BEGIN { printf "%.2f", a / b }')"
            fi
            row "pytorch forward batch $BATCH" "$compute" ok "$trate" "$(cat "$log.peak")" "$note"
        else
            row "pytorch forward batch $BATCH" "$compute" FAILED "-" "-" "$(cat "$log.why")"
            FAILED=1
        fi
    done
fi

# ---- the table -----------------------------------------------------------------------------
echo
echo "| step | compute | result | images/s | peak GPU MiB | note |"
echo "| --- | --- | --- | ---: | ---: | --- |"
awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }' "$TABLE"
echo
echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s, scratch $OUT"
exit $FAILED
