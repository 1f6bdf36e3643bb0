#!/usr/bin/env bash
# Mounts a Cloud Storage bucket at /gcs/BUCKET with gcsfuse (installed if missing):
#
#   launch/mount_bucket.sh BUCKET
#
# Training reads shards from, and writes checkpoints, logs and results to, plain paths under
# /gcs/BUCKET, so every host of a job sees the same workdir and a re-run resumes from it.
# The options make a workdir work on the mount:
#  --rename-dir-limit: Orbax commits a checkpoint by renaming its temporary folder. On a bucket
#    without hierarchical namespace gcsfuse renames a folder object by object, and only one with
#    fewer objects than this limit; its default, 0, refuses every folder rename.
#  --metadata-cache-ttl-secs=0, --metadata-cache-negative-ttl-secs=0: every host sees at once the
#    files the others write (checkpoint parts, a worker's failure file); with a cache a host may see
#    a folder as it was earlier.
#  --implicit-dirs: folders that only exist as prefixes of objects (the shards copied with
#    `gcloud storage cp -r`) are seen.
# A file reaches the bucket only when it is closed or fsynced: grain-jax fsyncs metrics.jsonl and
# the TensorBoard events at every logged step.
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
mountpoint -q "$mount_point" ||
  gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 \
    --metadata-cache-negative-ttl-secs=0 "$bucket" "$mount_point"
echo "gs://$bucket is mounted at $mount_point"
