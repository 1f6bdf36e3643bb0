"""Scalars to TensorBoard event files and to `metrics.jsonl` in the workdir (process 0 only).

A resumed run first drops the `metrics.jsonl` rows past the step it resumed from: those steps run
again and write their rows anew. (TensorBoard shows the newest value of a repeated step.)
"""

import json
import os

import jax
from tensorboardX import SummaryWriter


def drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSON-lines file `path` (atomically) without its rows whose "step" is past `step`,
  and without a last row cut short by a kill."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
  if len(kept) < len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsWriter:
  """Writes one record per logged step: the train metrics and the data pipeline's skip counts."""

  def __init__(self, workdir: str, first_step: int = 0):
    """`first_step`: the step training starts from; rows after it are dropped."""
    self.active = jax.process_index() == 0
    if self.active:
      path = os.path.join(workdir, "metrics.jsonl")
      drop_rows_after(path, first_step)
      self.summary = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = open(path, "a")

  def write(self, step: int, metrics: dict[str, float], data_stats=None) -> None:
    """`data_stats`: the pipeline's DataStats; its skips per reason are logged as `data/...`."""
    if not self.active:
      return
    scalars = dict(metrics)
    if data_stats is not None:
      scalars["data/seen"] = float(data_stats.seen)
      scalars.update({f"data/skipped_{reason}": float(count) for reason, count in data_stats.skipped.items()})
    for name, value in scalars.items():
      self.summary.add_scalar(name, value, step)
    self.jsonl.write(json.dumps(dict(step=step, **scalars)) + "\n")
    self.jsonl.flush()

  def close(self) -> None:
    if self.active:
      self.summary.close()
      self.jsonl.close()
