"""Batched in-jit matching against the reference's per-image scipy loop.

  python -m grain_jax.bench match [--batch 128,1024] [--queries 5] [--targets 5] [--repeats 7]

Costs are `matching_cost` of random predicted and target boxes, with 1 to T valid targets per image.
The scipy baseline does what the reference does per image: slice its targets, solve with
`linear_sum_assignment`, write the result into `[B, T]`. "one call" times a single jitted `match`
including its dispatch; "per step" times the 12 matchings that the reference makes per training
step, here in one jitted call as they would run inside a train step. Times are medians of samples
taken in turns.
"""

import argparse
import functools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from grain_jax.ops import matching

MATCHINGS_PER_STEP = 12
METHODS = ("hungarian", "sinkhorn", "greedy")


def _random_problem(rng: np.random.Generator, batch: int, num_queries: int, num_targets: int):
  """Costs `[batch, Q, T]` of random boxes and `[batch, T]` validity with 1..T valid targets."""

  def random_boxes(count):
    center = rng.uniform(0.1, 0.9, (batch, count, 2))
    size = rng.uniform(0.02, 0.6, (batch, count, 2))
    return np.concatenate([center, size], -1).astype(np.float32)

  cost = matching.matching_cost(random_boxes(num_queries), random_boxes(num_targets), 5.0, 2.0)
  num_valid = rng.integers(1, num_targets + 1, batch)
  return np.asarray(cost), np.arange(num_targets)[None] < num_valid[:, None]


def _scipy_loop(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """The reference's matcher: `[B, T]` query_of_target from one scipy call per image.

  Valid targets are a prefix of each row here (as the reference's per-image box lists are), so
  an image's problem is a plain slice.
  """
  query_of_target = np.full(valid.shape, -1, np.int32)
  for image, num_valid in enumerate(valid.sum(1).tolist()):
    queries, targets = linear_sum_assignment(cost[image, :, :num_valid])
    query_of_target[image, targets] = queries
  return query_of_target


def _median_seconds(timed: dict, repeats: int) -> dict:
  """Median wall time of each `fn()` in `timed`, samples of ~20 ms each.

  The functions take turns sample by sample, so that load changes on a shared machine hit every
  figure alike rather than whichever ran at the time.
  """
  calls = {}
  for name, fn in timed.items():
    jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    calls[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
  samples = {name: [] for name in timed}
  for _ in range(repeats):
    for name, fn in timed.items():
      start = time.perf_counter()
      for _ in range(calls[name]):
        result = fn()
      jax.block_until_ready(result)
      samples[name].append((time.perf_counter() - start) / calls[name])
  return {name: float(np.median(times)) for name, times in samples.items()}


def _total_cost(cost: np.ndarray, query_of_target: np.ndarray) -> np.ndarray:
  """`[B]` summed cost of the matched pairs."""
  matched = query_of_target >= 0
  picked = np.take_along_axis(cost, np.maximum(query_of_target, 0)[:, None, :], axis=1)[:, 0]
  return np.where(matched, picked, 0.0).sum(1)


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as cpuinfo:
      names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = names[0] if names else cpu
  # The load average says how much other work shared the cores while timing.
  return (
    f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
    f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})"
  )


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.bench match", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", default="128,1024", help="comma-separated batch sizes")
  parser.add_argument("--queries", type=int, default=5, help="region queries per image (Q)")
  parser.add_argument("--targets", type=int, default=5, help="boxes per image (T)")
  parser.add_argument("--repeats", type=int, default=7, help="timed samples per figure")
  parser.add_argument("--seed", type=int, default=0, help="seed of the random cost matrices")
  args = parser.parse_args(argv)
  rng = np.random.default_rng(args.seed)

  print(f"machine: {_machine()}")
  print(
    f"Q={args.queries} T={args.targets}; per step = {MATCHINGS_PER_STEP} matchings; "
    "speedup vs the scipy loop; gap = mean (cost - optimal cost) per image\n"
  )
  header = (
    f"{'B':>5} {'method':<10} {'one call us':>12} {'speedup':>8} {'per step us':>12} "
    f"{'speedup':>8} {'gap':>9} {'optimal':>8}"
  )
  print(header)
  print("-" * len(header))
  for batch in [int(size) for size in args.batch.split(",")]:
    cost, valid = _random_problem(rng, MATCHINGS_PER_STEP * batch, args.queries, args.targets)
    step_cost = cost.reshape(MATCHINGS_PER_STEP, batch, args.queries, args.targets)
    step_valid = valid.reshape(MATCHINGS_PER_STEP, batch, args.targets)
    optimal = _total_cost(cost, _scipy_loop(cost, valid))

    device_cost, device_valid = jnp.asarray(step_cost), jnp.asarray(step_valid)
    call_cost, call_valid = jnp.asarray(step_cost[0]), jnp.asarray(step_valid[0])
    timed = {
      ("scipy loop", "call"): functools.partial(_scipy_loop, step_cost[0], step_valid[0]),
      ("scipy loop", "step"): functools.partial(_scipy_loop, cost, valid),
    }
    gaps = {"scipy loop": np.zeros(len(cost))}
    for method in METHODS:
      one_call = jax.jit(functools.partial(matching.match, method=method))
      per_step = jax.jit(jax.vmap(functools.partial(matching.match, method=method)))
      timed[method, "call"] = functools.partial(one_call, call_cost, call_valid)
      timed[method, "step"] = functools.partial(per_step, device_cost, device_valid)
      assignment = np.asarray(per_step(device_cost, device_valid)).reshape(valid.shape)
      gaps[method] = _total_cost(cost, assignment) - optimal
    seconds = _median_seconds(timed, args.repeats)
    for method, gap in gaps.items():
      call, step = seconds[method, "call"], seconds[method, "step"]
      print(
        f"{batch:>5} {method:<10} {call * 1e6:>12.1f} "
        f"{seconds['scipy loop', 'call'] / call:>8.1f} {step * 1e6:>12.1f} "
        f"{seconds['scipy loop', 'step'] / step:>8.1f} {gap.mean():>9.4f} "
        f"{100 * np.mean(gap <= 1e-4):>7.1f}%"
      )
  return 0
