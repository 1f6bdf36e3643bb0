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


def replace_durably(path: str, content: str | bytes) -> None:
  """Writes `content` to `path` atomically: a kill leaves the old file or the new one, and the new one
  is on disk (fsync) before it replaces the old. The temporary file is this process's own, so two
  processes writing the same file (an evaluation beside a trainer) leave one whole version."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
