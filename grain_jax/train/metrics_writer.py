"""Scalars to TensorBoard event files and to `metrics.jsonl` in the workdir (process 0 only)."""

import json
import os

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Writes one record per logged step: the train metrics and the data pipeline's skip counts."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      self.summary = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

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
