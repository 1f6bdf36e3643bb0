"""A digest manifest per checkpoint: the SHA-256 of every file a committed save wrote.

Orbax 0.12 checksums only the shard index of zarr3 arrays (TensorStore's crc32c index codec), not
the array data, so a flipped byte in a parameter file restores silently. The manifest,
`<step>/digests.json`, is written once the save has committed and checked before a restore.
"""

import hashlib
import json
import os

DIGESTS = "digests.json"


def _item_files(step_dir: str) -> list[str]:
  """The files of the checkpoint's items (`state/...`, `data/...`), relative to `step_dir`.

  Top-level files are left out: Orbax may rewrite its step metadata after the commit.
  """
  files = []
  for item in sorted(os.listdir(step_dir)):
    if os.path.isdir(os.path.join(step_dir, item)):
      for root, _, names in os.walk(os.path.join(step_dir, item)):
        files += [os.path.relpath(os.path.join(root, name), step_dir) for name in names]
  return sorted(files)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write(step_dir: str) -> None:
  """Writes `step_dir/digests.json` for a committed checkpoint (atomically)."""
  digests = {name: _sha256(os.path.join(step_dir, name)) for name in _item_files(step_dir)}
  tmp = os.path.join(step_dir, DIGESTS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(digests, f, indent=1)
  os.replace(tmp, os.path.join(step_dir, DIGESTS))


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, DIGESTS))


def problems(step_dir: str) -> list[str]:
  """What does not match `step_dir/digests.json`: changed, missing and unlisted files ([] = intact)."""
  try:
    with open(os.path.join(step_dir, DIGESTS)) as f:
      expected = json.load(f)
  except (OSError, ValueError) as error:
    return [f"{DIGESTS} does not read ({error})"]
  found = _item_files(step_dir)
  changed = [name for name in found if name in expected and _sha256(os.path.join(step_dir, name)) != expected[name]]
  return ([f"{name} changed" for name in changed] + [f"{name} missing" for name in sorted(set(expected) - set(found))]
          + [f"{name} not in {DIGESTS}" for name in sorted(set(found) - set(expected))])
