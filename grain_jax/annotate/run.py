"""An annotation run: images -> MLLM caption and descriptions -> detector boxes -> record shards.

Shard i holds images [i * shard_size, (i + 1) * shard_size) of the input's fixed order. Chunk c
of N does the shards i with i % N == c, so that hosts writing into one output directory (a shared
file system) never write the same file. A finished shard has its counts in
`progress/shard-XXXXX.json`; a re-run skips it. The manifest is written when every shard is
finished, by the chunk that finishes last (or by any re-run), so a dataset with a manifest is
complete.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tqdm

from grain_jax.annotate import detector, mllm, parse, sources
from grain_jax.data import convert, quality, records
from grain_jax.errors import ArgumentError

PROGRESS_DIR = "progress"
SETTINGS = "settings.json"
# The flags that change what is written; the others (batch size, device, chunks) do not.
_SETTINGS_FLAGS = (
  "captions",
  "mllm",
  "detector",
  "threshold",
  "max_descriptions",
  "max_new_tokens",
  "shard_size",
  "max_side",
)


@dataclasses.dataclass
class Counts:
  """What the models produced for the images of some shards, and how long they took."""

  images: int = 0
  descriptions: int = 0
  boxes: int = 0
  seconds: float = 0.0

  def add(self, other: "Counts") -> None:
    for field in dataclasses.fields(self):
      setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class Models:
  """The two annotation models, loaded on first use (a re-run with nothing left loads neither)."""

  def __init__(self, args: argparse.Namespace):
    self._args = args

  @functools.cached_property
  def describer(self) -> mllm.Describer:
    return mllm.Describer(
      self._args.mllm, self._args.device, self._args.dtype, max_new_tokens=self._args.max_new_tokens
    )

  @functools.cached_property
  def detector(self) -> detector.Detector:
    return detector.Detector(self._args.detector, self._args.device, self._args.dtype, self._args.threshold)


def annotate_batch(
  batch: Sequence[sources.Loaded], models: Models, max_descriptions: int, counts: Counts
) -> list[tuple[bytes | None, list[str]]]:
  """Images -> (serialized record or None when skipped, reasons) each; adds to `counts`."""
  pixels = [item.pixels for item in batch]
  parsed = [parse.parse_response(answer, max_descriptions) for answer in models.describer.describe(pixels)]
  found = models.detector.detect(pixels, [descriptions for _, descriptions in parsed])
  results = []
  for item, (caption, descriptions), regions in zip(batch, parsed, found):
    counts.images += 1
    counts.descriptions += len(descriptions)
    kept, reasons = quality.clean_regions(regions)
    counts.boxes += len(kept)
    if not item.alt_text and not caption:
      results.append((None, [quality.EMPTY_CAPTION]))
      continue
    record = records.Record(item.key, item.image, item.alt_text, caption, tuple(kept))
    results.append((records.serialize(record), reasons))
  return results


def _load(source, index: int) -> tuple[sources.Loaded | None, list[str]]:
  try:
    return source.load(index), []
  except quality.BadRecordError as e:
    return None, [e.reason]


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _shard_results(
  loaded: Iterable[tuple[sources.Loaded | None, list[str]]], models: Models, args: argparse.Namespace, counts: Counts
):
  """(serialized record or None, reasons) for each loaded image, in order."""
  for batch in _batches(loaded, args.batch_size):
    good = [item for item, _ in batch if item is not None]
    annotated = iter(annotate_batch(good, models, args.max_descriptions, counts) if good else ())
    for item, reasons in batch:
      yield next(annotated) if item is not None else (None, reasons)


def _check_settings(progress_dir: str, settings: dict[str, Any]) -> None:
  path = os.path.join(progress_dir, SETTINGS)
  if not os.path.exists(path):
    records.write_json(path, settings)
    return
  with open(path) as f:
    previous = json.load(f)
  if previous != settings:
    changed = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
    raise ArgumentError(
      f"{os.path.dirname(progress_dir)} holds an annotation run with other "
      f"settings ({', '.join(changed)} differ: {path}); use another --out or "
      "delete it"
    )


def _marker(progress_dir: str, shard: int) -> str:
  return os.path.join(progress_dir, f"shard-{shard:05d}.json")


def _read_marker(progress_dir: str, shard: int) -> dict[str, Any] | None:
  path = _marker(progress_dir, shard)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_manifest_when_complete(
  args: argparse.Namespace, progress_dir: str, num_shards: int
) -> dict[str, Any] | None:
  markers = [_read_marker(progress_dir, shard) for shard in range(num_shards)]
  if not all(markers):
    return None
  skipped = quality.DataStats()
  for marker in markers:
    skipped.merge(marker["stats"])
  return records.write_manifest(
    args.out,
    [{"file": m["file"], "count": m["count"]} for m in markers],
    source=os.path.abspath(args.images),
    skipped=dict(skipped.skipped),
  )


def annotate(args: argparse.Namespace) -> dict[str, Any] | None:
  """Runs this chunk of the annotation the parsed CLI `args` describe.

  Returns the manifest once the whole dataset is finished, None while other chunks still work.
  """
  source = sources.open_source(args.images, args.captions, args.max_side)
  progress_dir = os.path.join(args.out, PROGRESS_DIR)
  os.makedirs(progress_dir, exist_ok=True)
  settings = {flag: getattr(args, flag) for flag in _SETTINGS_FLAGS}
  settings.update(images=source.fingerprint(), prompt=mllm.PROMPT)
  _check_settings(progress_dir, settings)

  num_shards = max(1, -(-len(source) // args.shard_size))
  spans = {
    shard: range(shard * args.shard_size, min(len(source), (shard + 1) * args.shard_size))
    for shard in range(args.chunk_index, num_shards, args.num_chunks)
  }
  total = sum(len(span) for span in spans.values())
  stats = quality.DataStats(args.max_bad_fraction, min_records=min(total, 200), source=args.images)
  counts, new = Counts(), Counts()
  models = Models(args)
  bar = tqdm.tqdm(total=total, unit="img", desc=f"annotate {args.chunk_index}/{args.num_chunks}")
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    try:
      for shard, span in spans.items():
        done = _read_marker(progress_dir, shard)
        if done:  # replayed, so that the summary covers the whole chunk
          stats.merge(done["stats"])
          counts.add(Counts(**done["counts"]))
          bar.update(len(span))
          continue
        start, shard_counts = time.perf_counter(), Counts()
        shard_stats = quality.DataStats(source=args.images)
        loaded = pool.map(functools.partial(_load, source), span)
        results = _shard_results(loaded, models, args, shard_counts)
        name = records.shard_name(shard)
        count = records.write_shard(
          os.path.join(args.out, name),
          convert.count_results(results, (stats, shard_stats), lambda _reason: args.images, bar),
        )
        shard_counts.seconds = time.perf_counter() - start
        records.write_json(
          _marker(progress_dir, shard),
          {"file": name, "count": count, "stats": shard_stats.get_state(), "counts": dataclasses.asdict(shard_counts)},
        )
        counts.add(shard_counts)
        new.add(shard_counts)
    finally:
      bar.close()
  stats.check()
  manifest = _write_manifest_when_complete(args, progress_dir, num_shards)
  print(summary(stats, counts, new, len(spans), manifest), file=sys.stderr)
  return manifest


def summary(
  stats: quality.DataStats, counts: Counts, new: Counts, num_shards: int, manifest: dict[str, Any] | None
) -> str:
  """Images read / written / skipped, descriptions and boxes per image, time, dataset status."""
  per_image = max(counts.images, 1)
  lines = [
    convert.summary(stats, unit="images"),
    f"  {counts.descriptions / per_image:.1f} descriptions and "
    f"{counts.boxes / per_image:.1f} boxes per annotated image, over {num_shards} shards",
    f"  {new.images} images annotated in this run in {new.seconds:.1f} s"
    + (f" ({new.images / new.seconds:.2f} images/s)" if new.seconds else ""),
  ]
  lines.append(
    f"  dataset complete: {manifest['count']} records"
    if manifest
    else "  dataset not complete yet: other chunks still have shards to finish"
  )
  return "\n".join(lines)
