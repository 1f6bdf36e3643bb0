#!/usr/bin/env bash
# N processes of `python -m grain_jax.main` on this machine, on the CPU, with gloo collectives:
# the code path of a pod (jax.distributed.initialize, each process reading its own rows, one
# global batch), small enough for a laptop and the tests.
#
#   launch/local_multiprocess.sh [--processes N] [--devices-per-process D] [--port P] [--dry-run] \
#       -- --config configs/base.py:tiny --workdir runs/multiprocess [--config.FIELD=VALUE ...]
#
# It runs from the repository root (relative paths are taken from there). Running it again with
# the same workdir resumes from the newest checkpoint. The interpreter is $PYTHON (default:
# python). If one process fails the others are stopped and its status returned. A process that
# saved a checkpoint on a preemption notice (SIGTERM to any of them) exits with status 75; the others
# save at the same step and stop too, and the launcher returns 75 once all have. A SIGTERM to the
# launcher is passed on to every process; Ctrl-C stops them.
set -euo pipefail
bash_major=5 bash_minor=1  # wait -n -p
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

processes=2
devices_per_process=1
port=""
dry_run=false
python="${PYTHON:-python}"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --processes) processes="$2"; shift 2 ;;
    --devices-per-process) devices_per_process="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
[[ $# -gt 0 ]] || { echo "missing the arguments of grain_jax.main after --" >&2; usage; }
refuse_dry_run_after_separator "$@"
[[ "$processes" =~ ^[1-9][0-9]*$ ]] || { echo "--processes must be a positive integer, got '$processes'" >&2; exit 2; }
[[ "$devices_per_process" =~ ^[1-9][0-9]*$ ]] ||
  { echo "--devices-per-process must be a positive integer, got '$devices_per_process'" >&2; exit 2; }

cd "$(dirname "$0")/.."
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

pids=()
# SIGTERM first, SIGKILL after 10 s: a process in jax.distributed keeps running on SIGTERM (JAX
# turns it into a preemption notice), and one left waiting in a collective never ends.
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  for _ in {1..10}; do
    kill -0 "${pids[@]}" 2>/dev/null || return 0
    sleep 1
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap stop_all INT
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM
preempted_status=75  # grain_jax.main: saved a checkpoint on a preemption notice

for ((index = 0; index < processes; index++)); do
  command=(env JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$devices_per_process"
           "$python" -m grain_jax.main "$@"
           --config.train.multiprocess=True
           --config.train.coordinator_address="127.0.0.1:$port"
           --config.train.num_processes="$processes"
           --config.train.process_id="$index")
  if $dry_run; then
    show "${command[@]}"
  else
    "${command[@]}" &
    pids+=("$!")
  fi
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  finished=""
  process_status=0
  wait -n -p finished "${running[@]}" || process_status=$?
  # A trap interrupts `wait -n` (status above 128, nothing finished): wait again.
  [[ -n "${finished:-}" ]] || continue
  if [[ "$process_status" == "$preempted_status" ]]; then
    status="$preempted_status"
  elif [[ "$process_status" != 0 ]]; then
    status="$process_status"
    echo "a process failed (status $status); stopping the others" >&2
    stop_all
    break
  fi
  for index in "${!running[@]}"; do
    [[ "${running[$index]}" != "$finished" ]] || unset "running[$index]"
  done
done
wait
exit "$status"
