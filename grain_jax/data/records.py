"""Annotation records: the schema, its serialization, ArrayRecord shards and their manifest.

One record per image: the encoded image bytes, the alt-text caption, the MLLM caption ("" when
there is none) and a list of regions `{description, box, score}` with boxes as normalized
(x1, y1, x2, y2). A dataset is a directory of ArrayRecord shards plus `manifest.json`:

  {"schema_version": 1, "source": "...", "count": N,
   "shards": [{"file": "shard-00000.array_record", "count": n}, ...], "skipped": {reason: n}}

Records are msgpack maps so that any tool can read them without this package.
"""

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, SupportsIndex

import grain
import msgpack
import numpy as np
from array_record.python import array_record_module

from grain_jax.data import quality
from grain_jax.errors import BadFileError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
# Single-record groups: the training pipeline reads records in random order.
_WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class Region:
  """One described region: `box` is normalized (x1, y1, x2, y2), `score` the detector's."""

  description: str
  box: tuple[float, float, float, float]
  score: float


@dataclasses.dataclass(frozen=True)
class Record:
  """One training image with its captions and regions."""

  key: str  # where the image came from (its path in the source dataset)
  image: bytes  # encoded JPEG / PNG
  caption: str  # alt-text
  mllm_caption: str = ""  # "" when the source has none
  regions: tuple[Region, ...] = ()


def serialize(record: Record) -> bytes:
  return msgpack.packb(
    {
      "schema": SCHEMA_VERSION,
      "key": record.key,
      "image": record.image,
      "caption": record.caption,
      "mllm_caption": record.mllm_caption,
      "regions": [
        {"description": r.description, "box": [float(v) for v in r.box], "score": float(r.score)}
        for r in record.regions
      ],
    }
  )


class DamagedRecord(NamedTuple):
  """What `RecordSource` gives for a record whose bytes do not read: where it is and why."""

  path: str
  position: int  # the record's number in its shard
  error: str

  def __str__(self) -> str:
    return f"{self.path}, record {self.position}: {self.error}"


def deserialize(data: bytes | DamagedRecord) -> Record:
  """Parses a serialized record; raises quality.BadRecordError with the reason if it can't."""
  if isinstance(data, DamagedRecord):
    raise quality.BadRecordError(quality.DAMAGED_RECORD, str(data))
  try:
    fields = msgpack.unpackb(data)
  except UnicodeDecodeError as e:
    raise quality.BadRecordError(quality.NON_UTF8_TEXT) from e
  except Exception as e:  # msgpack raises several unrelated types for truncated / garbage bytes
    raise quality.BadRecordError(quality.UNREADABLE_RECORD) from e
  if not isinstance(fields, dict) or fields.get("schema") != SCHEMA_VERSION:
    raise quality.BadRecordError(quality.UNREADABLE_RECORD)
  try:
    regions = tuple(
      Region(str(r["description"]), tuple(float(v) for v in r["box"]), float(r["score"])) for r in fields["regions"]
    )
    if any(len(r.box) != 4 for r in regions):
      raise ValueError("box without 4 coordinates")
    return Record(
      key=str(fields["key"]),
      image=bytes(fields["image"]),
      caption=str(fields["caption"]),
      mllm_caption=str(fields["mllm_caption"] or ""),
      regions=regions,
    )
  except (KeyError, TypeError, ValueError) as e:
    raise quality.BadRecordError(quality.UNREADABLE_RECORD) from e


def shard_name(index: int) -> str:
  return f"shard-{index:05d}{SHARD_SUFFIX}"


def write_shard(path: str, records: Iterable[bytes]) -> int:
  """Writes serialized records to `path` atomically (a partial shard never has the final name)."""
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  count = 0
  for data in records:
    writer.write(data)
    count += 1
  writer.close()
  os.replace(tmp, path)
  return count


def write_manifest(
  out_dir: str, shards: Sequence[dict[str, Any]], source: str, skipped: dict[str, int] | None = None
) -> dict[str, Any]:
  """Writes `manifest.json` for `shards` ([{"file", "count"}], in order) and returns it."""
  manifest = {
    "schema_version": SCHEMA_VERSION,
    "source": source,
    "count": int(sum(s["count"] for s in shards)),
    "shards": list(shards),
    "skipped": dict(skipped or {}),
  }
  write_json(os.path.join(out_dir, MANIFEST), manifest)
  return manifest


def write_json(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically, also when several hosts write it at once."""
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def write_dataset(out_dir: str, records: Iterable[Record], source: str, shard_size: int = 2048) -> dict[str, Any]:
  """Serializes `records` into shards of `shard_size` plus a manifest; returns the manifest."""
  os.makedirs(out_dir, exist_ok=True)
  shards, pending = [], []

  def flush():
    name = shard_name(len(shards))
    shards.append({"file": name, "count": write_shard(os.path.join(out_dir, name), pending)})
    pending.clear()

  for record in records:
    pending.append(serialize(record))
    if len(pending) == shard_size:
      flush()
  if pending or not shards:
    flush()
  return write_manifest(out_dir, shards, source)


def read_manifest(data_dir: str) -> dict[str, Any]:
  """Reads and validates `data_dir/manifest.json`; errors name the file and what is wrong."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: {data_dir} is not a grain-jax record "
      "dataset (write one with python -m grain_jax.data.convert)"
    )
  redo = "Convert the data again (python -m grain_jax.data.convert) or restore the file."
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise BadFileError(f"{path} is not valid JSON ({error}). {redo}") from None
  version = manifest.get("schema_version") if isinstance(manifest, dict) else None
  if version != SCHEMA_VERSION:
    raise BadFileError(
      f"{path} has record schema version {version!r}; this code reads version {SCHEMA_VERSION}. {redo}"
    )
  shards = manifest.get("shards")
  if not isinstance(shards, list) or not all(
    isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int) for s in shards
  ):
    raise BadFileError(f'{path}: "shards" must be a list of {{"file": name, "count": records}}. {redo}')
  for shard in shards:
    if not os.path.exists(os.path.join(data_dir, shard["file"])):
      raise FileNotFoundError(f"{path} lists shard {shard['file']}, which is missing")
  return manifest


class RecordSource:
  """The records of a dataset's shards, concatenated (a Grain random-access source): the bytes of
  record `index`, or a DamagedRecord (logged) where they do not read, so that a corrupt block of a
  shard costs its records, counted as bad, and not the run."""

  def __init__(self, shards: grain.sources.ArrayRecordDataSource, data_dir: str, manifest: dict[str, Any]):
    self._shards, self._data_dir, self._manifest = shards, data_dir, manifest

  def __len__(self) -> int:
    return len(self._shards)

  def __getitem__(self, index: SupportsIndex) -> bytes | DamagedRecord:
    try:
      return self._shards[index]
    except (RuntimeError, OSError) as error:  # ArrayRecord's "Corrupted Riegeli/records file: ... at byte N"
      damaged = DamagedRecord(*record_location(self._data_dir, self._manifest, int(index)), str(error))
      logging.warning("skipping a damaged record: %s", damaged)
      return damaged


def data_source(data_dir: str, manifest: dict[str, Any]) -> RecordSource:
  """The records of the dataset's shards, concatenated; an unreadable shard is named in the error."""
  paths = shard_paths(data_dir, manifest)
  try:
    return RecordSource(grain.sources.ArrayRecordDataSource(paths), data_dir, manifest)
  except RuntimeError:
    # ArrayRecord's message does not say which file; opening them one by one finds it.
    for path in paths:
      try:
        grain.sources.ArrayRecordDataSource([path])
      except RuntimeError as error:
        raise BadFileError(
          f"{path} is not a readable ArrayRecord file ({error}). Convert the data again "
          "(python -m grain_jax.data.convert) or restore the file."
        ) from None
    raise


def shard_paths(data_dir: str, manifest: dict[str, Any]) -> list[str]:
  return [os.path.join(data_dir, s["file"]) for s in manifest["shards"] if s["count"]]


def record_location(data_dir: str, manifest: dict[str, Any], index: int) -> tuple[str, int]:
  """(the shard file, the record's number in it) of record `index` of the concatenated dataset."""
  counts = [s["count"] for s in manifest["shards"] if s["count"]]
  shard = min(int(np.searchsorted(np.cumsum(counts), index, side="right")), len(counts) - 1)
  return shard_paths(data_dir, manifest)[shard], index - sum(counts[:shard])


def read_records(data_dir: str) -> Iterable[Record]:
  """Every record of a dataset, in order (for inspection and tests; training uses the pipeline)."""
  manifest = read_manifest(data_dir)
  for path in shard_paths(data_dir, manifest):
    reader = array_record_module.ArrayRecordReader(path)
    try:
      for i in range(reader.num_records()):
        yield deserialize(reader.read([i])[0])
    finally:
      reader.close()
