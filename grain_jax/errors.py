"""Errors a user causes and can fix, the checks that refuse URLs as local paths and folders that
cannot be written, and how the command-line tools report such errors.

`python -m grain_jax.main`, `python -m grain_jax.data.convert` and `python -m grain_jax.annotate`
print such an error as one message on stderr and exit with status 2, since a traceback would only hide
what to fix; with GRAIN_JAX_TRACEBACK=1 they raise it, traceback and all.
"""

import os
import re
import sys
from collections.abc import Callable

TRACEBACK_VARIABLE = "GRAIN_JAX_TRACEBACK"
USER_ERROR_STATUS = 2
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class UserError(Exception):
  """Base of the errors whose message tells a user what to change (an argument, a file, the data)."""


class ArgumentError(UserError, ValueError):
  """A command-line argument that cannot work, or an output folder written with other arguments."""


class ConfigError(UserError, ValueError):
  """A config field is unknown, has the wrong type, or holds an impossible value (grain_jax/config/)."""


class BadFileError(UserError, ValueError):
  """An input file is not what it should be: not JSON, not an ArrayRecord or a safetensors file."""


class RemotePathError(UserError, ValueError):
  """A URL (gs://, s3://, ...) where grain-jax needs a path of the local file system."""


# Besides the project's own errors: paths that are missing, not folders, already files, or forbidden.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError)


def is_url(path: str) -> bool:
  """Whether `path` starts with a scheme such as `gs://`."""
  return bool(_URL.match(path))


def check_local_path(path: str, name: str) -> None:
  """Raises RemotePathError when `path` (the value of `name`, for the message) is a URL.

  For the paths other than the workdir (data shards, descriptor files, weights to start from, the
  tools' inputs and outputs): they are read and written with the local file system's calls (Grain's
  ArrayRecord reader among them), where a URL would be taken for a relative folder
  (`./gs:/bucket/...`). A bucket is used through a mount, as the launch scripts do.
  """
  if not is_url(path):
    return
  scheme, _, rest = path.partition("://")
  if scheme == "gs":
    bucket = rest.split("/", 1)[0]
    how = f"mount the bucket (launch/mount_bucket.sh {bucket} mounts it at /gcs/{bucket}) and use /gcs/{rest}"
  else:
    how = "mount the storage as a file system and use the mounted path"
  raise RemotePathError(
    f"{name}={path!r} is a URL, but grain-jax reads and writes this through local paths only "
    f"(only --workdir and --output-dir may be gs:// URLs): {how}"
  )


def check_writable(path: str, name: str, why: str) -> None:
  """Raises ArgumentError when the folder `path` (`name` says what it is, for the message) cannot be
  written (a read-only file system, no permission); `why` says what to do. Nothing is written: a
  folder still missing is judged by the nearest one that exists. A bucket's gs:// path is not judged
  here (a bucket says whether it may be written only to a write): a training run's first write there
  is its lock, which says so in one line (train/workdir_lock.py)."""
  if is_url(path):
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.access(existing, os.W_OK):
    raise ArgumentError(f"{name} {path} cannot be written ({existing} is read-only or not yours): {why}")


def output_dir(given: str, workdir: str, default: str) -> str:
  """Where a command that only reads `workdir` (evaluation, export) writes: `given` (--output-dir),
  else `<workdir>/<default>`. Raises ArgumentError, saying how to name another, when it cannot be
  written (an archived, read-only run)."""
  if given:
    check_writable(given, "--output-dir", "name a folder that can be written")
    return given
  path = os.path.join(workdir, default)
  check_writable(path, "the output folder", "name another with --output-dir (a read-only, archived run, say)")
  return path


def tracebacks_wanted() -> bool:
  """Whether GRAIN_JAX_TRACEBACK asks for tracebacks (any value but "" and "0")."""
  return os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0")


def run_command(body: Callable[[], object]) -> int:
  """Runs a command-line tool's `body`; returns 0, or USER_ERROR_STATUS after printing a user error.

  The one place where the tools turn a USER_ERRORS exception into a message (see the module doc).
  """
  try:
    body()
  except USER_ERRORS as error:
    if tracebacks_wanted():
      raise
    print(f"error: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS
  return 0
