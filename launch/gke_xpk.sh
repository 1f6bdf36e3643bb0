#!/usr/bin/env bash
# Trains on a TPU slice of a GKE cluster through xpk (a JobSet queued by Kueue), the way MaxText
# launches and where Google documents its newest TPU generation (Ironwood, TPU7x). Needs xpk
# (`pip install xpk`) with gcloud, kubectl and docker.
#
#   launch/gke_xpk.sh COMMAND --cluster CLUSTER --zone ZONE [options] [-- --config.FIELD=VALUE ...]
#
# Commands:
#   cluster         create the cluster with --accelerator TPU nodes and attach --bucket, mounted at
#                   /gcs/BUCKET in every pod by gcsfuse with launch/mount_bucket.sh's options (xpk 0.9.0
#                   or later)
#   run             submit the workload: xpk adds this checkout (less what .dockerignore names: data,
#                   runs, environments) at /app to --base-image, the image of the dependencies built
#                   from launch/Dockerfile, and every pod runs
#                   `python -m grain_jax.main --config CONFIG --workdir WORKDIR` there: nothing is
#                   installed when a pod starts or restarts
#   status          list the workload and its state
#   delete          delete the workload
#   delete-cluster  delete the cluster
# Options:
#   --name NAME          the workload (default grain)
#   --accelerator TYPE   v4-32 | v5litepod-64 | v5p-128 | ... (default v5p-128)
#   --project ID         gcloud project (default: gcloud's configured one)
#   --spot | --flex | --reservation NAME   the cluster's capacity (default on demand)
#   --bucket BUCKET      mounted at /gcs/BUCKET in every pod
#   --config CONFIG      default configs/cc12m_b16.py:grain,<the accelerator's mesh preset>
#   --workdir DIR        default /gcs/BUCKET/runs/NAME (the mount); gs://BUCKET/PATH is written by the
#                        trainer itself. A restarted or re-submitted workload resumes from its newest
#                        checkpoint
#   --base-image IMAGE   required by run: the image built from launch/Dockerfile and pushed (see
#                        docs/scale_and_launch.md)
#   --max-restarts N     times the JobSet restarts after a failure or preemption (default 10). xpk
#                        restarts on exit statuses 42 and 127-255 only; 1 (a crash) and 75 (saved a
#                        checkpoint on SIGTERM) are added, 2 (a user error, the same on every try) is not
#   --grace-seconds N    how long a pod may take to save after SIGTERM before it is killed (default
#                        300); xpk's wrapper passes SIGTERM on up to 5 s late
#   --max-archive-mb N   refuse to build an image from a checkout whose files (less what .dockerignore
#                        names) add up to more (default 50)
#   --dry-run            print the xpk commands instead of running them
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $# -gt 0 ]] || usage
command_name="$1"
shift
cluster="" zone="" project="" name="grain" accelerator="v5p-128" capacity=(--on-demand) bucket=""
config="" workdir="" base_image="" max_restarts=10 grace_seconds=300 max_archive_mb=50 dry_run=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) cluster="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --accelerator) accelerator="$2"; shift 2 ;;
    --spot | --flex) capacity=("$1"); shift ;;
    --reservation) capacity=("--reservation=$2"); shift 2 ;;
    --bucket) bucket="${2#gs://}"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --base-image) base_image="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --grace-seconds) grace_seconds="$2"; shift 2 ;;
    --max-archive-mb) max_archive_mb="$2"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    --) shift; break ;;
    *) echo "unknown option: $1" >&2; usage ;;
  esac
done
extra_args=("$@")
refuse_dry_run_after_separator "$@"

[[ -n "$cluster" ]] || { echo "--cluster is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "--zone is required" >&2; exit 2; }
[[ "$max_restarts" =~ ^[0-9]+$ ]] || { echo "--max-restarts must be a whole number, got '$max_restarts'" >&2; exit 2; }
[[ "$grace_seconds" =~ ^[1-9][0-9]*$ ]] ||
  { echo "--grace-seconds must be a positive integer, got '$grace_seconds'" >&2; exit 2; }
[[ "$max_archive_mb" =~ ^[1-9][0-9]*$ ]] ||
  { echo "--max-archive-mb must be a positive integer, got '$max_archive_mb'" >&2; exit 2; }
if [[ -z "$workdir" && -n "$bucket" ]]; then
  workdir="/gcs/$bucket/runs/$name"
fi

cd "$(dirname "$0")/.."
location=(--cluster "$cluster" --zone "$zone")
[[ -z "$project" ]] || location+=(--project "$project")

# xpk names the storage's Kubernetes objects after it: lowercase letters, digits and '-', at most 63
# characters, where a bucket name may also hold '_' and '.'.
storage_name() {
  local storage="${bucket,,}"
  storage="${storage//[_.]/-}"
  storage="${storage:0:63}"
  while [[ "$storage" == *- ]]; do storage="${storage%-}"; done
  echo "$storage"
}

create_cluster() {
  run xpk cluster create "${location[@]}" --tpu-type "$accelerator" --num-slices 1 "${capacity[@]}"
  [[ -n "$bucket" ]] || return 0
  local options
  options="$(gcsfuse_workdir_options | paste -sd , -)"
  # --mount-options replaces xpk's own (implicit-dirs) rather than adding to them. Prefetching the
  # bucket's metadata at mount would only fill the cache these options turn off.
  run xpk storage attach "$(storage_name)" --type gcsfuse --bucket "$bucket" "${location[@]}" \
    --mount-point "/gcs/$bucket" --readonly false --auto-mount true --size 1 \
    --mount-options "$options" --no-prefetch-metadata
}

submit() {
  [[ -n "$workdir" ]] || { echo "run needs --workdir or --bucket" >&2; exit 2; }
  [[ -n "$config" ]] || config="$(recipe_config "$accelerator")"
  [[ -n "$config" ]] || { echo "no recipe preset for --accelerator $accelerator; pass --config" >&2; exit 2; }
  [[ -n "$base_image" ]] ||
    { echo "run needs --base-image: the image built from launch/Dockerfile (see docs/scale_and_launch.md)" >&2; exit 2; }
  local main_command
  main_command="$(show python -m grain_jax.main --config "$config" --workdir "$workdir" "${extra_args[@]}")"
  # The image holds what docker's build context does: everything but what .dockerignore names (read
  # here by git, which matches a bare name such as `runs` at any depth where docker only matches it
  # at the top).
  refuse_oversized "$max_archive_mb" --max-archive-mb "add data and run directories to .dockerignore" \
    git ls-files -co --exclude-from=.dockerignore -z
  # exec: the trainer replaces the subshell xpk runs the command in, so the SIGTERM that xpk's
  # wrapper passes on to that subshell reaches Python (JAX takes it as a preemption notice).
  run xpk workload create "${location[@]}" --workload "$name" --tpu-type "$accelerator" --num-slices 1 \
    --base-docker-image "$base_image" --script-dir "$PWD" --max-restarts "$max_restarts" \
    --restart-on-exit-codes 1,75 --termination-grace-period-seconds "$grace_seconds" \
    --command "exec $main_command"
}

case "$command_name" in
  cluster) create_cluster ;;
  run) submit ;;
  status) run xpk workload list "${location[@]}" --filter-by-job "$name" ;;
  delete) run xpk workload delete "${location[@]}" --workload "$name" ;;
  delete-cluster) run xpk cluster delete "${location[@]}" ;;
  *) echo "unknown command: $command_name" >&2; usage ;;
esac
