r"""Converts the reference's annotation files into record shards.

  python -m grain_jax.data.convert --captions captions.csv --mllm-captions mllm_captions.json \
      --bboxes bboxes.json --image-root DIR --out DIR [--workers N]

Inputs (see docs/reference_behaviour.md, "Data"): `captions.csv` rows `image_path,caption` without a
header (a caption may hold further commas); `mllm_captions.json` `{image_path: caption}`; `bboxes.json`
`{image_path: [{"description", "bbox": [x1, y1, x2, y2], "score"}, ...]}` with boxes in the
detector's `--box-frame` x `--box-frame` frame of the squashed image (OWLv2: 960).

Resumable: shard i always holds rows [i * shard_size, (i + 1) * shard_size) of the CSV, and
`progress.json` lists the finished shards, so a rerun with the same arguments only does the rest.
"""

import argparse
import csv
import functools
import io
import json
import multiprocessing
import os
import sys
from collections.abc import Sequence
from typing import Any

import tqdm
from PIL import Image

from grain_jax.data import quality, records
from grain_jax.errors import ArgumentError, BadFileError, check_local_path, run_command

PROGRESS = "progress.json"
MALFORMED_ROW = "malformed_row"
_IMAGE_REASONS = (quality.MISSING_IMAGE, quality.CORRUPT_IMAGE)


def read_captions(path: str) -> list[tuple[str, str | None, str]]:
  """Rows of `captions.csv` as (image_path, caption or None when bad, skip reason or "")."""
  rows = []
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:
        rows.append((f"{path}:{number}", None, quality.NON_UTF8_TEXT))
        continue
      if not text.strip():
        continue
      fields = next(csv.reader([text]))
      if len(fields) < 2 or not fields[0].strip():
        rows.append((f"{path}:{number}", None, MALFORMED_ROW))
        continue
      # An unquoted caption with commas splits into several fields: the path is the first.
      rows.append((fields[0].strip(), ",".join(fields[1:]), ""))
  return rows


def _read_json(path: str | None) -> dict[str, Any]:
  """The object `{image_path: ...}` in the JSON file `path`; {} without one."""
  if not path:
    return {}
  with open(path, encoding="utf-8", errors="surrogateescape") as f:
    try:
      content = json.load(f)
    except json.JSONDecodeError as error:
      raise BadFileError(f"{path} is not valid JSON ({error})") from None
  if not isinstance(content, dict):
    raise BadFileError(f"{path} holds a JSON {type(content).__name__}, not an object {{image_path: ...}}")
  return content


def encode_image(path: str, max_side: int) -> bytes:
  """The image file's bytes, re-encoded as JPEG when its longer side exceeds `max_side`."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except (FileNotFoundError, IsADirectoryError) as e:
    raise quality.BadRecordError(quality.MISSING_IMAGE, path) from e
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
    if max_side and max(image.size) > max_side:
      scale = max_side / max(image.size)
      image = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC
      )
      out = io.BytesIO()
      image.save(out, "JPEG", quality=90)
      data = out.getvalue()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise quality.BadRecordError(quality.CORRUPT_IMAGE, path) from e
  return data


def _regions(entries: Any, box_frame: float) -> tuple[list[records.Region], list[str]]:
  """bboxes.json entries of one image -> normalized regions; malformed entries are dropped."""
  regions, reasons = [], []
  for entry in entries if isinstance(entries, list) else ():
    try:
      box = [float(v) / box_frame for v in entry["bbox"]]
      regions.append(records.Region(entry.get("description") or "", box, entry.get("score", 0.0)))
    except (AttributeError, KeyError, TypeError, ValueError):
      reasons.append(quality.BAD_BOX)
  kept, clean_reasons = quality.clean_regions(regions)
  return kept, reasons + clean_reasons


def convert_one(item: tuple[tuple[str, str | None, str], Any, Any], image_root: str, box_frame: float, max_side: int):
  """(CSV row, its MLLM caption, its bboxes.json entries) -> (serialized record or None, reasons).

  Each work item carries its own annotations, so that workers never receive the whole JSONs.
  """
  (key, caption, reason), mllm_caption, boxes = item
  if reason:
    return None, [reason]
  try:
    caption = quality.clean_text(caption)
    mllm = quality.clean_text(mllm_caption or "")
    if not caption and not mllm:
      raise quality.BadRecordError(quality.EMPTY_CAPTION, key)
    regions, reasons = _regions(boxes, box_frame)
    image = encode_image(os.path.join(image_root, key), max_side)
  except quality.BadRecordError as e:
    return None, [e.reason]
  record = records.Record(key, image, caption, mllm, tuple(regions))
  return records.serialize(record), reasons


def _load_progress(out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
  path = os.path.join(out_dir, PROGRESS)
  if not os.path.exists(path):
    return {"settings": settings, "shards": {}}
  with open(path) as f:
    progress = json.load(f)
  if progress["settings"] != settings:
    raise ArgumentError(
      f"{out_dir} holds a conversion with other settings {progress['settings']}; use another --out or delete it"
    )
  return progress


def _blame(args: argparse.Namespace, reason: str) -> str:
  """The input a skip reason points at, for the too-many-bad-rows error."""
  return args.image_root if reason in _IMAGE_REASONS else args.captions


def count_results(results, stats: Sequence[quality.DataStats], blame, bar):
  """Yields the serialized records of `results`, counting every row in each of `stats`.

  `stats[0]` covers the whole run and stops it when too many rows are bad.
  """
  for data, reasons in results:
    skipped = data is None
    for stat in stats:
      stat.add(reasons, skipped, blame(reasons[0]) if skipped else "")
    stats[0].check()
    bar.update(1)
    if not skipped:
      yield data


def convert(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the conversion described by the parsed CLI `args`; returns the manifest."""
  os.makedirs(args.out, exist_ok=True)
  settings = {
    k: getattr(args, k)
    for k in ("captions", "mllm_captions", "bboxes", "image_root", "shard_size", "box_frame", "max_side")
  }
  progress = _load_progress(args.out, settings)
  rows = read_captions(args.captions)
  mllm_captions, boxes = _read_json(args.mllm_captions), _read_json(args.bboxes)
  work = functools.partial(convert_one, image_root=args.image_root, box_frame=args.box_frame, max_side=args.max_side)
  # The fraction is judged on the first few hundred rows, so a broken input stops early.
  stats = quality.DataStats(args.max_bad_fraction, min_records=min(len(rows), 200), source=args.captions)
  blame = functools.partial(_blame, args)
  num_shards = max(1, -(-len(rows) // args.shard_size))
  # "spawn": forking a process that has started JAX's threads can deadlock.
  pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
  bar = tqdm.tqdm(total=len(rows), unit="img", desc="convert")
  try:
    for shard in range(num_shards):
      chunk = rows[shard * args.shard_size : (shard + 1) * args.shard_size]
      done = progress["shards"].get(str(shard))
      if done:  # a finished shard's counts are replayed so that the summary covers the whole run
        stats.merge(done["stats"])
        bar.update(len(chunk))
        continue
      shard_stats = quality.DataStats(source=args.captions)
      items = [(row, mllm_captions.get(row[0]), boxes.get(row[0])) for row in chunk]
      results = pool.imap(work, items, chunksize=8) if pool else map(work, items)
      name = records.shard_name(shard)
      count = records.write_shard(
        os.path.join(args.out, name), count_results(results, (stats, shard_stats), blame, bar)
      )
      progress["shards"][str(shard)] = {"file": name, "count": count, "stats": shard_stats.get_state()}
      records.write_json(os.path.join(args.out, PROGRESS), progress)
  finally:
    bar.close()
    if pool:
      pool.terminate()
  stats.check()
  shards = [
    {"file": s["file"], "count": s["count"]} for _, s in sorted(progress["shards"].items(), key=lambda kv: int(kv[0]))
  ]
  manifest = records.write_manifest(
    args.out, shards, source=os.path.abspath(args.captions), skipped=dict(stats.skipped)
  )
  print(summary(stats), file=sys.stderr)
  return manifest


def summary(stats: quality.DataStats, unit: str = "rows") -> str:
  """Human-readable counts: `unit` read, records written, skipped per reason, fixed per reason."""
  lines = [f"{stats.seen} {unit} read, {stats.seen - stats.num_skipped} records written, {stats.num_skipped} skipped"]
  lines += [f"  skipped {reason}: {n}" for reason, n in sorted(stats.skipped.items())]
  lines += [f"  fixed / dropped regions, {reason}: {n}" for reason, n in sorted(stats.fixed.items())]
  return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.data.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--captions", required=True, help="captions.csv: image_path,caption rows")
  parser.add_argument("--mllm-captions", default="", help="mllm_captions.json (optional)")
  parser.add_argument("--bboxes", default="", help="bboxes.json (optional: no regions without)")
  parser.add_argument("--image-root", required=True, help="directory the image paths are under")
  parser.add_argument("--out", required=True, help="output directory of shards + manifest.json")
  parser.add_argument(
    "--workers", type=int, default=os.cpu_count() or 1, help="processes decoding images (1 = in this process)"
  )
  parser.add_argument("--shard-size", type=int, default=2048, help="CSV rows per shard")
  parser.add_argument(
    "--box-frame", type=float, default=960.0, help="side of the square frame the bboxes are in (OWLv2: 960)"
  )
  parser.add_argument(
    "--max-side", type=int, default=512, help="re-encode images whose longer side exceeds this (0 = keep all bytes)"
  )
  parser.add_argument(
    "--max-bad-fraction",
    type=float,
    default=0.05,
    help="stop with an error when more than this fraction of rows is bad",
  )
  args = parser.parse_args(argv)
  for flag in ("captions", "mllm_captions", "bboxes", "image_root", "out"):
    check_local_path(getattr(args, flag), f"--{flag.replace('_', '-')}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a user's error is one message and exit status 2 (grain_jax.errors)."""
  return run_command(lambda: convert(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
  sys.exit(main())
