"""Scalars to TensorBoard event files and to `metrics.jsonl` in the workdir (process 0 only).

A resumed run first drops the `metrics.jsonl` rows past the step it resumed from: those steps run
again and write their rows anew. (TensorBoard shows the newest value of a repeated step.) A run
that starts from step 0 without a checkpoint keeps an earlier run's rows as `metrics.<n>.jsonl`.

Each row is appended and the file closed, and the TensorBoard events are flushed (tensorboardX fsyncs
its file, or uploads it to a gs:// workdir) at every row: on a gcsfuse mount a file reaches the bucket
only on close (or on fsync, with streaming writes off), so a run's metrics would otherwise show up in
the bucket only when it ends, and a hard kill would lose them.
"""

import json
import logging
import os

import jax
from tensorboardX import SummaryWriter

from grain_jax import files


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
  if not files.exists(path):
    return
  lines = files.read_text(path).splitlines(keepends=True)
  steps = [_step(line) for line in lines]
  kept = [line for line, row_step in zip(lines, steps) if row_step is not None and row_step <= step]
  unreadable = steps.count(None)
  if unreadable:
    logging.warning(
      "%s: dropped %d lines that are not JSON rows with a step (a row cut short by a kill, or garbage)",
      path,
      unreadable,
    )
  if len(kept) < len(lines):
    files.replace_durably(path, "".join(kept))


class MetricsWriter:
  """Writes one record per logged step: the train metrics and the data pipeline's skip counts."""

  def __init__(self, workdir: str, first_step: int = 0):
    """`first_step`: the restored step training starts from (its later rows are dropped); 0 when no
    checkpoint was restored, and an earlier run's metrics.jsonl is then kept as metrics.<n>.jsonl."""
    self.active = jax.process_index() == 0
    if self.active:
      self.path = os.path.join(workdir, "metrics.jsonl")
      if first_step == 0 and files.exists(self.path) and files.size(self.path):
        logging.warning(
          "this run starts from step 0: the earlier run's %s is now %s", self.path, files.keep_earlier(self.path)
        )
      drop_rows_after(self.path, first_step)
      self.summary = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
    files.append_line(self.path, json.dumps(dict(step=step, **scalars)) + "\n")
    self.summary.flush()

  def close(self) -> None:
    if self.active:
      self.summary.close()
