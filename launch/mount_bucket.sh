#!/usr/bin/env bash
# Mounts a Cloud Storage bucket at /gcs/BUCKET with gcsfuse (installed if missing):
#
#   launch/mount_bucket.sh BUCKET
#
# Training reads shards from, and writes checkpoints, logs and results to, plain paths under
# /gcs/BUCKET, so every host of a job sees the same workdir and a re-run resumes from it.
set -euo pipefail

bucket="${1:?usage: launch/mount_bucket.sh BUCKET}"
bucket="${bucket#gs://}"
mount_point="/gcs/$bucket"

if ! command -v gcsfuse >/dev/null; then
  keyring=/usr/share/keyrings/cloud.google.asc
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "$keyring" >/dev/null
  echo "deb [signed-by=$keyring] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq
  sudo apt-get install -y -qq gcsfuse
fi
sudo mkdir -p "$mount_point"
sudo chown "$(id -u):$(id -g)" "$mount_point"
mountpoint -q "$mount_point" || gcsfuse --implicit-dirs "$bucket" "$mount_point"
echo "gs://$bucket is mounted at $mount_point"
