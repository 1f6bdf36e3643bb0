"""Writing a file whole: a kill, a full disk or another process writing it too leaves one complete
version under its name, never a part."""

import os


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
