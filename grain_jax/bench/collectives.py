"""Collectives of the train step: `python -m grain_jax.bench collectives --config CONFIG [--config ...]`.

Compiles the train step exactly as `python -m grain_jax.bench memory` does (TPU presets with the
TPU compiler, deviceless, where libtpu is installed; others with XLA:CPU) and reads the compiled
program's collectives from its HLO (`grain_jax/bench/_hlo.py`): per op, how often it runs per step,
the bytes of the tensors it gathers or reduces, and an estimate of the bytes each device sends
(ring: all-gather and reduce-scatter (n-1)/n of the tensor, all-reduce twice that); then the largest
collectives with the tensor they move and the source line of the JAX operation they serve.
"""

import argparse
import collections
import sys

from grain_jax.bench import _hlo, memory

GIB = memory.GIB


def summary(rows: list[_hlo.Collective]) -> list[dict]:
  """Per op: executions per step, tensor bytes and sent bytes per device per step; sorted by op."""
  totals = collections.defaultdict(lambda: dict(executions=0, tensor_bytes=0, sent_bytes=0.0))
  for row in rows:
    total = totals[row.op]
    total["executions"] += row.executions
    total["tensor_bytes"] += row.executions * row.tensor_bytes
    total["sent_bytes"] += row.executions * row.sent_bytes
  return [dict(op=op, **totals[op]) for op in _hlo.COLLECTIVES if op in totals]


def largest(rows: list[_hlo.Collective], top: int) -> list[dict]:
  """The `top` (op, tensor, source, pass) groups with the most sent bytes per step."""
  groups = collections.defaultdict(lambda: dict(executions=0, sent_bytes=0.0))
  for row in rows:
    group = groups[(row.op, row.tensor, row.group_size, row.source, row.backward)]
    group["executions"] += row.executions
    group["sent_bytes"] += row.executions * row.sent_bytes
  ranked = sorted(groups.items(), key=lambda item: -item[1]["sent_bytes"])[:top]
  return [
    dict(op=op, tensor=tensor, group_size=size, source=source, backward=backward, **totals)
    for (op, tensor, size, source, backward), totals in ranked
  ]


def report(row: dict, top: int) -> str:
  """Markdown: the memory line, the per-op summary and the largest collectives of one config."""
  collectives = [_hlo.Collective(**c) for c in row["collectives"]]
  mib = lambda value: f"{value / 2**20:,.1f}"
  lines = [
    f"`{row['config']}` ({row['hardware']}, {row['compiler']}, mesh "
    f"{' x '.join(str(s) for s in row['mesh'].values())}): {row['total'] / GIB:.2f} GiB per device "
    f"({row['temporaries'] / GIB:.2f} GiB temporaries)",
    "",
    "| op | per step | tensors (MiB) | sent per device (MiB) |",
    "|---|---|---|---|",
  ]
  per_op = summary(collectives)
  for op in per_op:
    lines.append(f"| {op['op']} | {op['executions']} | {mib(op['tensor_bytes'])} | {mib(op['sent_bytes'])} |")
  lines.append(
    f"| all | {sum(op['executions'] for op in per_op)} | {mib(sum(op['tensor_bytes'] for op in per_op))} | "
    f"{mib(sum(op['sent_bytes'] for op in per_op))} |"
  )
  lines += [
    "",
    "| op | tensor | group | pass | source (innermost project frame) | per step | sent per device (MiB) |",
    "|---|---|---|---|---|---|---|",
  ]
  for group in largest(collectives, top):
    lines.append(
      f"| {group['op']} | {group['tensor']} | {group['group_size']} | "
      f"{'backward' if group['backward'] else 'forward'} | `{group['source']}` | {group['executions']} | "
      f"{mib(group['sent_bytes'])} |"
    )
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.bench collectives",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  memory.add_config_flags(parser)
  parser.add_argument("--top", type=int, default=15, help="how many of the largest collectives to list")
  args = parser.parse_args(argv)
  for row in memory.analyze_configs(parser, args, with_collectives=True):
    print(report(row, args.top) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
