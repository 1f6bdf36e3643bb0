"""Throughput of the training input pipeline: `python -m grain_jax.bench data [flags]`.

Writes synthetic JPEG record shards to a temporary directory (stored at `--stored-size`, the
converter's default `--max-side`, so decoding costs what it would on converted CC3M/CC12M data),
then reports:
  * the per-example preparation cost on one core (decode + resize + normalize + tokenize + boxes),
  * examples/s of the full pipeline (Grain, batching included) for each worker count, and
    examples per CPU-second of all its processes (= examples/s per fully busy core; robust to
    other load on the machine, which the wall-clock rate is not),
  * the padding the text tower runs on: each batch's captions and descriptions packed into rows of
    77 tokens, `--examples-per-device` examples to a group (as training packs them); the share of
    the tokens run that are padding, next to the share when every text runs alone at the full
    context (empty description slots included), the host time packing takes, and how text lengths
    spread.
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from grain_jax.data import examples, pipeline, records, synthetic, text_packing
from grain_jax.data.tokenizer import CONTEXT_LENGTH


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--image-size", type=int, default=224, help="model input side")
  parser.add_argument("--stored-size", type=int, default=512, help="side of the stored JPEGs")
  parser.add_argument("--num-regions", type=int, default=5, help="regions per example")
  parser.add_argument("--num-records", type=int, default=512, help="synthetic records written to time")
  parser.add_argument("--batch-size", type=int, default=64, help="per-host batch")
  parser.add_argument("--num-batches", type=int, default=12, help="timed batches per setting")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--read-threads", type=int, default=2, help="threads reading and decoding records")
  parser.add_argument(
    "--examples-per-device",
    type=int,
    default=32,
    help="examples whose texts are packed together (a device's micro-batch in training)",
  )
  args = parser.parse_args(argv)
  if args.batch_size % args.examples_per_device:
    parser.error(
      f"--batch-size {args.batch_size} is not a multiple of --examples-per-device {args.examples_per_device}"
    )
  return args


def text_padding(batches: Sequence[dict[str, np.ndarray]], examples_per_group: int) -> dict:
  """Over `batches`: the share of the text tower's tokens that are padding with each batch's texts
  packed in groups of `examples_per_group` examples (`padding`), and with every text run alone at
  the full context, empty description slots included (`padding_full`); the seconds packing took per
  batch (`pack_seconds`); each caption's and description's length (`lengths`, a dict by key; 0 for
  an empty slot)."""
  real, run, full, seconds = 0, 0, 0, []
  for batch in batches:
    start = time.perf_counter()
    packed = text_packing.pack_batch(batch, len(batch["caption_ids"]) // examples_per_group, CONTEXT_LENGTH)
    seconds.append(time.perf_counter() - start)
    real += int(np.count_nonzero(packed["text_segments"]))
    run += packed["text_tokens"].size
    full += batch["caption_ids"].size + batch["desc_ids"].size
  lengths = {
    "caption_ids": np.concatenate([text_packing.text_lengths(batch["caption_ids"]) for batch in batches]),
    "desc_ids": np.concatenate(
      [np.where(batch["box_valid"], text_packing.text_lengths(batch["desc_ids"]), 0).ravel() for batch in batches]
    ),
  }
  return dict(padding=1 - real / run, padding_full=1 - real / full, pack_seconds=seconds, lengths=lengths)


def _print_padding(batches: Sequence[dict[str, np.ndarray]], examples_per_group: int) -> None:
  report = text_padding(batches, examples_per_group)
  print(
    f"text padding, {len(batches)} batches of {len(batches[0]['caption_ids'])}, texts packed into rows of "
    f"{CONTEXT_LENGTH} tokens {examples_per_group} examples at a time: {report['padding']:.0%} of the tokens run "
    f"are padding ({report['padding_full']:.0%} with every text alone at {CONTEXT_LENGTH} tokens); packing took "
    f"a median {statistics.median(report['pack_seconds']) * 1e3:.1f} ms per batch on the host"
  )
  edges = (8, 16, 32, 48, CONTEXT_LENGTH)
  for key, name in (("caption_ids", "captions"), ("desc_ids", "descriptions")):
    lengths = report["lengths"][key]
    counts = np.histogram(lengths, bins=[0, 1] + [edge + 1 for edge in edges])[0] / lengths.size
    spread = ", ".join(f"{low + 1}-{edge}: {share:.0%}" for low, edge, share in zip((0, *edges), edges, counts[1:]))
    print(
      f"  {name:>12}: median length {np.median(lengths[lengths > 0]):.0f} tokens; lengths {spread}; "
      f"empty slots {counts[0]:.0%}"
    )


def _single_core_rate(data_dir: str, image_size: int, num_regions: int, count: int) -> float:
  """Examples per CPU-second of examples.prepare() run serially in this thread."""
  serialized = [records.serialize(r) for r in records.read_records(data_dir)][:count]
  rng = np.random.default_rng(0)
  # Two passes: the first fills the tokenizer's cache (as training does), the second is timed.
  for _ in range(2):
    start = time.thread_time()
    for data in serialized:
      examples.prepare(data, rng, image_size=image_size, num_regions=num_regions)
  return len(serialized) / (time.thread_time() - start)


def _cpu_seconds(pid: int | None = None) -> float:
  """CPU time used so far by process `pid` (default: this one) and its live descendants (Linux)."""
  pid = pid or os.getpid()
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{task}/children") as f:
        children += [int(c) for c in f.read().split()]
  except FileNotFoundError:  # the process ended meanwhile
    return 0.0
  return total + sum(_cpu_seconds(child) for child in children)


def _pipeline_rate(data_dir: str, args: argparse.Namespace, num_workers: int):
  """(examples/s, examples per CPU-second) of the training pipeline after two warm-up batches."""
  dataset = pipeline.train_dataset(
    data_dir,
    global_batch_size=args.batch_size,
    image_size=args.image_size,
    num_regions=args.num_regions,
    seed=0,
    num_workers=num_workers,
    read_threads=args.read_threads,
    process_index=0,
    process_count=1,
  )
  iterator = iter(dataset)
  for _ in range(2):  # worker start-up and first reads
    next(iterator)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(args.num_batches):
    next(iterator)
  count = args.num_batches * args.batch_size
  tick = 1 / os.sysconf("SC_CLK_TCK")  # /proc's resolution: a floor for very short runs
  return count / (time.perf_counter() - start), count / max(_cpu_seconds() - cpu, tick)


def main(argv: Sequence[str]) -> int:
  args = _parse(argv)
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    records.write_dataset(
      tmp, synthetic.train_records(0, args.num_records, args.stored_size, image_format="jpeg"), source="bench"
    )
    print(
      f"wrote {args.num_records} synthetic {args.stored_size}px JPEG records in "
      f"{time.perf_counter() - start:.1f}s; {cores} cores available"
    )
    single = _single_core_rate(tmp, args.image_size, args.num_regions, min(args.num_records, 128))
    print(
      f"one core, examples.prepare at {args.image_size}px: {single:.0f} examples per "
      f"CPU-second ({1e3 / single:.1f} ms/example)"
    )
    print(
      f"{'workers':>8} {'examples/s':>11} {'per CPU-s':>10}   (batch {args.batch_size}, "
      f"{args.read_threads} decoding threads per process)"
    )
    for num_workers in (int(w) for w in args.workers.split(",")):
      rate, per_cpu_second = _pipeline_rate(tmp, args, num_workers)
      print(f"{num_workers:>8} {rate:>11.0f} {per_cpu_second:>10.0f}")
    padding_dataset = pipeline.train_dataset(
      tmp,
      global_batch_size=args.batch_size,
      image_size=args.image_size,
      num_regions=args.num_regions,
      seed=0,
      num_workers=0,
      read_threads=args.read_threads,
      process_index=0,
      process_count=1,
    )
    iterator = iter(padding_dataset)
    batches = [next(iterator) for _ in range(max(1, args.num_records // args.batch_size))]
    _print_padding(batches, args.examples_per_device)
  print(
    "Whether this keeps up with the `small` preset's train step is measured with the "
    "training issue's step benchmark; compare its examples/s with the figures above."
  )
  return 0
