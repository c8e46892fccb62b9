#!/usr/bin/env bash
# The Slurm recipe against a real Slurm, on this machine: installs Debian's slurmctld, slurmd,
# slurm-client and munge if they are missing (services kept from starting), starts munged,
# slurmctld and slurmd as a one-node cluster of its own (own key, socket, ports, state and
# logs in a temporary folder; no cgroups, no systemd), submits scripts/slurm/submit.sh's array
# of 4 extract tasks over the first 256 images of the study data plus the dependent train-head,
# waits for them (bounded), and checks that
#   - every array task and the train-head job COMPLETED;
#   - the store the 4 tasks wrote is, file for file and byte for byte, the store of an
#     unsharded extract of the same images (the part records aside);
#   - train-head trained a head on all 256 images (its metrics.json);
# then stops the daemons it started, by their pid files, and removes its folder.
#
#   scripts/slurm/test_slurm.sh [--keep]
#
# --keep leaves the temporary folder (logs, stores, job outputs). Needs root (it installs
# packages and runs the daemons), ../shared beside the checkout (or PIPELINE_SHARED_DIR), and
# the debug binaries of extract and train-head (brought up to date here with cargo; set
# PIPELINE_BIN to use others). Takes about 2 minutes on a 2-core machine, most of it the two
# extractions of 256 images. Prints `test_slurm: PASSED` or fails with what went wrong.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KEEP=""
[ "${1:-}" = "--keep" ] && KEEP=1
IMAGES=256
TASKS=4
# 4 batches of 64 images: one per task.
BATCH=64
WAIT_S=${SLURM_TEST_WAIT_S:-900}

say() { echo "test_slurm: $*" >&2; }
die() {
    say "FAILED: $*"
    exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons)"
SHARED=${PIPELINE_SHARED_DIR:-$ROOT/../shared}
[ -d "$SHARED/data/emergency-vehicles" ] || die "no study data in $SHARED (set PIPELINE_SHARED_DIR)"
SHARED=$(cd "$SHARED" && pwd)

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null ||
    ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Keep the packages from starting system-wide daemons: this test starts its own.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
fi

# --- binaries -------------------------------------------------------------------------------
if [ -z "${PIPELINE_BIN:-}" ]; then
    PIPELINE_BIN=$ROOT/target/debug
    # Always through cargo (nothing to do when they are fresh): `cargo test` does not rebuild
    # train-head's binary (that crate has no integration tests), so it may be stale.
    say "building extract and train-head (cargo build, dev profile)"
    (cd "$ROOT" && cargo build -q -p extract -p train-head)
fi
export PIPELINE_BIN
[ -x "$PIPELINE_BIN/extract" ] && [ -x "$PIPELINE_BIN/train-head" ] ||
    die "no extract / train-head in $PIPELINE_BIN"

# --- the cluster ----------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/slurm-test.XXXXXX)
chmod 755 "$WORK"
MUNGE=$WORK/munge
export SLURM_CONF=$WORK/slurm.conf

stop() {
    local name=$1 pidfile=$2
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    say "$name (pid $pid) did not stop in 10 s: killing it"
    kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    stop slurmd "$WORK/slurmd.pid"
    stop slurmctld "$WORK/slurmctld.pid"
    stop munged "$MUNGE/munged.pid"
    if [ "$rc" != 0 ]; then
        for f in "$WORK"/slurmctld.log "$WORK"/slurmd.log "$MUNGE"/munged.log "$WORK"/jobs/*.out; do
            [ -f "$f" ] || continue
            echo "----- $f (last 30 lines)" >&2
            tail -n 30 "$f" >&2
        done
    fi
    if [ -n "$KEEP" ] || [ "$rc" != 0 ]; then
        say "left $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# munge: its own key (400) and socket, in a folder of mode 755 owned by the munge user.
mkdir -p "$MUNGE"
chmod 755 "$MUNGE"
mungekey --create --keyfile="$MUNGE/munge.key" >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$MUNGE"
chmod 400 "$MUNGE/munge.key"
runuser -u munge -- munged --force --socket="$MUNGE/munge.socket" --key-file="$MUNGE/munge.key" \
    --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
    --seed-file="$MUNGE/munged.seed" ||
    die "munged did not start"

# Two free TCP ports for slurmctld and slurmd.
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    die "no free port found"
}
CTLD_PORT=$(free_port)
D_PORT=$(free_port)
while [ "$D_PORT" = "$CTLD_PORT" ]; do D_PORT=$(free_port); done

NODE_LINE=$(slurmd -C | head -n1)
HOST=$(hostname -s)
mkdir -p "$WORK/state" "$WORK/spool" "$WORK/jobs"
cat >"$SLURM_CONF" <<CONF
ClusterName=pipeline-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -i || die "slurmctld did not start"
slurmd || die "slurmd did not start"
up=""
for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null | head -n1 || true)
    if [ "$state" = "idle" ]; then
        up=1
        break
    fi
    sleep 1
done
[ -n "$up" ] || die "the node did not come up (sinfo: ${state:-nothing})"
say "one-node cluster up ($(sinfo -h -o '%N %c CPUs %m MB')), ports $CTLD_PORT/$D_PORT"

# --- the recipe -----------------------------------------------------------------------------
# The repository's pipeline.toml with the ../shared layer; the subset, the store and the runs
# folder by --set, the same for the array and train-head.
export PIPELINE_CONFIG=$ROOT/pipeline.toml
export PIPELINE_CONFIG_LAYER=$ROOT/configs/shared.toml
export PIPELINE_SHARED_DIR=$SHARED
SETS=(--set "data.limit=$IMAGES" --set "extract.batch_size=$BATCH" --set extract.device=cpu
    --set "extract.out=$WORK/features" --set "output.runs=$WORK/runs")
start=$(date +%s)
ids=$(cd "$WORK/jobs" && "$ROOT/scripts/slurm/submit.sh" "$TASKS" "${SETS[@]}" | tail -n1)
read -r ARRAY HEAD <<<"$ids"
[[ $ARRAY =~ ^[0-9]+$ && $HEAD =~ ^[0-9]+$ ]] || die "submit.sh printed '$ids'"
say "submitted array job $ARRAY ($TASKS tasks) and train-head job $HEAD (afterok)"

done_jobs=""
for _ in $(seq "$WAIT_S"); do
    if [ -z "$(squeue -h -j "$ARRAY,$HEAD" 2>/dev/null)" ]; then
        done_jobs=1
        break
    fi
    # A failed array task leaves train-head pending for ever: stop waiting at once.
    if [ "$(squeue -h -j "$HEAD" -o %r 2>/dev/null)" = "DependencyNeverSatisfied" ]; then
        die "an array task failed, so train-head can never start: $(scontrol show job "$ARRAY" | grep -o 'JobState=[A-Z_]*' | sort | uniq -c | tr -s ' ')"
    fi
    sleep 1
done
[ -n "$done_jobs" ] || die "the jobs did not finish in $WAIT_S s: $(squeue -h)"
took=$(($(date +%s) - start))

states=$(scontrol show job "$ARRAY" | grep -o 'JobState=[A-Z_]*' | sort | uniq -c | tr -s ' ')
head_state=$(scontrol show job "$HEAD" | grep -o 'JobState=[A-Z_]*')
say "array tasks: $states; train-head: $head_state; $took s"
[ "$(scontrol show job "$ARRAY" | grep -c 'JobState=COMPLETED')" = "$TASKS" ] ||
    die "not every array task completed: $states"
[ "$head_state" = "JobState=COMPLETED" ] || die "train-head did not complete: $head_state"

for t in $(seq 0 $((TASKS - 1))); do
    out=$WORK/jobs/slurm-extract-${ARRAY}_$t.out
    grep -q "shard $t/$TASKS (from Slurm array (SLURM_ARRAY_TASK_ID=$t" "$out" ||
        die "task $t's log does not say its shard ($out)"
done
[ "$(find "$WORK/features/parts" -name 'part-*-of-4.json' | wc -l)" = "$TASKS" ] ||
    die "expected $TASKS part records"

say "unsharded reference extraction of the same $IMAGES images"
"$PIPELINE_BIN/extract" --config "$PIPELINE_CONFIG" "${SETS[@]}" \
    --set "extract.out=$WORK/reference" >"$WORK/reference.log" 2>&1 ||
    die "the reference extraction failed: $(tail -n 5 "$WORK/reference.log")"
diff -r --exclude=parts --exclude=.lock "$WORK/reference" "$WORK/features" ||
    die "the union of the $TASKS parts differs from the unsharded store"
shards=$(find "$WORK/features/spaces" -name 'shard-*.safetensors' | wc -l)

head_out=$WORK/jobs/slurm-train-head-$HEAD.out
split=$(grep -o 'split: [0-9]* training, [0-9]* validation' "$head_out" || true)
read -r train val <<<"$(echo "$split" | grep -o '[0-9]*' | tr '\n' ' ')"
[ -n "${train:-}" ] && [ $((train + val)) = "$IMAGES" ] ||
    die "train-head did not train on all $IMAGES images ('$split' in $head_out)"
metrics=$(find "$WORK/runs" -path '*head-*/metrics.json' | head -n1)
[ -n "$metrics" ] || die "train-head wrote no metrics.json under $WORK/runs"
accuracy=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["val_accuracy"])' \
    "$metrics") || die "no val_accuracy in $metrics"
say "head trained on $train images, validation accuracy $accuracy on $val"
say "store of $TASKS parts ($shards shards) equals the unsharded one byte for byte; head trained"
say "PASSED ($took s from submission to train-head's end)"
echo "test_slurm: 1 passed, 0 failed"
