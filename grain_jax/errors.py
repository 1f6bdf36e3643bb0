"""Errors a user causes and can fix, the check that refuses URLs as local paths, and how the command-line
tools report such errors.

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


class BadFileError(UserError, ValueError):
  """An input file is not what it should be: not JSON, not an ArrayRecord or a safetensors file."""


class RemotePathError(UserError, ValueError):
  """A URL (gs://, s3://, ...) where grain-jax needs a path of the local file system."""


# Besides the project's own errors: paths that are missing, not folders, already files, or forbidden.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, FileExistsError, IsADirectoryError,
               PermissionError)


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
    how = (f"mount the bucket (launch/mount_bucket.sh {bucket} mounts it at /gcs/{bucket}) and use "
           f"/gcs/{rest}")
  else:
    how = "mount the storage as a file system and use the mounted path"
  raise RemotePathError(f"{name}={path!r} is a URL, but grain-jax reads and writes this through local paths only "
                        f"(only --workdir may be a gs:// URL): {how}")


def run_command(body: Callable[[], object]) -> int:
  """Runs a command-line tool's `body`; returns 0, or USER_ERROR_STATUS after printing a user error.

  The one place where the tools turn a USER_ERRORS exception into a message (see the module doc).
  """
  try:
    body()
  except USER_ERRORS as error:
    if os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
      raise
    print(f"error: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS
  return 0
