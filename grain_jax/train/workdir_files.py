"""The workdir and the files a run writes whole in it (config.json, metrics.jsonl).

An earlier run's file is kept under a numbered name, never overwritten (a rewrite goes through
`files.replace_durably`). A workdir that a run made and left empty when it failed (a config
error, another run holding it) is removed again: a failed run leaves no folder to mistake for a run.
"""

import contextlib
import os
import shutil


def keep_earlier(path: str) -> str:
  """Renames `path` (`name.ext`) to the first free `name.<n>.ext`, n = 1, 2, ...; returns the new path."""
  stem, ext = os.path.splitext(path)
  number = 1
  while os.path.exists(f"{stem}.{number}{ext}"):
    number += 1
  os.rename(path, f"{stem}.{number}{ext}")
  return f"{stem}.{number}{ext}"


@contextlib.contextmanager
def created(path: str):
  """Makes the folder `path` (and missing parents) for the body; when the body raises, the folders
  this call made that hold no file (empty folders at most, such as an empty `checkpoints/`) are
  removed again."""
  made, missing = [], os.path.abspath(path)
  while not os.path.isdir(missing):
    made.append(missing)
    missing = os.path.dirname(missing)
  os.makedirs(path, exist_ok=True)
  try:
    yield
  except BaseException:
    for folder in made:  # the deepest first
      if any(files for _, _, files in os.walk(folder)):
        break  # it holds work
      shutil.rmtree(folder, ignore_errors=True)  # another process may have removed it
    raise
