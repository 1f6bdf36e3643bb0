"""Throughput of the training input pipeline: `python -m grain_jax.bench data [flags]`.

Writes synthetic JPEG record shards to a temporary directory (stored at `--stored-size`, the
converter's default `--max-side`, so decoding costs what it would on converted CC3M/CC12M data),
then reports:
  * the per-example preparation cost on one core (decode + resize + normalize + tokenize + boxes),
  * examples/s of the full pipeline (Grain, batching included) for each worker count, and
    examples per CPU-second of all its processes (= examples/s per fully busy core; robust to
    other load on the machine, which the wall-clock rate is not),
  * the padding the text tower runs on: each batch's captions and descriptions are cut to the
    shortest of `--buckets` that holds every EOT (as training does); the share of the tokens run
    that are padding, next to the share at the full 77-token context, and how text lengths spread
    over the buckets.
"""

import argparse
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from grain_jax.data import examples
from grain_jax.data import pipeline
from grain_jax.data import records
from grain_jax.data import synthetic
from grain_jax.data.tokenizer import CONTEXT_LENGTH
from grain_jax.train.trainer import text_to_bucket


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m grain_jax.bench data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--image-size", type=int, default=224, help="model input side")
  parser.add_argument("--stored-size", type=int, default=512, help="side of the stored JPEGs")
  parser.add_argument("--num-regions", type=int, default=5, help="regions per example")
  parser.add_argument("--num-records", type=int, default=512, help="synthetic records written to time")
  parser.add_argument("--batch-size", type=int, default=64, help="per-host batch")
  parser.add_argument("--num-batches", type=int, default=12, help="timed batches per setting")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--read-threads", type=int, default=2, help="threads reading and decoding records")
  parser.add_argument("--buckets", default="16,32,48,77",
                      help="comma-separated text lengths batches are cut to (config.model.text.context_buckets)")
  return parser.parse_args(argv)


def text_lengths(ids: np.ndarray) -> np.ndarray:
  """Tokens through EOT of each row of `ids [..., 77]` (0 for an empty description slot)."""
  return np.where(ids.any(axis=-1), np.argmax(ids, axis=-1) + 1, 0)


def text_padding(batches: Sequence[dict[str, np.ndarray]], buckets: Sequence[int]) -> dict[str, dict]:
  """For "caption_ids" and "desc_ids" over `batches`: `padding` the share of the tokens the text
  tower runs that are padding (empty description slots count whole), once every batch is cut to
  its bucket; `padding_full` the same at the full context; `lengths` every text's length."""
  report = {}
  for key in ("caption_ids", "desc_ids"):
    real, run, full, lengths = 0, 0, 0, []
    for batch in batches:
      batch_lengths = text_lengths(batch[key]).reshape(-1)
      real += int(batch_lengths.sum())
      run += batch_lengths.size * text_to_bucket(batch, buckets)[key].shape[-1]
      full += batch_lengths.size * CONTEXT_LENGTH
      lengths.append(batch_lengths)
    report[key] = dict(padding=1 - real / run, padding_full=1 - real / full, lengths=np.concatenate(lengths))
  return report


def _print_padding(batches: Sequence[dict[str, np.ndarray]], buckets: Sequence[int]) -> None:
  edges = sorted(buckets)
  report = text_padding(batches, edges)
  print(f"text padding, {len(batches)} batches cut to buckets {edges} (share of the tokens run that are padding):")
  for key, name in (("caption_ids", "captions"), ("desc_ids", "descriptions")):
    padding, padding_full, lengths = report[key]["padding"], report[key]["padding_full"], report[key]["lengths"]
    counts = np.histogram(lengths, bins=[0, 1] + [edge + 1 for edge in edges])[0] / lengths.size
    spread = ", ".join(f"<={edge}: {share:.0%}" for edge, share in zip(edges, counts[1:]))
    print(f"  {name:>12}: {padding:.0%} (at {CONTEXT_LENGTH} tokens: {padding_full:.0%}); median length "
          f"{np.median(lengths[lengths > 0]):.0f} tokens; lengths {spread}; empty slots {counts[0]:.0%}")


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
      data_dir, global_batch_size=args.batch_size, image_size=args.image_size,
      num_regions=args.num_regions, seed=0, num_workers=num_workers,
      read_threads=args.read_threads, process_index=0, process_count=1)
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
    records.write_dataset(tmp, synthetic.train_records(0, args.num_records, args.stored_size,
                                                       image_format="jpeg"), source="bench")
    print(f"wrote {args.num_records} synthetic {args.stored_size}px JPEG records in "
          f"{time.perf_counter() - start:.1f}s; {cores} cores available")
    single = _single_core_rate(tmp, args.image_size, args.num_regions, min(args.num_records, 128))
    print(f"one core, examples.prepare at {args.image_size}px: {single:.0f} examples per "
          f"CPU-second ({1e3 / single:.1f} ms/example)")
    print(f"{'workers':>8} {'examples/s':>11} {'per CPU-s':>10}   (batch {args.batch_size}, "
          f"{args.read_threads} decoding threads per process)")
    for num_workers in (int(w) for w in args.workers.split(",")):
      rate, per_cpu_second = _pipeline_rate(tmp, args, num_workers)
      print(f"{num_workers:>8} {rate:>11.0f} {per_cpu_second:>10.0f}")
    padding_dataset = pipeline.train_dataset(
        tmp, global_batch_size=args.batch_size, image_size=args.image_size, num_regions=args.num_regions, seed=0,
        num_workers=0, read_threads=args.read_threads, process_index=0, process_count=1)
    iterator = iter(padding_dataset)
    batches = [next(iterator) for _ in range(max(1, args.num_records // args.batch_size))]
    _print_padding(batches, [int(b) for b in args.buckets.split(",")])
  print("Whether this keeps up with the `small` preset's train step is measured with the "
        "training issue's step benchmark; compare its examples/s with the figures above.")
  return 0
