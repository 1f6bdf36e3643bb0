"""Files of a workdir that a run writes whole (config.json, metrics.jsonl): an earlier run's file is
kept under a numbered name, never overwritten, and a rewrite reaches the disk before it replaces one."""

import os


def keep_earlier(path: str) -> str:
  """Renames `path` (`name.ext`) to the first free `name.<n>.ext`, n = 1, 2, ...; returns the new path."""
  stem, ext = os.path.splitext(path)
  number = 1
  while os.path.exists(f"{stem}.{number}{ext}"):
    number += 1
  os.rename(path, f"{stem}.{number}{ext}")
  return f"{stem}.{number}{ext}"


def replace_durably(path: str, text: str) -> None:
  """Writes `text` to `path` atomically: a kill leaves the old file or the new one, and the new one
  is on disk (fsync) before it replaces the old."""
  with open(path + ".tmp", "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)
