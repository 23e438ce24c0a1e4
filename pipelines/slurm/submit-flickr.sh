#!/bin/bash
# Submits the qpert pipeline to Slurm as chained jobs (each waits with --dependency=afterok):
#
#   index (CPU) ─┬─> extract  array 1-N, 1 GPU per task ─┬─> sim (1 GPU) ─> rerank  array 1-N, 1 GPU per task ─> report (CPU)
#                └─> text     array 1-M, 1 GPU per task ─┘
#
# Usage: pipelines/slurm/submit-flickr.sh [--shards N] [--text-shards M] [--from STAGE] [--after JOB] [--until STAGE]
#   --shards N        shards of extract and rerank (default 8)
#   --text-shards M   shards of text (default 2)
#   --from STAGE      submit the stages from STAGE on only (default index)
#   --after JOB       make the first submitted stages wait for job JOB (e.g. a resubmitted shard)
#   --until STAGE     submit the stages up to STAGE only (default report)
# Environment: QPERT, QPERT_CONFIG, QPERT_SET as in reproduce-flickr.sbatch, plus
#   QPERT_GPU       the GPU request of GPU jobs (default "gpu:1"; empty on a cluster without GRES)
#   QPERT_SBATCH    extra sbatch options for every job, e.g. "--partition=gpu --account=lab"
# Prints the job ids, then the command to watch progress. A failed or cancelled array task leaves
# its dependents pending (DependencyNeverSatisfied); resubmit only that index, e.g.
#   sbatch --array=3 --gres=gpu:1 pipelines/slurm/reproduce-flickr.sbatch extract N
# and then the stages after it:  submit-flickr.sh --from sim --after <that job id>
# (`qpert status` names the missing shards and the command running them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
script="$here/reproduce-flickr.sbatch"
shards=8 text_shards=2 from=index after="" until=report
while [ $# -gt 0 ]; do
    case "$1" in
        --shards) shards=$2; shift 2 ;;
        --text-shards) text_shards=$2; shift 2 ;;
        --from) from=$2; shift 2 ;;
        --after) after=$2; shift 2 ;;
        --until) until=$2; shift 2 ;;
        *) echo "submit-flickr.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
gpu=${QPERT_GPU-gpu:1}
gres=()
[ -z "$gpu" ] || gres=(--gres="$gpu")
read -r -a extra <<< "${QPERT_SBATCH:-}"

# submit NAME DEPENDENCY [sbatch options...] -- script arguments...
submit() {
    local name=$1 dep=$2; shift 2
    local opts=()
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done
    shift
    [ -z "$dep" ] || opts+=(--dependency="afterok:$dep")
    sbatch --parsable --job-name="qpert-$name" "${extra[@]}" "${opts[@]}" "$script" "$@" | cut -d';' -f1
}

# The jobs a stage waits for: its inputs' jobs, or --after for inputs not submitted now.
declare -A id
deps() {
    local input out=()
    for input in "$@"; do out+=("${id[$input]:-$after}"); done
    printf '%s\n' "${out[@]}" | grep -v '^$' | sort -u | paste -sd: -
}
order=(index extract text sim rerank report)
started=""
for stage in "${order[@]}"; do
    [ "$stage" = "$from" ] && started=1
    if [ -n "$started" ]; then
        case "$stage" in
            index)   id[index]=$(submit index "$after" -- index) ;;
            extract) id[extract]=$(submit extract "$(deps index)" --array="1-$shards" "${gres[@]}" -- extract "$shards") ;;
            text)    id[text]=$(submit text "$(deps index)" --array="1-$text_shards" "${gres[@]}" -- text "$text_shards") ;;
            sim)     id[sim]=$(submit sim "$(deps extract text)" "${gres[@]}" -- sim) ;;
            rerank)  id[rerank]=$(submit rerank "$(deps sim)" --array="1-$shards" "${gres[@]}" -- rerank "$shards") ;;
            report)  id[report]=$(submit report "$(deps rerank)" -- report) ;;
        esac
        echo "$stage ${id[$stage]}"
    fi
    [ "$stage" != "$until" ] || break
done
[ -n "$started" ] || { echo "submit-flickr.sh: unknown stage $from" >&2; exit 2; }
echo "watch: squeue -u ${USER:-$(id -un)}; ${QPERT:-qpert} status --config ${QPERT_CONFIG:-configs/flickr30k.toml}"
