#!/usr/bin/env bash
# Runs the study (extract, then train-head, then optionally evaluate) under several configs and
# prints one table: config, validation accuracy, macro F1, times.
#
#   scripts/compare.sh ROWS_FILE [--out DIR] [--set section.key=value]...
#
# ROWS_FILE has one row per line (blank lines and `#` comments ignored):
#
#   label | config file | overrides | score
#
#   - config file: relative to the repository root (e.g. `pipeline.toml`, `configs/best.toml`);
#   - overrides: `section.key=value` items separated by spaces, applied after the command
#     line's `--set` items (so a row wins over them);
#   - score: `val` (the validation split train-head holds out, from its metrics.json) or
#     `evaluate` (the held-out labelled set that the config's `[evaluate]` section names,
#     scored by the `evaluate` binary on the run just trained).
#
# Every row trains into its own folder under --out (default: a new folder in /tmp), so rows do
# not see each other's runs; the feature store is the config's (`[extract] out`), shared by
# rows with the same backbone: the first row of a backbone pays for the extraction and the
# others reuse it, which the "extract" column shows (seconds, and how many images were
# computed). The binaries are built with the dev profile (every crate at opt-level 3); set
# PIPELINE_BIN to a folder holding extract, train-head and evaluate to use others.
#
# Developer checkouts with ../shared use configs/shared.toml as the config layer (no
# downloads), as scripts/run_study.sh does. Writes the table to <out>/table.md too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

die() {
    echo "compare: $*" >&2
    exit 1
}

[ $# -ge 1 ] || die "usage: scripts/compare.sh ROWS_FILE [--out DIR] [--set section.key=value]..."
ROWS=$1
shift
[ -f "$ROWS" ] || die "$ROWS: no such rows file"
OUT=""
GLOBAL=()
while [ $# -gt 0 ]; do
    case $1 in
    --out)
        [ $# -ge 2 ] || die "--out needs a folder"
        OUT=$2
        shift 2
        ;;
    --set)
        [ $# -ge 2 ] || die "--set needs section.key=value"
        GLOBAL+=(--set "$2")
        shift 2
        ;;
    *) die "unknown argument $1 (try --out DIR or --set section.key=value)" ;;
    esac
done
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/compare.XXXXXX)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ -z "${PIPELINE_CONFIG_LAYER+x}" ] && [ -d ../shared ]; then
    export PIPELINE_CONFIG_LAYER="$ROOT/configs/shared.toml"
fi

if [ -z "${PIPELINE_BIN:-}" ]; then
    cargo build --quiet -p extract -p train-head -p evaluate
    PIPELINE_BIN=$ROOT/target/debug
fi
for b in extract train-head evaluate; do
    [ -x "$PIPELINE_BIN/$b" ] || die "$PIPELINE_BIN/$b: not found (set PIPELINE_BIN)"
done

# Prints "<accuracy> <macro F1>" from a metrics.json: train-head's (val.*) or evaluate's.
read_scores() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
path, kind = sys.argv[1], sys.argv[2]
m = json.load(open(path))
if kind == "val":
    print(m["val_accuracy"], m["val"]["macro_f1"])
else:
    print(m["accuracy"], m["macro_f1"])
EOF
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

table="| config | scored on | val accuracy | macro F1 | extract s (images computed) | train-head s |
|---|---|---:|---:|---:|---:|"
i=0
while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    [ -n "${line//[[:space:]]/}" ] || continue
    IFS='|' read -r label config overrides score extra <<<"$line"
    label=$(echo "$label" | xargs)
    config=$(echo "$config" | xargs)
    overrides=$(echo "${overrides:-}" | xargs)
    score=$(echo "${score:-val}" | xargs)
    [ -z "${extra:-}" ] || die "$ROWS: row '$label' has more than 4 columns"
    [ -f "$config" ] || die "$ROWS: row '$label': config $config not found"
    case $score in val | evaluate) ;; *) die "$ROWS: row '$label': score must be val or evaluate, not '$score'" ;; esac
    i=$((i + 1))
    dir=$OUT/row-$i
    mkdir -p "$dir"
    args=(--config "$config" "${GLOBAL[@]}")
    for o in $overrides; do args+=(--set "$o"); done
    args+=(--set "output.runs=$dir/runs")
    echo "=== row $i: $label ($config${overrides:+, $overrides})" >&2

    t0=$(now)
    "$PIPELINE_BIN/extract" "${args[@]}" 2>&1 | tee "$dir/extract.log" >&2
    t1=$(now)
    computed=$(sed -n 's/.*extract: \([0-9]*\) computed now.*/\1/p' "$dir/extract.log" | tail -1)
    "$PIPELINE_BIN/train-head" "${args[@]}" 2>&1 | tee "$dir/train-head.log" >&2
    t2=$(now)
    run=$(ls -d "$dir"/runs/head-* | tail -1)
    if [ "$score" = evaluate ]; then
        "$PIPELINE_BIN/evaluate" "${args[@]}" --set "evaluate.run=$run" \
            --set "evaluate.output=$dir/evaluation" 2>&1 | tee "$dir/evaluate.log" >&2
        read -r acc f1 < <(read_scores "$dir/evaluation/metrics.json" evaluate)
        scored="held-out set"
    else
        read -r acc f1 < <(read_scores "$run/metrics.json" val)
        scored="validation split"
    fi
    row=$(python3 -c "import sys; a, f = float(sys.argv[1]), float(sys.argv[2]); print(f'{100 * a:.2f}% | {f:.4f}')" "$acc" "$f1")
    table+="
| $label | $scored | $row | $(elapsed "$t0" "$t1") (${computed:-?}) | $(elapsed "$t1" "$t2") |"
done <"$ROWS"

echo "$table" >"$OUT/table.md"
echo
echo "$table"
echo
echo "rows' runs and logs: $OUT"
