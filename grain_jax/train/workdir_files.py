"""The files of a workdir, a local folder or a bucket's `gs://BUCKET/PATH`: the one place that
opens, writes, lists and renames them (Orbax writes the checkpoints' own files itself, through
tensorstore and etils.epath as well).

Both kinds are read and written with etils.epath (gs:// through gcsfs). What differs is how a write
becomes safe: a local file is written beside its name, fsynced, then renamed over it; an object in a
bucket appears whole, or not at all, once its upload completes, so it is written in place. Either
way a kill leaves the old content or the new, and a file of the run (config.json, metrics.jsonl)
that an earlier run wrote is kept under a numbered name, never overwritten.
"""

import io
import os
from collections.abc import Callable
from typing import IO

import fsspec
from etils import epath
from etils.epath import backend as epath_backend

from grain_jax.errors import RemotePathError, is_url

_BUCKET_URL = "gs://"


def is_bucket(path: str) -> bool:
  """Whether `path` is an object path in a bucket (gs://...) rather than a local one."""
  return path.startswith(_BUCKET_URL)


def check_workdir(path: str, name: str = "--workdir") -> None:
  """Raises RemotePathError for a URL other than gs://BUCKET/PATH (`name`: what to call it)."""
  if is_url(path) and not (is_bucket(path) and path[len(_BUCKET_URL):].split("/", 1)[0]):
    raise RemotePathError(f"{name}={path!r}: a workdir is a local path or a bucket's gs://BUCKET/PATH; mount other "
                          "storage as a file system and use the mounted path")


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


def _bucket(path: str) -> fsspec.AbstractFileSystem:
  """The gcsfs instance etils.epath (and so Orbax) uses: one cache of listings, which its own writes
  and moves keep up to date."""
  return epath_backend.fsspec_backend.fs(path)


def tree_size(directory: str) -> int:
  """Bytes of every file under `directory`."""
  if is_bucket(directory):
    return _bucket(directory).du(directory)
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


def rename(source: str, target: str) -> None:
  """Moves the file or folder `source` to `target`, which must not exist. In a bucket each object is
  copied, then deleted (gcsfs; etils.epath would want `target`'s folder to exist, and a bucket has no
  folders)."""
  if exists(target):
    raise FileExistsError(f"{target} exists: not moving {source} there")
  if is_bucket(source):
    _bucket(source).mv(source, target, recursive=True)
    return
  makedirs(os.path.dirname(target))
  os.rename(source, target)


def remove(path: str) -> None:
  """Deletes the file `path` if it exists."""
  epath.Path(path).unlink(missing_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def replace_durably(path: str, content: str | bytes) -> None:
  """Writes `content` to `path` so that a kill leaves the old file or the new one, and the new one is
  on disk (fsynced) or in the bucket before it replaces the old."""
  mode = "wb" if isinstance(content, bytes) else "w"
  if is_bucket(path):
    with epath.Path(path).open(mode) as f:
      f.write(content)
    return
  makedirs(os.path.dirname(path) or ".")
  with open(path + ".tmp", mode) as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


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


def keep_earlier(path: str) -> str:
  """Renames `path` (`name.ext`) to the first free `name.<n>.ext`, n = 1, 2, ...; returns the new path."""
  stem, ext = os.path.splitext(path)
  number = 1
  while exists(f"{stem}.{number}{ext}"):
    number += 1
  rename(path, f"{stem}.{number}{ext}")
  return f"{stem}.{number}{ext}"
