#!/usr/bin/env bash
# Trains on a Cloud TPU slice: one process per host, all started at once, workdir in a bucket.
#
#   launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- --config.FIELD=VALUE ...]
#
# Commands:
#   up      create (or reuse) the slice, stop what still runs there, setup, run
#   create  bring the slice up: reuse it when READY (ACTIVE), wait while it is being created,
#           queued or repaired, delete and recreate it when preempted (SUSPENDED, FAILED for a
#           queued resource); stop with an error on any state it does not know
#   setup   copy the project (or clone --repo at --git-ref) to every worker, in place of the copy
#           there (its .venv is kept), install the pinned requirements with jax[tpu]
#           (launch/install.sh), mount --bucket at /gcs/BUCKET
#   run     start `python -m grain_jax.main --config CONFIG --workdir WORKDIR` on every worker
#           (launch/tpu_worker.sh: one log per worker, copied to WORKDIR/logs/RUN/worker-I.log
#           when it ends; when one worker's trainer fails the others stop; when a worker cannot
#           start, those that did are stopped)
#   logs    follow worker 0's log (--worker N for another)
#   stop    stop the trainers (their whole process groups) and free the TPUs
#   status  the slice's state and each worker's trainer: running, or its exit status
#   delete  delete the slice (or the queued resource)
# Options:
#   --accelerator TYPE   v4-32 | v5litepod-64 | v5p-128 | ... (default v5p-128)
#   --version RUNTIME    TPU software version (default: the one for the accelerator's generation, from
#                        grain_jax/hardware.py)
#   --project ID         gcloud project (default: gcloud's configured one)
#   --spot               spot capacity (can be preempted at any time; `up` again resumes)
#   --preemptible        preemptible TPU VM: the older kind of spot, always stopped after 24 hours
#                        (not with --queued; prefer --spot)
#   --queued             request through queued resources (waits for capacity; running `up`
#                        again while the request is queued waits for it, keeping its place)
#   --bucket BUCKET      mounted at /gcs/BUCKET on every worker
#   --config CONFIG      default configs/cc12m_b16.py:grain,<the accelerator's mesh preset>
#   --workdir DIR        default /gcs/BUCKET/runs/NAME (a local path: gs:// URLs are refused); a re-run
#                        resumes from its newest checkpoint
#   --repo URL --git-ref REF   install from git instead of copying this checkout
#   --max-archive-mb N   refuse to copy a checkout whose files add up to more (default 50)
#   --dry-run            print every command (gcloud and local) instead of running it
# While waiting for the slice, its state is asked every $TPU_POD_POLL_SECONDS (default 60).
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $# -gt 0 ]] || usage
command_name="$1"
shift
name="" zone="" project="" accelerator="v5p-128" version="" capacity=() queued=false bucket=""
config="" workdir="" repo="" git_ref="" worker=0 max_archive_mb=50 dry_run=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --spot) capacity=(--spot); shift ;;
    --preemptible) capacity=(--preemptible); shift ;;
    --queued) queued=true; shift ;;
    --bucket) bucket="${2#gs://}"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --git-ref) git_ref="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --max-archive-mb) max_archive_mb="$2"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
extra_args=("$@")
refuse_dry_run_after_separator "$@"

[[ -n "$name" ]] || { echo "--name is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "--zone is required" >&2; exit 2; }
[[ -z "$repo" || -n "$git_ref" ]] || { echo "--repo needs --git-ref" >&2; exit 2; }
[[ "$max_archive_mb" =~ ^[1-9][0-9]*$ ]] ||
  { echo "--max-archive-mb must be a positive integer, got '$max_archive_mb'" >&2; exit 2; }
[[ "${capacity[*]}" != --preemptible ]] || ! $queued || { echo "--queued takes --spot, not --preemptible" >&2; exit 2; }
# The defaults from the hardware table, read only by the commands that use them.
if [[ -z "$version" && ("$command_name" == up || "$command_name" == create) ]]; then
  version="$(hardware_fact "$accelerator" runtime_version)"
  [[ -n "$version" ]] || { echo "no default --version for --accelerator $accelerator; pass --version" >&2; exit 2; }
fi
if [[ -z "$config" && ("$command_name" == up || "$command_name" == run) ]]; then
  config="$(recipe_config "$accelerator")"
fi
if [[ -z "$workdir" && -n "$bucket" ]]; then
  workdir="/gcs/$bucket/runs/$name"
fi
require_local_path --workdir "$workdir"
# What `run` needs is checked before `up` creates a slice that it could not use.
if [[ "$command_name" == up || "$command_name" == run ]]; then
  [[ -n "$workdir" ]] || { echo "$command_name needs --workdir or --bucket" >&2; exit 2; }
  [[ -n "$config" ]] || { echo "no recipe preset for --accelerator $accelerator; pass --config" >&2; exit 2; }
fi

location=(--zone "$zone")
[[ -z "$project" ]] || location+=(--project "$project")
remote_dir="grain-jax"
poll_seconds="${TPU_POD_POLL_SECONDS:-60}"
if $queued; then kind="queued resource"; else kind="TPU VM"; fi

on_workers() {  # on_workers WORKERS REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker="$1" --command "$2"
}

# The slice's state (READY, PREEMPTED, ...; ACTIVE, SUSPENDED, ... for a queued resource), or
# NOT_FOUND; any other failure of the query is an error. A dry run shows the query and assumes
# a new slice.
slice_state() {
  local query=(gcloud compute tpus tpu-vm describe "$name" "${location[@]}" --format='value(state)')
  $queued && query=(gcloud compute tpus queued-resources describe "$name" "${location[@]}" --format='value(state.state)')
  if $dry_run; then
    run "${query[@]}" >&2
    echo NOT_FOUND
    return
  fi
  local errors state
  errors="$(mktemp)"
  if state="$("${query[@]}" 2>"$errors")"; then
    rm -f "$errors"
    echo "$state"
  elif grep -q NOT_FOUND "$errors"; then
    rm -f "$errors"
    echo NOT_FOUND
  else
    echo "cannot read the state of $kind $name: $(cat "$errors")" >&2
    rm -f "$errors"
    return 1
  fi
}

# What `create` does about a state, after the documented state machines of queued resources
# (QueuedResourceState) and TPU VMs (Node.State): ready, wait, absent (create it), gone
# (preempted or failed: delete, then create), or unknown.
classify() {
  if $queued; then
    case "$1" in
      ACTIVE) echo ready ;;
      CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | SUSPENDING | DELETING) echo wait ;;
      SUSPENDED | FAILED) echo gone ;;
      NOT_FOUND) echo absent ;;
      *) echo unknown ;;
    esac
  else
    case "$1" in
      READY) echo ready ;;
      CREATING | STARTING | RESTARTING | REIMAGING | REPAIRING | STOPPING | DELETING) echo wait ;;
      PREEMPTED | TERMINATED) echo gone ;;
      STOPPED) echo stopped ;;
      NOT_FOUND) echo absent ;;
      *) echo unknown ;;
    esac
  fi
}

request() {
  if $queued; then
    run gcloud compute tpus queued-resources create "$name" "${location[@]}" --node-id "$name" \
      --accelerator-type "$accelerator" --runtime-version "$version" "${capacity[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" "${location[@]}" \
      --accelerator-type "$accelerator" --version "$version" "${capacity[@]}"
  fi
}

delete() {
  if $queued; then
    run gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet
  fi
}

# Waits until the slice is READY (ACTIVE), creating it when absent. A request that is queued or
# being created is never deleted (it would lose its place); a slice that ends up preempted or
# failed after this run created it is an error, not a loop.
create() {
  local state previous="" requested=false
  while :; do
    state="$(slice_state)"
    [[ "$state" == "$previous" ]] || echo "$kind $name: $state" >&2
    previous="$state"
    case "$(classify "$state")" in
      ready) return ;;
      wait) sleep "$poll_seconds" ;;
      absent)
        if $requested; then
          echo "$kind $name disappeared after it was requested" >&2
          exit 1
        fi
        request
        requested=true
        ! $dry_run || return 0
        ;;
      gone)
        if $requested; then
          echo "$kind $name is $state after it was requested; see $(show "${describe_command[@]}")" >&2
          exit 1
        fi
        echo "deleting $name to create it again" >&2
        delete
        ;;
      stopped)
        echo "TPU VM $name is STOPPED (someone stopped it; launch/tpu_pod.sh never does): start it with" \
          "$(show gcloud compute tpus tpu-vm start "$name" "${location[@]}"), or delete it" >&2
        exit 1
        ;;
      *)
        echo "$kind $name is $state, which launch/tpu_pod.sh does not handle; see" \
          "$(show "${describe_command[@]}")" >&2
        exit 1
        ;;
    esac
  done
}

# The files git would commit (tracked, and untracked but not ignored), refused above --max-archive-mb
# before tar compresses any of them.
archive_checkout() {  # archive_checkout PATH
  local archive="$1"
  (
    cd "$(dirname "$0")/.."
    refuse_oversized "$max_archive_mb" --max-archive-mb \
      "add data and run directories to .gitignore, or install with --repo URL --git-ref REF" \
      git ls-files -co --exclude-standard -z
    if $dry_run; then
      echo "git ls-files -co --exclude-standard | tar czf $archive -T -"
    else
      git ls-files -co --exclude-standard | tar czf "$archive" -T -
    fi
  )
}

# The project lands in a new folder that then replaces the old copy, so files deleted from the
# project do not linger there; the environment that launch/install.sh made is moved over.
setup() {
  local fetch new="$remote_dir.new"
  if [[ -n "$repo" ]]; then
    fetch="rm -rf $new && $(show git clone --quiet "$repo" "$new") && $(show git -C "$new" checkout --quiet "$git_ref")"
  else
    # Global: the trap that removes it once copied (or on any failure) runs after setup returns.
    archive="${TMPDIR:-/tmp}/grain-jax-$name.tar.gz"
    trap 'rm -f "$archive"' EXIT
    archive_checkout "$archive"
    run gcloud compute tpus tpu-vm scp "$archive" "$name:grain-jax.tar.gz" "${location[@]}" --worker=all
    fetch="rm -rf $new && mkdir $new && tar xzf grain-jax.tar.gz -C $new"
  fi
  fetch="$fetch && if [ -d $remote_dir/.venv ]; then mv $remote_dir/.venv $new/; fi && rm -rf $remote_dir && mv $new $remote_dir"
  local mount=""
  [[ -z "$bucket" ]] || mount=" && $(show bash launch/mount_bucket.sh "$bucket")"
  on_workers all "$fetch && cd $remote_dir && bash launch/install.sh tpu$mount"
}

# A worker that cannot start (no project there, a trainer still running) would leave the others
# waiting for it in jax.distributed.initialize: those that started are stopped.
start_training() {
  local run_id main_command
  run_id="$(date -u +%Y%m%d-%H%M%S)"
  main_command="$(show .venv/bin/python -m grain_jax.main --config "$config" --workdir "$workdir" "${extra_args[@]}")"
  if ! on_workers all "cd $remote_dir && $(show bash launch/tpu_worker.sh start --workdir "$workdir" --run "$run_id") -- $main_command"; then
    echo "a worker could not start run $run_id (see above); stopping the workers that did" >&2
    stop_training
    exit 1
  fi
  echo "started run $run_id on every worker of $name; follow with: $0 logs --name $name --zone $zone" >&2
}

# A worker that never got the project has nothing to stop.
stop_training() {
  on_workers all "if [ -f $remote_dir/launch/tpu_worker.sh ]; then bash $remote_dir/launch/tpu_worker.sh stop; fi"
}

worker_status() {  # the remote command: the worker's status line, also where setup never ran
  local index_url="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
  echo "if [ -f $remote_dir/launch/tpu_worker.sh ]; then bash $remote_dir/launch/tpu_worker.sh status;" \
    "else echo \"worker \$(curl -sf -H Metadata-Flavor:Google $index_url): no $remote_dir/launch/tpu_worker.sh" \
    "(setup has not run here)\"; fi"
}

status() {
  local state
  state="$(slice_state)"
  echo "$kind $name: $state"
  [[ "$(classify "$state")" == ready ]] || return 0
  on_workers all "$(worker_status)"
}

describe_command=(gcloud compute tpus tpu-vm describe "$name" "${location[@]}")
$queued && describe_command=(gcloud compute tpus queued-resources describe "$name" "${location[@]}")

case "$command_name" in
  up) create; stop_training; setup; start_training ;;
  create) create ;;
  setup) setup ;;
  run) start_training ;;
  logs) on_workers "$worker" "tail -n 200 -F ~/grain-jax-run/train.log" ;;
  stop) stop_training ;;
  delete) delete ;;
  status) status ;;
  *) echo "unknown command: $command_name" >&2; usage ;;
esac
