# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): `run` executes a command, or with
# dry_run=true prints it as one shell-quoted line (the tests parse these lines).

# Exits with status 2 unless this is bash MAJOR.MINOR or newer. It runs before any newer feature
# does: macOS ships bash 3.2, where `${x@Q}`, `${x,,}` and empty arrays under `set -u` fail with
# "bad substitution" or "unbound variable" halfway through a launch.
require_bash() {  # require_bash MAJOR MINOR
  if ((BASH_VERSINFO[0] < $1 || (BASH_VERSINFO[0] == $1 && BASH_VERSINFO[1] < $2))); then
    echo "$0 needs bash $1.$2 or newer, and this is bash $BASH_VERSION ($BASH). Install a newer bash" \
      "(macOS: brew install bash) and run the script with it: /path/to/new/bash $0 ..." >&2
    exit 2
  fi
}
# Scripts that need more set bash_major and bash_minor before sourcing this file.
require_bash "${bash_major:-4}" "${bash_minor:-4}"

# The command as one line; only words with shell-special characters are quoted.
show() {
  local words=() word
  for word in "$@"; do
    if [[ "$word" =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$word")
    else
      words+=("${word@Q}")
    fi
  done
  echo "${words[*]}"
}

run() {
  if [[ "${dry_run:-false}" == true ]]; then
    show "$@"
  else
    "$@"
  fi
}

# Prints the script's leading comment block (its documentation) and exits with status 2.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}

# Exits with status 1 when the files that COMMAND lists (NUL-separated, relative to the current
# directory) add up to more than LIMIT_MB megabytes, naming the largest and printing HINT. It runs
# before anything is archived or built, so that a data folder left in the checkout is refused without
# being compressed first. Counting reads at most LIMIT_MB MB + 1 byte of the files: portable (no GNU
# stat), and as quick for a million images as for a few sources.
refuse_oversized() {  # refuse_oversized LIMIT_MB OPTION HINT COMMAND...
  local limit_mb="$1" option="$2" hint="$3" size
  shift 3
  # cat and xargs die of SIGPIPE once head has its bytes; that ends the count, it is no error.
  size="$({ "$@" | xargs -0 cat -- 2>/dev/null || true; } | head -c "$((limit_mb * 1000000 + 1))" | wc -c)"
  ((size > limit_mb * 1000000)) || return 0
  echo "the files to send add up to more than $option $limit_mb MB; the largest (KB):" >&2
  # sed reads all of sort's output (head would stop early and kill sort with SIGPIPE).
  { "$@" | xargs -0 du -k -- | sort -rn | sed -n 1,5p >&2; } || true
  echo "$hint" >&2
  exit 1
}

# Exits with status 2 when DIR is a URL (gs://...). launch/tpu_worker.sh shares each run's logs and
# failure files through the file system, so on TPU VMs the workdir is the bucket's mount
# (/gcs/BUCKET/...); `mkdir -p gs://b` would make a local `gs:` folder. (grain_jax.main itself takes
# gs:// workdirs, as launch/gke_xpk.sh passes them.)
require_local_path() {  # require_local_path OPTION DIR
  [[ "$2" != *://* ]] && return 0
  echo "$1 $2: a URL; give the bucket's mount such as /gcs/BUCKET/... (the workers share their logs and" \
    "failure files through the file system)" >&2
  exit 2
}

# Exits with status 2 when ARGS (the arguments after `--`, for grain_jax.main) hold --dry-run: it
# belongs before `--`, and after it the launcher would run everything for real.
refuse_dry_run_after_separator() {  # refuse_dry_run_after_separator ARGS...
  local arg
  for arg in "$@"; do
    [[ "$arg" != --dry-run ]] || {
      echo "--dry-run after -- would go to grain_jax.main and the commands would run for real; put it before --" >&2
      exit 2
    }
  done
}

# The checkout's root, found while this file is sourced: the scripts may cd before they ask.
checkout_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# FIELD (mesh_preset, runtime_version) of a Cloud TPU accelerator type from the hardware table,
# grain_jax/hardware.py; an empty line where the table has none. The table needs only the standard
# library, so any python3 reads it: $PYTHON, default python3. Exits with status 1 when it cannot.
hardware_fact() {  # hardware_fact ACCELERATOR FIELD
  local python="${PYTHON:-python3}"
  (cd "$checkout_root" && "$python" -m grain_jax.hardware "$1" "$2") || {
    echo "$python could not read $2 of $1 from grain_jax/hardware.py; set PYTHON to a python3 (3.7 or newer)" >&2
    exit 1
  }
}

# The recipe preset for a slice type, the default of --config (nothing for types without a preset).
recipe_config() {  # recipe_config ACCELERATOR
  local preset
  preset="$(hardware_fact "$1" mesh_preset)" || return
  [[ -z "$preset" ]] || echo "configs/cc12m_b16.py:grain,$preset"
}

# The gcsfuse options that make a workdir work on the bucket's mount, one a line, without their
# leading "--". launch/mount_bucket.sh passes them to gcsfuse; launch/gke_xpk.sh gives them to GKE's
# Cloud Storage FUSE CSI driver as the volume's mountOptions, and the driver passes an option NAME or
# NAME=VALUE on to gcsfuse as --NAME or --NAME=VALUE, so both mounts run gcsfuse with the same flags.
# gcsfuse refuses a flag it does not know and the bucket then does not mount: the last two need
# gcsfuse 2.8.0 or newer, where both were added (gcsfuse_minimum_version).
#  rename-dir-limit: Orbax commits a checkpoint by renaming its temporary folder. On a bucket
#    without hierarchical namespace gcsfuse renames a folder object by object, and only one with
#    fewer objects than this limit; its default, 0, refuses every folder rename.
#  metadata-cache-ttl-secs=0, metadata-cache-negative-ttl-secs=0: every host sees at once the files
#    the others write (checkpoint parts, a worker's failure file); with a cache a host may see a
#    folder as it was earlier.
#  implicit-dirs: folders that only exist as prefixes of objects (the shards copied with
#    `gcloud storage cp -r`) are seen.
#  enable-streaming-writes=false: with streaming writes (the default since gcsfuse 3.0) a new file
#    reaches the bucket only when it is closed, fsync no longer uploads it; the TensorBoard events
#    stay open the whole run and are fsynced at every logged step.
gcsfuse_minimum_version() { echo 2.8.0; }
gcsfuse_workdir_options() {
  printf '%s\n' implicit-dirs rename-dir-limit=200000 metadata-cache-ttl-secs=0 enable-streaming-writes=false \
    metadata-cache-negative-ttl-secs=0
}
