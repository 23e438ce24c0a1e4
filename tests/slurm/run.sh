#!/usr/bin/env bash
# The cluster path on a real scheduler: installs Debian's slurm-wlm and munge if needed, starts a
# one-node Slurm (slurmctld + slurmd, munge) on this machine, submits the demo pipeline (the mini
# dataset, the tiny model, CPU) with pipelines/slurm/submit-flickr.sh as array jobs of 3 shards per
# sharded stage chained with --dependency=afterok, and checks the artifacts byte for byte against
# one process (the sim tables, and the report once `report` exists) and against the same 3 shards
# run one after another (every part). Then it cancels one array task mid-run (scancel), shows that
# `qpert status` names the missing shard and its rerun command, resubmits only that index plus the
# stages after it, and checks the result again. The daemons are stopped at the end.
#
# Usage: tests/slurm/run.sh [QPERT_BINARY]    (default: $CARGO_TARGET_DIR or target, debug/qpert)
# Exit: 0 passed, or skipped because Slurm cannot be set up here (the reason printed as
# `tests/slurm: SKIP: ...`); 1 a wrong result or a job that failed; 2 bad usage. Root is needed (to
# install packages and run the daemons). Takes about a minute.
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${1:-${CARGO_TARGET_DIR:-$repo/target}/debug/qpert}
[ -x "$bin" ] || { echo "tests/slurm: no qpert binary at $bin (cargo build first)" >&2; exit 2; }

work=$(mktemp -d /tmp/qpert-slurm.XXXXXX)
pids=()
cleanup() {
    [ -n "${SLURM_CONF:-}" ] && command -v scancel >/dev/null && scancel --quiet --user=root 2>/dev/null
    for f in "$work/slurmd.pid" "$work/slurmctld.pid" "$work/munge/munged.pid"; do
        [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    sleep 1
    if [ -n "${passed:-}" ]; then rm -rf "$work"; else echo "tests/slurm: artifacts and logs kept in $work"; fi
}
trap cleanup EXIT
say() { echo "tests/slurm: $*"; }
skip() { say "SKIP: $*"; passed=1; exit 0; }
fail() {
    say "FAIL: $*"
    for log in "$work"/log/* "$work"/logs/*; do [ -f "$log" ] && { echo "--- $log"; tail -n 10 "$log"; }; done
    exit 1
}

# 1. Slurm and munge, from Debian's packages.
[ "$(id -u)" = 0 ] || skip "not root: cannot install slurm-wlm or run its daemons"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || skip "slurm-wlm is not installed and there is no apt-get"
    say "installing slurm-wlm and munge (apt-get)"
    if ! { DEBIAN_FRONTEND=noninteractive timeout 900 apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq slurm-wlm munge; } >"$work/apt.log" 2>&1; then
        tail -n 5 "$work/apt.log"
        skip "apt-get install slurm-wlm munge failed (no network or no Debian repository?)"
    fi
fi

# 2. munge with its own socket, then a one-node cluster on this machine, state and logs in $work.
mkdir -p "$work"/{munge,spool,state,log,logs}
chown munge:munge "$work/munge" 2>/dev/null || skip "no munge user (the munge package did not install)"
key=/etc/munge/munge.key
if [ ! -s "$key" ]; then
    mkdir -p /etc/munge && dd if=/dev/urandom of="$key" bs=1 count=1024 2>/dev/null
    chown munge:munge "$key" && chmod 400 "$key"
fi
chmod 755 "$work"
socket="$work/munge/munge.socket"
runuser -u munge -- munged --socket="$socket" --pid-file="$work/munge/munged.pid" \
    --log-file="$work/munge/munged.log" --seed-file="$work/munge/seed" --key-file="$key" \
    || skip "munged does not start: $(tail -n 1 "$work/munge/munged.log" 2>/dev/null)"
munge --socket="$socket" -n | unmunge --socket="$socket" >/dev/null 2>&1 || skip "munge cannot encode/decode a credential"

host=$(hostname -s)
port=$((20000 + RANDOM % 9000))
export SLURM_CONF="$work/slurm.conf"
cat > "$SLURM_CONF" <<CONF
ClusterName=qpert-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
slurmctld -i || skip "slurmctld does not start: $(tail -n 2 "$work/log/slurmctld.log" 2>/dev/null)"
slurmd || skip "slurmd does not start: $(tail -n 2 "$work/log/slurmd.log" 2>/dev/null)"
for _ in $(seq 30); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && break
    sleep 1
done
[ "$(sinfo -h -o %T 2>/dev/null)" = idle ] || skip "the node did not come up: $(sinfo -h 2>&1 | head -n 1); $(tail -n 2 "$work/log/slurmd.log")"
say "slurm $(sinfo --version | cut -d' ' -f2) up on $host (port $port)"

# 3. The demo pipeline. The binary is copied so that a rebuild meanwhile cannot change it; small
#    batches make the 3 shards real (5 images, 25 captions).
cp "$bin" "$work/qpert"
cd "$repo"
set_args="model.image_batch=2 model.text_batch=4"
q() { "$work/qpert" "$@" --config configs/mini.toml $(for kv in $set_args "output.dir=$out"; do printf -- '--set %s ' "$kv"; done); }

# Reference 1: one process, unsharded.
out="$work/single"
stages="index extract text sim rerank"
if q run >"$work/log/single.log" 2>&1; then
    stages="$stages report"
elif ! grep -q "stage report is not implemented yet" "$work/log/single.log"; then
    fail "the single-process run failed: $(tail -n 1 "$work/log/single.log")"
fi
last=${stages##* }
# Reference 2: the same 3 shards, one after another.
out="$work/sequential"
for stage in $stages; do
    case $stage in
        extract|text|rerank) for i in 1 2 3; do q stage $stage --shard $i/3 >/dev/null 2>&1 || fail "sequential $stage $i/3"; done ;;
        *) q stage $stage >/dev/null 2>&1 || fail "sequential $stage" ;;
    esac
done

export QPERT="$work/qpert" QPERT_CONFIG=configs/mini.toml QPERT_GPU=""
export QPERT_SBATCH="--chdir=$repo --output=$work/logs/%x-%A_%a.out --cpus-per-task=1 --mem=100M --time=10"

# Waits until none of the given jobs is pending or running (at most $2 seconds).
wait_jobs() {
    local jobs=$1 limit=$2
    for _ in $(seq "$limit"); do
        [ -z "$(squeue -h -j "$jobs" -t PD,R,CG 2>/dev/null)" ] && return 0
        # A failed job leaves its dependents pending for ever: fail now, with the job logs.
        squeue -h -j "$jobs" -o %r 2>/dev/null | grep -q DependencyNeverSatisfied && fail "a job failed: $(squeue -h -j "$jobs" -o '%i %j %r' | head -n 3 | tr '\n' ';')"
        sleep 1
    done
    squeue -j "$jobs"; fail "jobs $jobs still queued after ${limit}s"
}
job_ids() { awk '$2 ~ /^[0-9]+$/ {print $2}' "$1" | paste -sd, -; }
check_same() { # check_same DIR: every artifact equals the references, byte for byte
    local dir=$1 f n=0
    for f in "$work"/sequential/{extract,text,rerank}/part-*.parquet "$work"/sequential/sim/*.parquet; do
        cmp -s "$f" "$dir/${f#"$work"/sequential/}" || fail "${f#"$work"/sequential/} differs from the sequential shards"
        n=$((n + 1))
    done
    for f in "$work"/single/sim/*.parquet "$work"/single/report/*; do
        [ -e "$f" ] || continue
        cmp -s "$f" "$dir/${f#"$work"/single/}" || fail "${f#"$work"/single/} differs from one process"
        n=$((n + 1))
    done
    for stage in $stages; do [ -s "$dir/$stage/manifest.json" ] || fail "$dir/$stage has no manifest"; done
    say "$n files identical to the references ($(basename "$dir"))"
}

# 4. Array jobs of 3 shards, chained with afterok.
out="$work/slurm"
export QPERT_SET="$set_args output.dir=$out"
pipelines/slurm/submit-flickr.sh --shards 3 --text-shards 3 --until "$last" >"$work/jobs.txt" || fail "sbatch failed"
say "submitted: $(head -n -1 "$work/jobs.txt" | tr "\n" " ")"
start=$SECONDS
wait_jobs "$(job_ids "$work/jobs.txt")" 300
say "pipeline done in $((SECONDS - start))s"
check_same "$out"

# 5. Cancel extract's task 2 mid-run, then resubmit only that index. The task's wrapper first holds
#    shard 2's lock as qpert would and then works slowly, so the cancellation leaves a stale lock.
out="$work/killed"
export QPERT_SET="$set_args output.dir=$out"
cat > "$work/qpert-slow" <<WRAP
#!/bin/bash
if [ "\$2" = extract ] && [ "\${SLURM_ARRAY_TASK_ID:-}" = 2 ] && [ ! -e "$work/cancelled" ]; then
    mkdir -p "$out/extract"
    printf '{"host":"%s","pid_ns":"%s","pid":%d,"pid_start":%s,"since":%d}' "\$(cat /proc/sys/kernel/hostname)" \\
        "\$(readlink /proc/self/ns/pid)" \$\$ "\$(cut -d' ' -f22 /proc/\$\$/stat)" "\$(date +%s)" > "$out/extract/part-00002-of-00003.lock"
    touch "$work/slow-started"
    sleep 600
fi
exec "$work/qpert" "\$@"
WRAP
chmod +x "$work/qpert-slow"
QPERT="$work/qpert-slow" pipelines/slurm/submit-flickr.sh --shards 3 --text-shards 3 --until "$last" >"$work/jobs2.txt" || fail "sbatch failed"
extract_job=$(awk '$1 == "extract" {print $2}' "$work/jobs2.txt")
for _ in $(seq 120); do [ -e "$work/slow-started" ] && break; sleep 1; done
[ -e "$work/slow-started" ] || fail "extract task 2 never started"
status=$(q status)
# Shard 1 may still be running beside it ("running [1: host ...; 2: host ...]").
echo "$status" | grep -Eq "^extract  partial: .*running \[([^]]*; )?2: host " || fail "status does not show shard 2 running: $status"
touch "$work/cancelled"
scancel "${extract_job}_2"
wait_jobs "${extract_job}" 60
say "cancelled ${extract_job}_2 mid-run; the stages after extract wait: $(squeue -h -o '%j:%r' | sort -u | tr '\n' ' ')"
status=$(q status)
echo "$status" | grep -q "^extract  partial: 2 of 3 shards done \[1, 3\]; stale lock, owner gone \[2: host .* is not running" \
    || fail "status does not show shard 2's stale lock: $status"
echo "$status" | grep -q "for i in 2; do .* --shard \$i/3; done" || fail "status prints no rerun command: $status"
echo "$status" | grep -q "Slurm: sbatch --array=2 " || fail "status prints no Slurm rerun command: $status"
echo "$status" | grep -E '^extract  |^extract: to finish|^  ' | sed 's/^/  | /'
# The dependents can never start (afterok on a cancelled task): drop them, resubmit index 2 alone,
# then the stages after extract depending on it.
scancel $(awk '$2 ~ /^[0-9]+$/ && $1 != "index" && $1 != "extract" && $1 != "text" {print $2}' "$work/jobs2.txt")
again=$(sbatch --parsable $QPERT_SBATCH --job-name=qpert-extract --array=2 pipelines/slurm/reproduce-flickr.sbatch extract 3) \
    || fail "resubmitting extract index 2 failed"
pipelines/slurm/submit-flickr.sh --shards 3 --text-shards 3 --from sim --after "$again" --until "$last" >"$work/jobs3.txt" || fail "sbatch failed"
wait_jobs "$again,$(job_ids "$work/jobs3.txt")" 300
[ -e "$out/extract/part-00002-of-00003.lock" ] && fail "the stale lock was not taken over and released"
check_same "$out"
say "PASS ($((SECONDS))s)"
passed=1
