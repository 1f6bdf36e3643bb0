#!/usr/bin/env bash
# One SLURM task's command with JAX_LOCAL_DEVICE_IDS set to the GPUs this task should drive, among
# those it sees; launch/slurm_gpu.sbatch has srun start it once per task:
#
#   launch/slurm_task.sh COMMAND...
#
# JAX's own SLURM detection gives each process the GPU numbered by its local rank: wrong when one
# process drives a whole node, or when SLURM binds each task to its own GPUs (--gpus-per-task,
# --gpu-bind), where the task sees them renumbered from 0. The task sees the GPUs listed in
# CUDA_VISIBLE_DEVICES (SLURM_STEP_GPUS, or SLURM_JOB_GPUS, where that is unset). If it sees fewer
# than the step has on this node it is bound to them and drives them all; otherwise the tasks on
# this node (from SLURM_STEP_TASKS_PER_NODE, which is set however the tasks were requested) split
# them evenly by SLURM_LOCALID. A JAX_LOCAL_DEVICE_IDS set by hand is kept.
set -euo pipefail

fail() {
  echo "task ${SLURM_PROCID:-?} on node ${SLURM_NODEID:-?}: $*; set JAX_LOCAL_DEVICE_IDS by hand" >&2
  exit 2
}

count() {  # count LIST: the entries of a comma-separated list of GPUs
  local list="$1" entries
  [[ -n "$list" && "$list" != NoDevFiles ]] || { echo 0; return; }
  IFS=, read -ra entries <<<"$list"
  echo "${#entries[@]}"
}

# SLURM_STEP_TASKS_PER_NODE lists the step's tasks per node, e.g. "8(x2)" or "3,2(x2)";
# SLURM_NODEID is this node's position in it.
tasks_on_this_node() {
  local entries entry tasks repeat first=0
  IFS=, read -ra entries <<<"${SLURM_STEP_TASKS_PER_NODE:?is not set: run this under srun}"
  for entry in "${entries[@]}"; do
    tasks="${entry%%(*}"
    repeat=1
    [[ "$entry" != *"(x"* ]] || { repeat="${entry#*(x}"; repeat="${repeat%)}"; }
    if ((SLURM_NODEID < first + repeat)); then
      echo "$tasks"
      return
    fi
    first=$((first + repeat))
  done
  fail "SLURM_NODEID $SLURM_NODEID is not in SLURM_STEP_TASKS_PER_NODE=$SLURM_STEP_TASKS_PER_NODE"
}

if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
  node_gpus="${SLURM_STEP_GPUS:-${SLURM_JOB_GPUS:-}}"
  visible="$(count "${CUDA_VISIBLE_DEVICES-$node_gpus}")"
  on_node="$(count "$node_gpus")"
  ((visible > 0)) || fail "sees no GPU (CUDA_VISIBLE_DEVICES, SLURM_STEP_GPUS and SLURM_JOB_GPUS are empty or unset)"
  if ((visible < on_node)); then
    first=0 per_task="$visible"
  else
    tasks="$(tasks_on_this_node)"
    ((visible % tasks == 0)) || fail "$tasks tasks on this node cannot split its $visible GPUs evenly"
    per_task=$((visible / tasks))
    first=$((${SLURM_LOCALID:?is not set: run this under srun} * per_task))
  fi
  JAX_LOCAL_DEVICE_IDS="$(seq -s, "$first" $((first + per_task - 1)))"
  export JAX_LOCAL_DEVICE_IDS
fi
exec "$@"
