"""The workdir of a training run, a local folder or a bucket's `gs://BUCKET/PATH` (its files are read
and written through `grain_jax.files`).

A workdir that a run made and left empty when it failed (a config error, another run holding it) is
removed again: a failed run leaves no folder to mistake for a run. In a bucket there is nothing to
make or remove: a gs:// workdir exists once the run writes its first object there.
"""

import contextlib
import os
import shutil

from grain_jax import files


@contextlib.contextmanager
def created(path: str):
  """Makes the folder `path` (and missing parents) for the body; when the body raises, the folders
  this call made that hold no file (empty folders at most, such as an empty `checkpoints/`) are
  removed again. A gs:// `path` needs no folder: the body runs as it is."""
  if files.is_bucket(path):
    yield
    return
  made, missing = [], os.path.abspath(path)
  while not os.path.isdir(missing):
    made.append(missing)
    missing = os.path.dirname(missing)
  os.makedirs(path, exist_ok=True)
  try:
    yield
  except BaseException:
    for folder in made:  # the deepest first
      if any(names for _, _, names in os.walk(folder)):
        break  # it holds work
      shutil.rmtree(folder, ignore_errors=True)  # another process may have removed it
    raise
