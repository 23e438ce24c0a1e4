#!/usr/bin/env bash
# The qpert pipeline on the GPUs of one machine, without a scheduler: each sharded stage (extract,
# text, rerank) runs as one worker process per GPU (`qpert stage STAGE --shard I/N`, with
# CUDA_VISIBLE_DEVICES set to that GPU), the unsharded ones (index, sim, report) as one process, sim
# on the first GPU. Extract and text need only the index, so they run at the same time (two
# processes on each GPU: text is seconds of GPU work, and its model load and tokenising then hide
# behind extract). The workers coordinate as on a cluster (a lock per shard; the last one to finish
# writes the manifest), so after a failure or Ctrl-C a rerun computes only what is not done.
#
#   index ─┬─> extract (N workers) ─┬─> sim ─> rerank (N workers) ─> report
#          └─> text    (N workers) ─┘
#
# Usage: pipelines/local/run-gpus.sh [--gpus LIST] [--until STAGE] [-- QPERT_OPTIONS...]
#   --gpus LIST     comma-separated CUDA device ids or UUIDs, one worker each (default: the
#                   CUDA_VISIBLE_DEVICES of this shell, else every GPU `nvidia-smi -L` lists)
#   --until STAGE   stop after STAGE (default report)
#   QPERT_OPTIONS   passed to every qpert call, e.g. --set qpert.alpha=4 --strict, or --force
# Environment:
#   QPERT         the qpert binary (default: target/release/qpert, else qpert on PATH)
#   QPERT_CONFIG  the config (default: configs/flickr30k.toml)
#   QPERT_LOGS    the folder of the workers' logs (default: qpert-logs/<UTC date and time>)
# Unsharded stages print to this terminal; a worker's output goes to
# QPERT_LOGS/<stage>-<I>-of-<N>.log, and a line here says how each worker ended. Exit: 0 when every
# stage up to --until is done; 1 when a stage failed (its failed workers are named, with the last
# line of their logs; the stages after it are not started); 2 bad usage; 130 interrupted.
set -uo pipefail

usage() { echo "run-gpus.sh: $*" >&2; echo "usage: pipelines/local/run-gpus.sh [--gpus LIST] [--until STAGE] [-- QPERT_OPTIONS...]" >&2; exit 2; }

gpus=${CUDA_VISIBLE_DEVICES:-} until=report
while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) [ $# -ge 2 ] || usage "--gpus needs a list, e.g. --gpus 0,1,2,3"; gpus=$2; shift 2 ;;
        --until) [ $# -ge 2 ] || usage "--until needs a stage"; until=$2; shift 2 ;;
        --) shift; break ;;
        *) usage "unknown option $1" ;;
    esac
done
options=("$@")
order=(index extract text sim rerank report)
case " ${order[*]} " in *" $until "*) ;; *) usage "--until: unknown stage $until (one of: ${order[*]})" ;; esac

if [ -z "$gpus" ]; then
    command -v nvidia-smi >/dev/null || usage "no --gpus and no CUDA_VISIBLE_DEVICES, and nvidia-smi is not installed to list the GPUs"
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
    [ -n "$gpus" ] || usage "nvidia-smi lists no GPU; give --gpus"
fi
IFS=, read -r -a gpu <<< "$gpus"
for g in "${gpu[@]}"; do [ -n "$g" ] || usage "--gpus $gpus: an empty entry"; done
shards=${#gpu[@]}
[ "$shards" -ge 1 ] || usage "--gpus: no GPU given"

qpert=${QPERT:-}
if [ -z "$qpert" ]; then
    if [ -x target/release/qpert ]; then qpert=target/release/qpert; else qpert=qpert; fi
fi
command -v "$qpert" >/dev/null || usage "no qpert binary at $qpert (cargo build --release --features cuda, or set QPERT)"
config=${QPERT_CONFIG:-configs/flickr30k.toml}
logs=${QPERT_LOGS:-qpert-logs/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$logs" || usage "cannot create the log folder $logs"

say() { echo "run-gpus: $*"; }
workers=()
interrupted() {
    [ ${#workers[@]} -eq 0 ] || kill "${workers[@]}" 2>/dev/null
    wait
    say "interrupted; rerun to continue (finished shards are kept)"
    exit 130
}
trap interrupted INT TERM

# An unsharded stage, in this process's terminal, on the first GPU.
run_single() {
    local stage=$1
    CUDA_VISIBLE_DEVICES=${gpu[0]} "$qpert" stage "$stage" --config "$config" "${options[@]}" ||
        { say "$stage failed (exit $?); fix the cause and rerun: done stages and shards are skipped"; exit 1; }
}

# Sharded stages, run at the same time: one worker per GPU and stage, each with its own log; waits
# for all, and reports each worker as it ends (not in shard order), so a failed shard is named at once.
run_sharded() {
    local stage i j log start labels=() failed=()
    start=$(date +%s)
    workers=()
    for stage in "$@"; do
        say "$stage: $shards shard(s) on GPUs ${gpus}; logs: $logs/$stage-*-of-$shards.log"
        for i in $(seq 1 "$shards"); do
            log="$logs/$stage-$i-of-$shards.log"
            {
                echo "$(date -u +%FT%TZ) $(hostname) CUDA_VISIBLE_DEVICES=${gpu[i - 1]}: $qpert stage $stage --config $config --shard $i/$shards ${options[*]}"
                CUDA_VISIBLE_DEVICES=${gpu[i - 1]} exec "$qpert" stage "$stage" --config "$config" --shard "$i/$shards" "${options[@]}"
            } >"$log" 2>&1 &
            workers+=($!)
            labels+=("$stage $i")
        done
    done
    # Polled rather than `wait -n -p`, which needs bash 5.1; RHEL 8 clusters have 4.4.
    local pending still ended
    pending=$(seq 0 $((${#workers[@]} - 1)))
    while [ -n "$pending" ]; do
        still= ended=0
        for j in $pending; do
            if kill -0 "${workers[j]}" 2>/dev/null; then still="$still $j"; continue; fi
            ended=1
            read -r stage i <<<"${labels[j]}"
            log="$logs/$stage-$i-of-$shards.log"
            if wait "${workers[j]}"; then
                say "$stage $i/$shards on GPU ${gpu[i - 1]}: ok ($(( $(date +%s) - start )) s): $(grep -v '^qpert: \(warning\|progress\)' "$log" | tail -n 1)"
            else
                local code=$?
                say "$stage $i/$shards on GPU ${gpu[i - 1]}: FAILED (exit $code): $(tail -n 1 "$log")"
                failed+=("${labels[j]}")
            fi
        done
        pending=$still
        [ -z "$pending" ] || [ "$ended" -eq 1 ] || sleep 1
    done
    workers=()
    [ ${#failed[@]} -gt 0 ] || return 0
    for stage in "$@"; do
        local shards_failed
        shards_failed=$(printf '%s\n' "${failed[@]}" | sed -n "s/^$stage //p" | sort -n | paste -sd " " -)
        [ -z "$shards_failed" ] ||
            say "$stage failed in shard(s) $shards_failed of $shards (logs above); fix the cause and rerun: done shards are skipped"
    done
    exit 1
}

say "$qpert, config $config, $shards GPU(s): $gpus"
for stage in "${order[@]}"; do
    case "$stage" in
        index | sim | report) run_single "$stage" ;;
        extract) if [ "$until" = extract ]; then run_sharded extract; else run_sharded extract text; fi ;;
        text) ;; # ran beside extract
        rerank) run_sharded rerank ;;
    esac
    [ "$stage" != "$until" ] || break
done
say "done up to $until; $qpert status --config $config"
