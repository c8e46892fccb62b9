#!/usr/bin/env bash
# VGG16 feature extraction on the CPU: this project's fast path (crates/fastconv) vs PyTorch.
#
# Usage: scripts/bench_extract.sh [--with-torch] [--batches "1 16 128"] [--size 224] [--threads 2]
#
#   --with-torch   also benchmark PyTorch (f32 plain, f32 channels_last, bf16), creating the
#                  virtual environment .venv-bench with `pip install torch` if it is missing.
#                  PyTorch is only a benchmark reference, never a dependency of the project.
#   --batches      batch sizes (default "1 16 128")
#
# Prints, from one run: the machine, the measured FMA ceiling, images/s and peak RSS
# (/usr/bin/time -v) per implementation and batch (fastconv: Winograd F(2x2) and F(4x4), direct,
# bf16 numerics), the ratio to PyTorch channels_last f32, the fraction of the FMA ceiling, and
# per-layer tables for the fast path's three algorithms. "CPU ms/image" (user +
# system time over the timed runs) is the steadier figure when other jobs share the machine:
# wall-clock numbers then depend on the share of the cores each run happened to get.
set -euo pipefail

cd "$(dirname "$0")/.."
WITH_TORCH=0
BATCHES="1 16 128"
SIZE=224
THREADS=2
while [ $# -gt 0 ]; do
    case "$1" in
        --with-torch) WITH_TORCH=1 ;;
        --batches) BATCHES="$2"; shift ;;
        --size) SIZE="$2"; shift ;;
        --threads) THREADS="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
export RAYON_NUM_THREADS="$THREADS"
TARGET="${CARGO_TARGET_DIR:-target}"
WEIGHTS="../shared/weights/vgg16-oxford-imagenet-features.safetensors"
WEIGHT_ARGS=()
[ -f "$WEIGHTS" ] && WEIGHT_ARGS=(--weights "$WEIGHTS")
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "== build"
cargo build --release -p fastconv --bin fastconv-bench 2>&1 | tail -1
BIN="$TARGET/release/fastconv-bench"

if [ "$WITH_TORCH" = 1 ]; then
    if [ ! -x .venv-bench/bin/python ]; then
        echo "== installing PyTorch into .venv-bench (pip install torch)"
        start=$(date +%s)
        python3 -m venv .venv-bench
        .venv-bench/bin/pip install -q torch
        echo "   installed in $(( $(date +%s) - start )) s"
    fi
    PY=.venv-bench/bin/python
fi

echo "== machine"
echo "date:    $(date -u +%Y-%m-%dT%H:%MZ)"
echo "cpu:     $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores), flags: $(grep -m1 -ow -E 'avx512f|avx512_bf16|avx2|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "threads: $THREADS; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$WITH_TORCH" = 1 ] && echo "torch:   $($PY -W ignore -c 'import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())')"

NATIVE_BF16=0
grep -qw -E 'avx512_bf16|amx_bf16' /proc/cpuinfo && NATIVE_BF16=1
echo "== FMA ceiling"
"$BIN" peak --secs 2 | tee "$TMP/peak"
PEAK=$(sed -n 's/.*peak=fma.*gflops=\([0-9.]*\).*/\1/p' "$TMP/peak")

# run NAME REPS COMMAND...: best-of timing line + peak RSS, appended to $TMP/results.
run() {
    local name="$1"; shift
    /usr/bin/time -v "$@" > "$TMP/out" 2> "$TMP/time" || { cat "$TMP/out" "$TMP/time" >&2; return 1; }
    local line rss
    line=$(grep '^RESULT' "$TMP/out")
    rss=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$TMP/time")
    echo "$name $line rss_kb=$rss" >> "$TMP/results"
    echo "   $name: $(echo "$line" | grep -o 'images_per_s=[^ ]*') $(echo "$line" | grep -o 'cpu_ms_per_image=[^ ]*') peak_rss=$((rss / 1024)) MB"
}

reps_for() { case "$1" in 1) echo 5 ;; 16) echo 2 ;; *) echo 1 ;; esac; }

echo "== throughput (best of N runs after a warm-up run; RSS of the whole process)"
for b in $BATCHES; do
    reps=$(reps_for "$b")
    # The default conv algorithm (Winograd F(2x2,3x3)), the faster F(4x4,3x3), the exact direct
    # kernel, and the bf16-numerics mode (direct kernel).
    for variant in winograd2:f32 winograd4:f32 direct:f32 direct:bf16; do
        algo=${variant%%:*} prec=${variant##*:}
        run "fastconv-$algo-$prec" "$BIN" extract --batch "$b" --size "$SIZE" --reps "$reps" \
            --algorithm "$algo" --precision "$prec" "${WEIGHT_ARGS[@]}"
    done
    if [ "$WITH_TORCH" = 1 ]; then
        for mode in plain channels_last bf16; do
            # Without native bf16 (AVX512_BF16 / AMX) PyTorch emulates it at ~7 s per image;
            # batch 1 shows that, larger batches would take many minutes each.
            if [ "$mode" = bf16 ] && [ "$b" != 1 ] && [ "$NATIVE_BF16" = 0 ]; then
                echo "   pytorch-bf16: skipped at batch $b (no native bf16 on this CPU; see batch 1)"
                continue
            fi
            run "pytorch-$mode" "$PY" scripts/bench_torch.py --mode "$mode" --batch "$b" --size "$SIZE" --reps "$reps" --threads "$THREADS"
        done
    fi
done

echo "== summary (ratio: images/s over PyTorch channels_last f32 at the same batch; GFLOP/s counts"
echo "   the direct convolution's 30.7 GFLOP per image for every implementation, so Winograd's"
echo "   'effective' rate can pass the measured FMA ceiling of ${PEAK} GFLOP/s)"
awk -v peak="$PEAK" '
    function get(key,   i, kv) { for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == key) return kv[2] } return "" }
    { name[NR] = $1; batch[NR] = get("batch"); ips[NR] = get("images_per_s"); gf[NR] = get("gflops"); rss[NR] = get("rss_kb"); cpu[NR] = get("cpu_ms_per_image")
      if ($1 == "pytorch-channels_last") ref[get("batch")] = get("images_per_s") }
    END {
        printf "| implementation | batch | images/s | ms/image | CPU ms/image | GFLOP/s | of FMA ceiling | peak RSS (MB) | vs PyTorch CL f32 |\n"
        printf "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        for (i = 1; i <= NR; i++) {
            r = (batch[i] in ref) ? sprintf("%.2fx", ips[i] / ref[batch[i]]) : "n/a"
            printf "| %s | %s | %.2f | %.1f | %s | %.1f | %.0f%% | %d | %s |\n", name[i], batch[i], ips[i], 1000 / ips[i], cpu[i], gf[i], 100 * gf[i] / peak, rss[i] / 1024, r
        }
    }' "$TMP/results"

for algo in winograd2 winograd4 direct; do
    echo "== per-layer, fastconv $algo f32, batch 1 (best of 3; GFLOP and GFLOP/s of the direct convolution)"
    "$BIN" profile --size "$SIZE" --reps 3 --algorithm "$algo" "${WEIGHT_ARGS[@]}"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
