#!/usr/bin/env bash
# The whole study, end to end, from one command:
#   extract (cached) -> train-head -> train-cnn (baseline) -> report -> predict on test.csv
#
# Usage: scripts/run_study.sh [--config PATH] [--set section.key=value]...
# The arguments are passed to every step, e.g. a quick smoke run:
#   scripts/run_study.sh --set data.limit=64 --set cnn.epochs=1 --set extract.out=features/smoke
# Builds in release first. Timings of each step are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

# Developer checkouts have the data and weights in ../shared: use them (configs/shared.toml)
# rather than downloading. A fresh clone without ../shared downloads them on first use.
if [ -z "${PIPELINE_CONFIG_LAYER+x}" ] && [ -d ../shared ]; then
    export PIPELINE_CONFIG_LAYER="$PWD/configs/shared.toml"
fi

cargo build --release -p extract -p train-head -p train-cnn -p predict

declare -a timings
step() {
    local name=$1
    shift
    echo
    echo "=== $name"
    local start=$SECONDS
    "./target/release/$name" "$@"
    timings+=("$(printf '%-12s %5d s' "$name" $((SECONDS - start)))")
}

total_start=$SECONDS
step extract "$@"
step train-cnn "$@"
# train-head runs last of the trainings so its report.md compares it with the CNN just trained.
step train-head "$@"
step predict "$@"

echo
echo "=== timings"
printf '%s\n' "${timings[@]}"
printf '%-12s %5d s\n' total $((SECONDS - total_start))
