#!/usr/bin/env bash
# Mounts a Cloud Storage bucket at /gcs/BUCKET with gcsfuse (installed if missing):
#
#   launch/mount_bucket.sh BUCKET
#
# Training reads shards from, and writes checkpoints, logs and results to, plain paths under
# /gcs/BUCKET, so every host of a job sees the same workdir and a re-run resumes from it. The gcsfuse
# options that make a workdir work on the mount are listed, and explained, in launch/lib.sh
# (gcsfuse_workdir_options); launch/gke_xpk.sh mounts the bucket with the same ones. They need
# gcsfuse 2.8.0 or newer: an older one installed here is refused before mounting.
# A file reaches the bucket only when it is closed or fsynced: grain-jax closes metrics.jsonl after
# every row and fsyncs the TensorBoard events at every logged step.
# A freshly booted worker's unattended-upgrades holds the dpkg lock for minutes: apt-get waits for
# it (up to $APT_LOCK_TIMEOUT_SECONDS, default 900) instead of failing.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "$0")/lib.sh"

bucket="${1:?usage: launch/mount_bucket.sh BUCKET}"
bucket="${bucket#gs://}"
mount_point="/gcs/$bucket"

if ! command -v gcsfuse >/dev/null; then
  keyring=/usr/share/keyrings/cloud.google.asc
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  apt_wait=(-o "DPkg::Lock::Timeout=${APT_LOCK_TIMEOUT_SECONDS:-900}")
  sudo apt-get "${apt_wait[@]}" update -qq
  sudo apt-get "${apt_wait[@]}" install -y -qq gcsfuse
fi
version="$(gcsfuse --version)"
if [[ ! "$version" =~ version\ ([0-9]+)\.([0-9]+)\.([0-9]+) ]] ||
  ! printf '%s\n%s\n' "$(gcsfuse_minimum_version)" "${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}" |
  sort -C -V; then
  echo "gcsfuse $(gcsfuse_minimum_version) or newer is needed (its options $(gcsfuse_workdir_options | paste -sd ' ' -)" \
    "are refused by older ones); this one says: $version" >&2
  exit 1
fi
sudo mkdir -p "$mount_point"
sudo chown "$(id -u):$(id -g)" "$mount_point"
mapfile -t options < <(gcsfuse_workdir_options)
mountpoint -q "$mount_point" || gcsfuse "${options[@]/#/--}" "$bucket" "$mount_point"
echo "gs://$bucket is mounted at $mount_point"
