#!/bin/bash
# Runs the qpert pipeline on Kubernetes, one Job per stage, each started when the previous one
# completed (Kubernetes has no Job-to-Job dependencies): index (CPU) -> extract + text (Indexed
# Jobs, 1 GPU per pod, both at once) -> sim (1 GPU) -> rerank (Indexed Job) -> report (CPU).
#
# Usage: QPERT_IMAGE=registry/qpert:cuda pipelines/k8s/run.sh [--shards N] [--text-shards M] [--parallelism P] [--until STAGE]
#   --shards N       shards of extract and rerank (default 8); --text-shards M for text (default 2)
#   --parallelism P  pods running at once per Indexed Job (default: all)
# Environment: QPERT_IMAGE (an image with a `--features cuda` qpert on PATH and the CUDA runtime),
#   QPERT_CONFIG (default configs/flickr30k.toml, relative to the volume's root /work),
#   KUBECTL (default kubectl). The PersistentVolumeClaim of volume.yaml must exist and hold the inputs.
# A stage whose Job fails stops the script; `qpert status` (in any pod on the volume) lists the
# shards not done. Delete the failed Job (kubectl delete job qpert-STAGE) and rerun: done shards are
# skipped, so only the missing ones compute.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${QPERT_IMAGE:?set QPERT_IMAGE to an image with qpert built with --features cuda}"
export QPERT_IMAGE QPERT_CONFIG=${QPERT_CONFIG:-configs/flickr30k.toml}
kubectl=${KUBECTL:-kubectl}
shards=8 text_shards=2 parallelism="" until=report
while [ $# -gt 0 ]; do
    case "$1" in
        --shards) shards=$2; shift 2 ;;
        --text-shards) text_shards=$2; shift 2 ;;
        --parallelism) parallelism=$2; shift 2 ;;
        --until) until=$2; shift 2 ;;
        *) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
vars='${STAGE} ${SHARDS} ${PARALLELISM} ${GPUS} ${QPERT_IMAGE} ${QPERT_CONFIG}'

start_single() { STAGE=$1 GPUS=$2 envsubst "$vars" < "$here/single-stage.yaml" | $kubectl apply -f -; }
start_sharded() { STAGE=$1 SHARDS=$2 PARALLELISM=${parallelism:-$2} envsubst "$vars" < "$here/gpu-stage.yaml" | $kubectl apply -f -; }
# Waits until each named Job completed; stops the script when one failed.
wait_for() {
    local stage state
    for stage in "$@"; do
        while :; do
            state=$($kubectl get job "qpert-$stage" -o jsonpath='{range .status.conditions[?(@.status=="True")]}{.type} {end}')
            case " $state " in
                *" Complete "*) break ;;
                *" Failed "*) echo "run.sh: job qpert-$stage failed; \`qpert status\` lists the shards not done" >&2; exit 1 ;;
            esac
            sleep 20
        done
    done
}

start_single index 0; wait_for index; [ "$until" != index ] || exit 0
start_sharded extract "$shards"; start_sharded text "$text_shards"; wait_for extract text
[ "$until" != extract ] && [ "$until" != text ] || exit 0
start_single sim 1; wait_for sim; [ "$until" != sim ] || exit 0
start_sharded rerank "$shards"; wait_for rerank; [ "$until" != rerank ] || exit 0
start_single report 0; wait_for report
