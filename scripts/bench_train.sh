#!/usr/bin/env bash
# Training speed, this project (candle + crates/pipeline/src/cnn_ops.rs) against PyTorch f32,
# same machine, same run, same thread count. Writes the numbers to stdout as "key value" lines
# and a summary with the ratios (PyTorch time / ours: above 1 means we are faster).
#
#   scripts/bench_train.sh [repeats]
#
# CNN: the study's baseline (two Conv3x3(4)+BN+ReLU+MaxPool blocks, Linear(4*56*56 -> 2)) on
# 1,481 random 224x224 images, batch 128, Adam: per-epoch time (best of the repeats) and the
# per-step forward / backward / optimizer split (full batches). Head: linear head, 30 epochs
# over 1,481 x 25,088 features, batch 128, Adam, validation on 296 rows every epoch: total.
# Environment: THREADS (default 2), PYTHON (default .venv-bench/bin/python), CNN_ARGS and
# HEAD_ARGS (sizes: images size batch epochs / rows dim batch epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-3}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-.venv-bench/bin/python}
CNN_ARGS=${CNN_ARGS:-"1481 224 128 1"}
HEAD_ARGS=${HEAD_ARGS:-"1481 25088 128 30"}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS THREADS

cargo build --release -q -p pipeline --example bench_train
BIN=target/release/examples/bench_train
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

for r in $(seq "$REPEATS"); do
  echo "# repeat $r" >&2
  # shellcheck disable=SC2086
  "$BIN" cnn $CNN_ARGS | sed "s/^/r$r /" | tee -a "$OUT"
  # shellcheck disable=SC2086
  "$PYTHON" scripts/bench_train_torch.py cnn $CNN_ARGS 2>/dev/null | sed "s/^/r$r /" | tee -a "$OUT"
  # shellcheck disable=SC2086
  "$BIN" head $HEAD_ARGS | sed "s/^/r$r /" | tee -a "$OUT"
  # shellcheck disable=SC2086
  "$PYTHON" scripts/bench_train_torch.py head $HEAD_ARGS 2>/dev/null | sed "s/^/r$r /" | tee -a "$OUT"
done

# Best (lowest) value of each measure over the repeats; the step split is taken from the
# repeat with the best epoch.
"$PYTHON" - "$OUT" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for rep, key, val in rows:
    by.setdefault(key, []).append((float(val), rep))
def best(k):
    return min(by[k])
def at(k, rep):
    return dict((r, v) for v, r in by[k])[rep]
ours, theirs = best("cnn_epoch_best"), best("torch_cnn_epoch_best")
print(f"\nCNN epoch (best of {len(by['cnn_epoch_best'])}): ours {ours[0]:.2f} s, "
      f"PyTorch {theirs[0]:.2f} s, ratio {theirs[0] / ours[0]:.2f}")
for part in ("forward", "backward", "optimizer"):
    o, t = at(f"cnn_step_{part}", ours[1]), at(f"torch_cnn_step_{part}", theirs[1])
    print(f"  per step {part:9s}: ours {o:.3f} s, PyTorch {t:.3f} s")
h, th = best("head_total"), best("torch_head_total")
print(f"Head total: ours {h[0]:.2f} s, PyTorch {th[0]:.2f} s, ratio {th[0] / h[0]:.2f}")
PY
