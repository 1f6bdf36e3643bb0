"""Tokenizer throughput: `python -m grain_jax.bench tokenizer [--num-strings N] [--repeats R]`.

Tokenizes deterministic, caption-like strings in batches and prints strings/second (median over
repeats) with an empty word cache ("cold", a fresh tokenizer per repeat) and with a cache that
already holds every word ("warm", the steady state of a long data pipeline).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

from grain_jax.data.tokenizer import CONTEXT_LENGTH, Tokenizer

_ADJECTIVES = (
  "red",
  "small",
  "old",
  "wooden",
  "bright",
  "crowded",
  "empty",
  "snowy",
  "vintage",
  "colorful",
  "tall",
  "sleepy",
  "shiny",
  "rustic",
  "modern",
  "blurry",
  "golden",
  "tiny",
  "giant",
  "wet",
)
_NOUNS = (
  "dog",
  "cat",
  "man",
  "woman",
  "child",
  "bicycle",
  "car",
  "bus",
  "table",
  "kitchen",
  "street",
  "beach",
  "mountain",
  "horse",
  "train",
  "pizza",
  "laptop",
  "umbrella",
  "bench",
  "skateboard",
  "giraffe",
  "elephant",
  "boat",
  "clock",
  "window",
  "building",
  "field",
  "river",
  "bridge",
  "cake",
)
_VERBS = (
  "sitting on",
  "standing next to",
  "riding",
  "walking along",
  "looking at",
  "holding",
  "lying on",
  "jumping over",
  "parked near",
  "playing with",
  "reflected in",
  "covered with",
)
_PLACES = (
  "in the park",
  "at sunset",
  "on a rainy day",
  "during the festival",
  "in downtown Chicago",
  "near the lake",
  "in winter",
  "at night",
  "on the beach",
  "in a busy market",
)
# Web captions carry some non-ASCII, entities and emoji; these take the slower ftfy path.
_EXTRAS = (
  "\u2014 stock photo",
  "&amp; friends",
  "\u201ccandid\u201d",
  "caf\u00e9 style",
  "\U0001f60a",
  "\u6771\u4eac",
  "(c) 2019",
  "#travel #photography",
  "\u2019s view",
  "na\u00efve art",
)


def make_captions(num_strings: int, seed: int = 0) -> list[str]:
  """Returns `num_strings` deterministic caption-like strings (5 to ~40 words each)."""
  rng = random.Random(seed)
  captions = []
  for _ in range(num_strings):
    parts = [
      rng.choice(("a", "the", "an image of a", "photo of a", "two")),
      rng.choice(_ADJECTIVES),
      rng.choice(_NOUNS),
      rng.choice(_VERBS),
      "a",
      rng.choice(_ADJECTIVES),
      rng.choice(_NOUNS),
    ]
    if rng.random() < 0.6:
      parts.append(rng.choice(_PLACES))
    if rng.random() < 0.3:
      parts += ["while", "a", rng.choice(_NOUNS), rng.choice(_VERBS), "the", rng.choice(_NOUNS)]
    if rng.random() < 0.2:
      parts.append(str(rng.randint(1, 2024)))
    if rng.random() < 0.15:
      parts.append(rng.choice(_EXTRAS))
    if rng.random() < 0.1:
      # Rare made-up words (names, brands) keep the cold-cache case honest.
      parts.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 10))))
    text = " ".join(parts)
    if rng.random() < 0.5:
      text = text[0].upper() + text[1:]
    captions.append(text + rng.choice((".", "", "!", " .")))
  return captions


def _cpu_name() -> str:
  """Returns `platform.processor()`, or the CPU model from /proc/cpuinfo where that is empty."""
  name = platform.processor()
  if not name and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  return name or platform.machine()


def _strings_per_second(tokenizer: Tokenizer, captions: list[str], batch_size: int) -> float:
  start = time.perf_counter()
  for i in range(0, len(captions), batch_size):
    tokenizer(captions[i : i + batch_size], CONTEXT_LENGTH)
  return len(captions) / (time.perf_counter() - start)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m grain_jax.bench tokenizer", description=__doc__)
  parser.add_argument("--num-strings", type=int, default=5000, help="captions per run")
  parser.add_argument("--batch-size", type=int, default=256, help="captions per tokenizer call")
  parser.add_argument("--repeats", type=int, default=5, help="runs per setting; the median is printed")
  parser.add_argument("--seed", type=int, default=0, help="seed of the caption generator")
  args = parser.parse_args(argv)

  captions = make_captions(args.num_strings, args.seed)
  cold = []
  for _ in range(args.repeats):
    fresh = Tokenizer()  # Built outside the timed region: loading the vocabulary is not per-string cost.
    cold.append(_strings_per_second(fresh, captions, args.batch_size))
  warm_tokenizer = Tokenizer()
  _strings_per_second(warm_tokenizer, captions, args.batch_size)
  warm = [_strings_per_second(warm_tokenizer, captions, args.batch_size) for _ in range(args.repeats)]

  print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
  print(
    f"{args.num_strings} captions, batch {args.batch_size}, context {CONTEXT_LENGTH}, median of {args.repeats} runs"
  )
  print(f"cold cache: {statistics.median(cold):,.0f} strings/s")
  print(f"warm cache: {statistics.median(warm):,.0f} strings/s")
  return 0
