#!/usr/bin/env bash
# Submits the extraction of the dataset as a Slurm array of N tasks and train-head as a job that
# runs once every task has succeeded (--dependency=afterok). Run it from the folder holding the
# config (or set PIPELINE_CONFIG), on a filesystem all nodes see.
#
#   scripts/slurm/submit.sh [--gpu] N [--config PATH] [--set section.key=value]...
#
# The arguments after N go to both extract and train-head, so both see the same dataset.
# --gpu uses extract-gpu.sbatch (one GPU per task, the CUDA build). Other sbatch options come
# from sbatch's own environment variables (SBATCH_PARTITION, SBATCH_ACCOUNT, ...). Prints the
# two job ids.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage="usage: $0 [--gpu] N [--config PATH] [--set section.key=value]..."
script=$here/extract.sbatch
if [ "${1:-}" = "--gpu" ]; then
    script=$here/extract-gpu.sbatch
    shift
fi
n=${1:-}
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
    echo "$usage" >&2
    echo "submit.sh: N must be a positive number of tasks, not '${n}'" >&2
    exit 2
fi
shift
array=$(sbatch --parsable --array="0-$((n - 1))" "$script" "$@")
array=${array%%;*} # --parsable prints "jobid[;cluster]"
head=$(sbatch --parsable --dependency="afterok:$array" "$here/train-head.sbatch" "$@")
head=${head%%;*}
echo "submit.sh: extract array job $array ($n tasks, $(basename "$script")), train-head job $head (after all of them succeed)"
echo "$array $head"
