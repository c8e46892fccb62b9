#!/usr/bin/env bash
# Block-5 fine-tuning speed: this project (crates/pipeline/src/models/gemm_conv.rs through
# Block5Head, candle's autograd and Adam) against PyTorch f32 doing the same work (three
# 512-channel 3x3 convs + ReLU, 2x2 max-pool, linear head, cross-entropy, backward, Adam step)
# in the same run, on the same machine, with the same thread count.
#
#   scripts/bench_block5.sh [images] [batch] [side]     (defaults: 256 128 14)
#
# Both time one pass over `images` random block-4 activations (a fixed subset: the per-image
# time is scaled to the study's 1,316 training images; the work per image does not depend on
# the values) after one warm-up step. Environment: THREADS (default 2), PYTHON (default
# /work/venv-torch/bin/python, else .venv-bench/bin/python), PROFILE (default release; `dev`
# reuses the test build: every crate is at opt-level 3 there too).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES=${1:-256}
BATCH=${2:-128}
SIDE=${3:-14}
THREADS=${THREADS:-2}
if [ -z "${PYTHON:-}" ]; then
  if [ -x /work/venv-torch/bin/python ]; then PYTHON=/work/venv-torch/bin/python; else PYTHON=.venv-bench/bin/python; fi
fi
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS THREADS

PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" -q -p pipeline --example bench_block5
DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $THREADS threads, $(date -u +%Y-%m-%d)"
echo "# $IMAGES images of 512x${SIDE}x${SIDE}, batch $BATCH, scaled to 1,316 images per epoch"
OURS=$(target/$DIR/examples/bench_block5 "$IMAGES" "$BATCH" "$SIDE")
echo "$OURS"
THEIRS=$("$PYTHON" scripts/bench_block5_torch.py "$IMAGES" "$BATCH" "$SIDE")
echo "$THEIRS"
o=$(echo "$OURS" | awk '$1 == "block5_epoch_scaled" {print $2}')
t=$(echo "$THEIRS" | awk '$1 == "torch_block5_epoch_scaled" {print $2}')
awk -v o="$o" -v t="$t" 'BEGIN { printf "epoch (1,316 images): ours %.1f s, PyTorch %.1f s, ratio PyTorch/ours %.2f\n", o, t, t / o }'
