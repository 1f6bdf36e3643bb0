"""Scalars to TensorBoard event files and to `metrics.jsonl` in the workdir (process 0 only).

A resumed run first drops the `metrics.jsonl` rows past the step it resumed from: those steps run
again and write their rows anew. (TensorBoard shows the newest value of a repeated step.) A run
that starts from step 0 without a checkpoint keeps an earlier run's rows as `metrics.<n>.jsonl`.

Each row is fsynced, and the TensorBoard events are flushed (tensorboardX fsyncs its file) at every
row: on a gcsfuse mount a file reaches the bucket only on fsync or close, so without it a run's
metrics would show up in the bucket only when it ends.
"""

import json
import logging
import os

import jax
from tensorboardX import SummaryWriter

from grain_jax.files import replace_durably
from grain_jax.train.workdir_files import keep_earlier


def _step(line: str) -> int | None:
  """The "step" of a complete JSON row, None for a line that is not one (cut short by a kill, garbage)."""
  try:
    row = json.loads(line) if line.endswith("\n") else None
  except ValueError:
    return None
  step = row.get("step") if isinstance(row, dict) else None
  return step if isinstance(step, int) else None


def drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSON-lines file `path` (atomically) without its rows whose "step" is past `step`,
  and without lines that are not rows (counted in a warning)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  steps = [_step(line) for line in lines]
  kept = [line for line, row_step in zip(lines, steps) if row_step is not None and row_step <= step]
  unreadable = steps.count(None)
  if unreadable:
    logging.warning("%s: dropped %d lines that are not JSON rows with a step (a row cut short by a kill, or "
                    "garbage)", path, unreadable)
  if len(kept) < len(lines):
    replace_durably(path, "".join(kept))


class MetricsWriter:
  """Writes one record per logged step: the train metrics and the data pipeline's skip counts."""

  def __init__(self, workdir: str, first_step: int = 0):
    """`first_step`: the restored step training starts from (its later rows are dropped); 0 when no
    checkpoint was restored, and an earlier run's metrics.jsonl is then kept as metrics.<n>.jsonl."""
    self.active = jax.process_index() == 0
    if self.active:
      path = os.path.join(workdir, "metrics.jsonl")
      if first_step == 0 and os.path.exists(path) and os.path.getsize(path):
        logging.warning("this run starts from step 0: the earlier run's %s is now %s", path, keep_earlier(path))
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
    os.fsync(self.jsonl.fileno())
    self.summary.flush()

  def close(self) -> None:
    if self.active:
      self.summary.close()
      self.jsonl.close()
