#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch with the job's sizes:
#
#   launch/slurm_gpu.sh [--nodes 2] [--gpus-per-node 8] [--process-per gpu|node] [--cpus-per-gpu 12]
#       [--partition P] [--account A] [--time HH:MM:SS] [--dry-run] -- --config CONFIG --workdir DIR \
#       [--config.FIELD=VALUE ...]
#
# Each process gets --cpus-per-gpu CPUs for each GPU it drives, for loading their data.
# e.g. the paper's machine (2 x 8 H100):
#   launch/slurm_gpu.sh --nodes 2 -- --config configs/cc12m_b16.py:grain,gpu_2x8_h100 \
#       --workdir /shared/runs/cc12m_grain --config.data.train_dir=/shared/shards/cc12m
# Submitting again with the same workdir resumes from the newest checkpoint. --dry-run prints the
# sbatch command instead of submitting it.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

nodes=2 gpus_per_node=8 process_per=gpu cpus_per_gpu=12 dry_run=false
options=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus_per_node="$2"; shift 2 ;;
    --process-per) process_per="$2"; shift 2 ;;
    --cpus-per-gpu) cpus_per_gpu="$2"; shift 2 ;;
    --partition | --account | --time) options+=("$1=$2"); shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "missing the arguments of grain_jax.main after --" >&2; usage; }
refuse_dry_run_after_separator "$@"
for count in nodes gpus_per_node cpus_per_gpu; do
  [[ "${!count}" =~ ^[1-9][0-9]*$ ]] ||
    { echo "--${count//_/-} must be a positive integer, got '${!count}'" >&2; exit 2; }
done
case "$process_per" in
  gpu) tasks_per_node="$gpus_per_node" cpus_per_task="$cpus_per_gpu" ;;
  node) tasks_per_node=1 cpus_per_task=$((cpus_per_gpu * gpus_per_node)) ;;
  *) echo "--process-per must be gpu or node, got '$process_per'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
command=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus_per_node"
         --cpus-per-task="$cpus_per_task" "${options[@]}" launch/slurm_gpu.sbatch "$@")
run "${command[@]}"
