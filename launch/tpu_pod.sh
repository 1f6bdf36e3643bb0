#!/usr/bin/env bash
# Trains on a Cloud TPU slice: one process per host, all started at once, workdir in a bucket.
#
#   launch/tpu_pod.sh COMMAND --name NAME --zone ZONE [options] [-- --config.FIELD=VALUE ...]
#
# Commands:
#   up      create the slice (or reuse it when READY; recreate it when preempted), stop what
#           still runs there, setup, run
#   create  create the slice (a TPU VM, or a queued resource with --queued)
#   setup   copy the project (or clone --repo at --git-ref) to every worker, install the pinned
#           requirements with jax[tpu] (launch/install.sh), mount --bucket at /gcs/BUCKET
#   run     start `python -m grain_jax.main --config CONFIG --workdir WORKDIR` on every worker
#   logs    follow worker 0's log (--worker N for another)
#   stop    stop the training processes
#   delete  delete the slice (or the queued resource)
#   status  describe the slice
# Options:
#   --accelerator TYPE   v4-32 | v5litepod-64 | v5p-128 | ... (default v5p-128)
#   --version RUNTIME    TPU software version (default: the one for the accelerator's generation)
#   --project ID         gcloud project (default: gcloud's configured one)
#   --spot               spot capacity (can be preempted at any time; `up` again resumes)
#   --preemptible        preemptible TPU VM (the older kind of spot; not with --queued)
#   --queued             request through queued resources (waits for capacity)
#   --bucket BUCKET      mounted at /gcs/BUCKET on every worker
#   --config SPEC        default configs/cc12m_b16.py:grain,<the accelerator's mesh preset>
#   --workdir DIR        default /gcs/BUCKET/runs/NAME; a re-run resumes from its newest checkpoint
#   --repo URL --git-ref REF   install from git instead of copying this checkout
#   --dry-run            print every command (gcloud and local) instead of running it
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $# -gt 0 ]] || usage
command_name="$1"
shift
name="" zone="" project="" accelerator="v5p-128" version="" capacity=() queued=false bucket=""
config="" workdir="" repo="" git_ref="" worker=0 dry_run=false
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
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
extra_args=("$@")

[[ -n "$name" ]] || { echo "--name is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "--zone is required" >&2; exit 2; }
[[ -z "$repo" || -n "$git_ref" ]] || { echo "--repo needs --git-ref" >&2; exit 2; }
[[ "${capacity[*]}" != --preemptible ]] || ! $queued || { echo "--queued takes --spot, not --preemptible" >&2; exit 2; }
if [[ -z "$version" ]]; then
  case "$accelerator" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) echo "no default --version for --accelerator $accelerator; pass --version" >&2; exit 2 ;;
  esac
fi
if [[ -z "$config" ]]; then
  case "$accelerator" in
    v4-32) config="configs/cc12m_b16.py:grain,tpu_v4_32" ;;
    v5litepod-64) config="configs/cc12m_b16.py:grain,tpu_v5e_64" ;;
    v5p-128) config="configs/cc12m_b16.py:grain,tpu_v5p_128" ;;
  esac
fi
if [[ -z "$workdir" && -n "$bucket" ]]; then
  workdir="/gcs/$bucket/runs/$name"
fi

location=(--zone "$zone")
[[ -z "$project" ]] || location+=(--project "$project")
remote_dir="grain-jax"
log_file="grain-jax-train.log"
pid_file="grain-jax-train.pid"

on_workers() {  # on_workers WORKERS REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker="$1" --command "$2"
}

# The slice's state (READY, PREEMPTED, ...; ACTIVE, FAILED, ... for a queued resource), or
# NOT_FOUND. A dry run shows the query and assumes a new slice.
slice_state() {
  local query=(gcloud compute tpus tpu-vm describe "$name" "${location[@]}" --format='value(state)')
  $queued && query=(gcloud compute tpus queued-resources describe "$name" "${location[@]}" --format='value(state.state)')
  if $dry_run; then
    run "${query[@]}" >&2
    echo NOT_FOUND
  else
    "${query[@]}" 2>/dev/null || echo NOT_FOUND
  fi
}

create() {
  if $queued; then
    run gcloud compute tpus queued-resources create "$name" "${location[@]}" --node-id "$name" \
      --accelerator-type "$accelerator" --runtime-version "$version" "${capacity[@]}"
    $dry_run && return
    echo "waiting for queued resource $name to become ACTIVE" >&2
    until [[ "$(slice_state)" == ACTIVE ]]; do
      sleep 60
    done
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

# Reuses a healthy slice; a preempted or failed one is deleted and created again.
create_or_reuse() {
  local state
  state="$(slice_state)"
  case "$state" in
    READY | ACTIVE) echo "reusing $name ($state)" >&2 ;;
    NOT_FOUND) create ;;
    *) echo "$name is $state: deleting and creating it again" >&2; delete; create ;;
  esac
}

setup() {
  local fetch
  if [[ -n "$repo" ]]; then
    fetch="rm -rf $remote_dir && $(show git clone --quiet "$repo" "$remote_dir") && $(show git -C "$remote_dir" checkout --quiet "$git_ref")"
  else
    local archive
    archive="${TMPDIR:-/tmp}/grain-jax-$name.tar.gz"
    if $dry_run; then
      echo "git ls-files -co --exclude-standard | tar czf $archive -T -"
    else
      (cd "$(dirname "$0")/.." && git ls-files -co --exclude-standard | tar czf "$archive" -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$name:grain-jax.tar.gz" "${location[@]}" --worker=all
    fetch="mkdir -p $remote_dir && tar xzf grain-jax.tar.gz -C $remote_dir"
  fi
  local mount=""
  [[ -z "$bucket" ]] || mount=" && $(show bash launch/mount_bucket.sh "$bucket")"
  on_workers all "$fetch && cd $remote_dir && bash launch/install.sh tpu$mount"
}

start_training() {
  [[ -n "$workdir" ]] || { echo "run needs --workdir or --bucket" >&2; exit 2; }
  [[ -n "$config" ]] || { echo "no recipe preset for --accelerator $accelerator; pass --config" >&2; exit 2; }
  local main_command
  main_command="$(show .venv/bin/python -m grain_jax.main --config "$config" --workdir "$workdir" "${extra_args[@]}")"
  on_workers all "cd $remote_dir && nohup $main_command > ~/$log_file 2>&1 < /dev/null & echo \$! > ~/$pid_file"
  echo "started on every worker of $name; follow with: $0 logs --name $name --zone $zone" >&2
}

stop_training() {
  # JAX turns SIGTERM into a preemption notice and may keep running: SIGKILL after 30 s.
  on_workers all "pid=\$(cat ~/$pid_file 2>/dev/null); [ -z \"\$pid\" ] || { kill \$pid; \
for _ in \$(seq 30); do kill -0 \$pid || break; sleep 1; done; kill -9 \$pid; } 2>/dev/null; true"
}

case "$command_name" in
  up) create_or_reuse; stop_training; setup; start_training ;;
  create) create ;;
  setup) setup ;;
  run) start_training ;;
  logs) on_workers "$worker" "tail -n 200 -F ~/$log_file" ;;
  stop) stop_training ;;
  delete) delete ;;
  status) slice_state ;;
  *) echo "unknown command: $command_name" >&2; usage ;;
esac
