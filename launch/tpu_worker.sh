#!/usr/bin/env bash
# The trainer's life on one TPU VM worker; launch/tpu_pod.sh runs it there over ssh:
#
#   launch/tpu_worker.sh start --workdir DIR --run ID -- COMMAND...
#   launch/tpu_worker.sh stop
#   launch/tpu_worker.sh status
#
# start leaves a supervisor running, detached from the ssh session, that runs COMMAND in a process
# group of its own with its output in ~/grain-jax-run/train.log. When COMMAND ends the supervisor
# records its exit status and copies the log to DIR/logs/ID/worker-I.log (I: this worker's index).
# A worker whose trainer fails also writes DIR/logs/ID/worker-I.failed; the supervisors of the other
# workers look for such files every $TPU_WORKER_POLL_SECONDS (default 10) and stop their trainers,
# which would otherwise wait for the dead process in their next collective. DIR must be shared by all
# workers (the bucket).
# A SIGTERM to the supervisor (a maintenance event or spot preemption shuts the VM down so) is passed
# on to the trainer's process group, and the supervisor keeps waiting: the trainer saves a checkpoint
# and exits with status 75, which is not a failure (no worker-I.failed), since the other workers'
# trainers save at the same step and stop as well.
# stop ends the trainer's whole process group (SIGTERM, SIGKILL 30 s later) and frees the TPU:
# processes still holding /dev/accel* or /dev/vfio/*, and /tmp/libtpu_lockfile.
# status prints this worker's line: running, exited with status S, or not started.
# The pid files in ~/grain-jax-run outlive a reboot (a maintenance event), after which their pids may
# belong to unrelated processes: each holds the boot's id and the process's start time as well, and a
# pid is signalled or waited for only while that very process runs.
set -euo pipefail
shopt -s nullglob
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

state="$HOME/grain-jax-run"
poll_seconds="${TPU_WORKER_POLL_SECONDS:-10}"
metadata_url="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
preempted_status=75  # grain_jax.main: saved a checkpoint on a preemption notice

worker_index() {
  local index
  index="$(curl -sf -H Metadata-Flavor:Google "$metadata_url")" ||
    { echo "cannot read this worker's index from the metadata server ($metadata_url)" >&2; exit 1; }
  echo "$index"
}

# Zombies do not count as running: they hold nothing, and whoever adopted them reaps them when it
# gets to it.
alive() {  # alive PID
  local line fields
  { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
  read -r -a fields <<<"${line##*) }"
  [[ "${fields[0]}" != Z ]]
}

# "PID BOOT_ID START_TIME": what tells this process from a later one with the same pid.
identity() {  # identity PID
  local line fields
  { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
  read -r -a fields <<<"${line##*) }"
  echo "$1 $(cat /proc/sys/kernel/random/boot_id) ${fields[19]}"  # field 22 of stat: the start time
}

# The pid recorded in FILE while the process it was recorded for is alive; fails otherwise.
recorded_pid() {  # recorded_pid FILE
  local pid="" rest=""
  { read -r pid rest <"$1"; } 2>/dev/null || true
  [[ "$pid" =~ ^[0-9]+$ && "$(identity "$pid")" == "$pid $rest" ]] && alive "$pid" || return 1
  echo "$pid"
}

group_alive() {  # group_alive PGID
  local stat line fields
  for stat in /proc/[0-9]*/stat; do
    { read -r line <"$stat"; } 2>/dev/null || continue
    read -r -a fields <<<"${line##*) }"
    [[ "${fields[0]}" == Z || "${fields[2]}" != "$1" ]] || return 0
  done
  return 1
}

# SIGTERM first, SIGKILL after 30 s: JAX turns SIGTERM into a preemption notice and may keep running.
stop_group() {
  local group="$1"
  kill -TERM -- "-$group" 2>/dev/null || return 0
  for _ in {1..300}; do
    group_alive "$group" || return 0
    sleep 0.1
  done
  kill -KILL -- "-$group" 2>/dev/null || true
}

# The first other worker's failure file of this run, as "worker K failed (status S)".
peer_failure() {
  local shared="$1" index="$2" file
  for file in "$shared"/worker-*.failed; do
    [[ "$file" != "$shared/worker-$index.failed" ]] || continue
    file="${file##*/worker-}"
    echo "worker ${file%.failed} failed (status $(cat "$shared/worker-$file"))"
    return
  done
}

supervise() {
  local workdir="$1" run="$2" index shared trainer timer status note=""
  shift 2
  index="$(worker_index)"
  shared="$workdir/logs/$run"
  mkdir -p "$shared"
  # setsid: the trainer leads a process group that holds its children too (data loaders), so
  # stopping the group leaves nothing behind on the TPU.
  setsid "$@" >"$state/train.log" 2>&1 </dev/null &
  trainer=$!
  # Whole or not at all: `stop` may read it at any moment.
  identity "$trainer" >"$state/trainer.pid.new"
  mv "$state/trainer.pid.new" "$state/trainer.pid"
  # Bash runs the trap once `wait -n` below returns; the loop then goes on waiting for the trainer.
  trap 'touch "$state/sigterm"; kill -TERM -- "-$trainer" 2>/dev/null || true' TERM
  while :; do
    sleep "$poll_seconds" &
    timer=$!
    wait -n "$trainer" "$timer" || true
    # Not "did wait -n return the trainer": a trainer killed by a signal while this loop was outside
    # wait -n is reaped and reported by bash, which then drops its job, and wait -n only ever returns
    # the timer. `wait PID` still knows the status of a dropped job. (The trainer leads its process
    # group, so its pid is not reused while a child of it lives.)
    if ! alive "$trainer"; then
      kill "$timer" 2>/dev/null || true
      status=0
      wait "$trainer" || status=$?
      break
    fi
    note="$(peer_failure "$shared" "$index")"
    if [[ -n "$note" ]]; then
      stop_group "$trainer"
      status=0
      wait "$trainer" || status=$?
      note="stopped because $note"
      break
    fi
  done
  if [[ -e "$state/stop_requested" ]]; then
    note="stopped by launch/tpu_worker.sh stop"
  elif [[ "$status" == "$preempted_status" && -z "$note" ]]; then
    note="saved a checkpoint on a preemption notice"
    [[ ! -e "$state/sigterm" ]] || note="$note (SIGTERM to this worker)"
  elif [[ "$status" != 0 && -z "$note" ]]; then
    echo "$status" >"$shared/worker-$index.failed"
  fi
  echo "$note" >"$state/note"
  echo "$status" >"$state/status"
  cp "$state/train.log" "$shared/worker-$index.log"
}

start() {
  local workdir="" run=""
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --workdir) workdir="$2"; shift 2 ;;
      --run) run="$2"; shift 2 ;;
      --) shift; break ;;
      *) echo "start: unknown option $1" >&2; exit 2 ;;
    esac
  done
  [[ -n "$workdir" && -n "$run" && $# -gt 0 ]] ||
    { echo "usage: launch/tpu_worker.sh start --workdir DIR --run ID -- COMMAND..." >&2; exit 2; }
  require_local_path --workdir "$workdir"
  if recorded_pid "$state/supervisor.pid" >/dev/null; then
    echo "worker $(worker_index): a trainer is still running; stop it first" >&2
    exit 1
  fi
  rm -rf "$state"
  mkdir -p "$state"
  echo "$run" >"$state/run"
  setsid bash "$0" supervise "$workdir" "$run" "$@" >"$state/supervisor.log" 2>&1 </dev/null &
  identity "$!" >"$state/supervisor.pid.new"
  mv "$state/supervisor.pid.new" "$state/supervisor.pid"
}

stop() {
  local trainer supervisor
  # A supervisor started a moment ago (a worker's `start` just before) records its trainer at once.
  if supervisor="$(recorded_pid "$state/supervisor.pid")"; then
    for _ in {1..50}; do
      [[ ! -e "$state/trainer.pid" ]] || break
      sleep 0.1
    done
  fi
  if trainer="$(recorded_pid "$state/trainer.pid")"; then
    touch "$state/stop_requested"
    stop_group "$trainer"
    # The supervisor records the status and copies the log once the trainer is gone.
    for _ in {1..100}; do
      if [[ -z "$supervisor" ]] || ! alive "$supervisor"; then break; fi
      sleep 0.1
    done
  fi
  local devices=(/dev/accel* /dev/vfio/*)
  if [[ ${#devices[@]} -gt 0 ]]; then
    lsof -t "${devices[@]}" 2>/dev/null | xargs -r kill -KILL || true
  fi
  rm -f /tmp/libtpu_lockfile
}

status() {
  local index run trainer
  index="$(worker_index)"
  if [[ ! -e "$state/run" ]]; then
    echo "worker $index: not started"
    return
  fi
  run="$(cat "$state/run")"
  if [[ -e "$state/status" ]]; then
    local note
    note="$(cat "$state/note")"
    echo "worker $index: exited with status $(cat "$state/status") (run $run)${note:+; $note}"
  elif trainer="$(recorded_pid "$state/trainer.pid")"; then
    echo "worker $index: running (run $run, pid $trainer)"
  else
    echo "worker $index: ended without recording a status (run $run); see $state/supervisor.log"
  fi
}

command_name="${1:-}"
shift || true
case "$command_name" in
  start) start "$@" ;;
  supervise) supervise "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: launch/tpu_worker.sh start|stop|status (got '$command_name')" >&2; exit 2 ;;
esac
