"""The files of a run, in a local folder or in a bucket's `gs://BUCKET/PATH`: the one place that
opens, writes, lists, renames and removes them (Orbax writes the checkpoints' own files itself,
through tensorstore and etils.epath as well).

Both kinds are read and written with etils.epath (gs:// through gcsfs). What differs is how a write
becomes whole: a local file is written to a temporary file of this process beside its name,
fsynced, then renamed over it; an object in a bucket appears whole, or not at all, once its upload
completes, so it is written in place. Either way a kill, a full disk or another process writing the
same file too (an evaluation beside a trainer) leaves one complete version under its name, never a
part. A bucket has no folders: nothing makes one, and a "folder" is the objects under its prefix.
"""

import io
import json
import os
import shutil
from collections.abc import Callable
from typing import IO

from etils import epath
from etils.epath import backend as epath_backend

from grain_jax.errors import RemotePathError, is_url

_BUCKET_URL = "gs://"


def is_bucket(path: str) -> bool:
  """Whether `path` is an object path in a bucket (gs://...) rather than a local one."""
  return path.startswith(_BUCKET_URL)


def check_location(path: str, name: str) -> None:
  """Raises RemotePathError for a URL other than gs://BUCKET/PATH (`name`: what to call `path`, such as
  --workdir or --output-dir)."""
  if is_url(path) and not (is_bucket(path) and path[len(_BUCKET_URL) :].split("/", 1)[0]):
    raise RemotePathError(
      f"{name}={path!r}: it must be a local path or a bucket's gs://BUCKET/PATH; mount other "
      "storage as a file system and use the mounted path"
    )


def absolute(path: str) -> str:
  """`path` made absolute (a gs:// path already is)."""
  return path if is_bucket(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
  """Creates the folder `path` and its parents (a bucket has no folders: nothing to do there)."""
  if not is_bucket(path):
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  return sorted(child.name for child in epath.Path(path).iterdir())


def size(path: str) -> int:
  """Bytes of the file `path`."""
  return epath.Path(path).stat().length


def bucket_filesystem(path: str):
  """The gcsfs file system (fsspec's) that etils.epath, and so Orbax, uses for the gs:// `path`: one
  cache of listings, which its own writes and moves keep up to date."""
  return epath_backend.fsspec_backend.fs(path)


def tree_size(directory: str) -> int:
  """Bytes of every file under `directory`."""
  if is_bucket(directory):
    return bucket_filesystem(directory).du(directory)
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def rename(source: str, target: str) -> None:
  """Moves the file or folder `source` to `target`, which must not exist. In a bucket each object is
  copied, then deleted (gcsfs; etils.epath would want `target`'s folder to exist, and a bucket has no
  folders)."""
  if exists(target):
    raise FileExistsError(f"{target} exists: not moving {source} there")
  if is_bucket(source):
    bucket_filesystem(source).mv(source, target, recursive=True)
    return
  makedirs(os.path.dirname(target))
  os.rename(source, target)


def remove(path: str) -> None:
  """Deletes the file `path` if it exists."""
  epath.Path(path).unlink(missing_ok=True)


def remove_tree(directory: str) -> None:
  """Deletes the folder `directory` and everything under it (in a bucket: every object under it)."""
  if is_bucket(directory):
    bucket_filesystem(directory).rm(directory, recursive=True)
  else:
    shutil.rmtree(directory)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def replace_durably(path: str, content: str | bytes) -> None:
  """Writes `content` to `path` atomically: a kill leaves the old file or the new one, and the new one
  is on disk (fsync) or in the bucket before it replaces the old. A local file's temporary file is
  this process's own, so two processes writing the same file (an evaluation beside a trainer) leave
  one whole version; an object is replaced whole by its upload. A missing local folder is made."""
  mode = "wb" if isinstance(content, bytes) else "w"
  if is_bucket(path):
    with epath.Path(path).open(mode) as f:
      f.write(content)
    return
  makedirs(os.path.dirname(path) or ".")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, mode) as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_through(path: str, write: Callable[[IO[bytes]], object]) -> None:
  """Writes what `write(file)` writes into a file object (PIL, numpy, torch) to `path` as
  `replace_durably` does."""
  content = io.BytesIO()
  write(content)
  replace_durably(path, content.getvalue())


def append_line(path: str, line: str) -> None:
  """Appends `line` (ending with a newline) to the text file `path` and closes it, so that the line is
  on disk or in the bucket when this returns: a bucket's objects are rewritten whole, and a gcsfuse
  mount uploads a file when it is closed."""
  if is_bucket(path):
    replace_durably(path, (read_text(path) if exists(path) else "") + line)
    return
  with open(path, "a") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def read_object(path: str) -> tuple[bytes, str]:
  """The content of the object gs://`path` and its generation (the number GCS gives each version of
  an object), read together. Raises FileNotFoundError when there is none."""
  filesystem = bucket_filesystem(path)
  headers, content = filesystem.call("GET", "b/{}/o/{}", *filesystem.split_path(path)[:2], alt="media")
  return content, headers["X-Goog-Generation"]


def write_object(path: str, content: bytes, if_generation: str) -> str:
  """Writes the object gs://`path` only if its generation is `if_generation` ("0": only if there is
  none), in one request that GCS carries out or refuses whole; returns the new generation. Raises
  FileExistsError when GCS refuses (another version is there)."""
  filesystem = bucket_filesystem(path)
  bucket, key = filesystem.split_path(path)[:2]
  body = b"".join(
    [
      b"--==0==\nContent-Type: application/json; charset=UTF-8\n\n",
      json.dumps({"name": key}).encode(),
      b"\n--==0==\nContent-Type: application/octet-stream\n\n",
      content,
      b"\n--==0==--",
    ]
  )
  written = filesystem.call(
    "POST",
    f"{filesystem._location}/upload/storage/v1/b/{{}}/o",
    bucket,
    uploadType="multipart",
    ifGenerationMatch=if_generation,
    headers={"Content-Type": 'multipart/related; boundary="==0=="'},
    data=body,
    json_out=True,
  )
  filesystem.invalidate_cache(path)
  return str(written["generation"])


def remove_object(path: str, if_generation: str) -> None:
  """Deletes the object gs://`path` if its generation is still `if_generation` (FileExistsError when
  it is not, FileNotFoundError when it is gone)."""
  filesystem = bucket_filesystem(path)
  filesystem.call("DELETE", "b/{}/o/{}", *filesystem.split_path(path)[:2], ifGenerationMatch=if_generation)
  filesystem.invalidate_cache(path)


def keep_earlier(path: str) -> str:
  """Renames `path` (`name.ext`) to the first free `name.<n>.ext`, n = 1, 2, ...; returns the new path."""
  stem, ext = os.path.splitext(path)
  number = 1
  while exists(f"{stem}.{number}{ext}"):
    number += 1
  rename(path, f"{stem}.{number}{ext}")
  return f"{stem}.{number}{ext}"
