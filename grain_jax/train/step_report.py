"""What a training run reports around its steps: the profiler window, throughput and model FLOPs
utilization, the skipped-update warning, the progress bar and the metrics rows.

Every `log_every` steps (and at the last one) it fetches the step's metrics and adds, over the steps
since the previous row: `images_per_second`, `skipped_steps_total` and, where the device's bf16 peak
is known (`config.train.peak_flops_per_device`, else `grain_jax/hardware.py`'s), `mfu`: the steps' model
FLOPs (their matmuls) per second over the peak of all devices (`throughput`).
"""

import logging
import os
import time

import jax
import tqdm

from grain_jax.train import throughput
from grain_jax.train.metrics_writer import MetricsWriter

BAR_FIELDS = ("loss", "loss_ic", "loss_l1", "loss_giou", "loss_rd", "box_spread_ratio", "images_per_second", "mfu")


class StepReport:
  """Call `started(step)` before and `ended(step, state, metrics, flops, data_stats)` after each
  step, `close()` at the end; `last_metrics` holds the latest logged row. `peak_flops`: one device's
  bf16 peak (FLOP/s), None where it is not known and no mfu is logged (said once in the log)."""

  def __init__(self, config, workdir: str, first_step: int, last_step: int, skipped_before: float):
    """`skipped_before`: the restored state's count of skipped updates."""
    self.log_every = config.train.log_every
    self.batch_size = config.data.batch_size
    self.profile = tuple(config.train.profile_steps)
    self.profile_dir = os.path.join(workdir, "profile")
    self.last_step = last_step
    device_kind = jax.devices()[0].device_kind
    self.peak_flops = throughput.peak_flops_per_device(device_kind, config.train.peak_flops_per_device)
    if self.peak_flops is None:
      logging.info(
        "no mfu: the bf16 peak of a %r device is not known (set config.train.peak_flops_per_device to log it)",
        device_kind,
      )
    self.writer = MetricsWriter(workdir, first_step)
    self.bar = tqdm.tqdm(
      total=config.train.num_steps,
      initial=first_step,
      desc="train",
      unit="step",
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
    )
    self.skipped_logged = skipped_before
    self.last_metrics: dict[str, float] = {}
    self._restart_window()

  def _restart_window(self) -> None:
    self.window_start, self.window_steps, self.window_flops = time.perf_counter(), 0, 0

  def started(self, step: int) -> None:
    if self.profile and step == self.profile[0]:
      jax.profiler.start_trace(self.profile_dir)

  def ended(self, step: int, state, metrics: dict[str, jax.Array], flops: int | None, data_stats) -> None:
    """After step `step` (0-based) produced `state` and `metrics`; `flops`: its model FLOPs, None
    when not counted."""
    self.window_steps += 1
    self.window_flops += flops or 0
    if self.profile and step == self.profile[-1]:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
    done = step + 1
    if done % self.log_every == 0 or done == self.last_step:
      self._log(done, state, metrics, data_stats)
    self.bar.update(1)

  def _log(self, done: int, state, metrics, data_stats) -> None:
    row = {name: float(value) for name, value in jax.device_get(metrics).items()}
    elapsed = time.perf_counter() - self.window_start
    row["images_per_second"] = throughput.per_second(self.window_steps * self.batch_size, elapsed)
    if self.peak_flops is not None and self.window_flops:
      row["mfu"] = throughput.model_flops_utilization(self.window_flops, elapsed, jax.device_count(), self.peak_flops)
    row["skipped_steps_total"] = float(state.skipped_steps)
    self.writer.write(done, row, data_stats)
    self.bar.set_postfix({name: f"{row[name]:.3g}" for name in BAR_FIELDS if name in row})
    if row["skipped_steps_total"] > self.skipped_logged:
      logging.warning(
        "steps %d-%d: %d updates skipped because the loss or gradients were not finite (%d in all)",
        done - self.window_steps + 1,
        done,
        row["skipped_steps_total"] - self.skipped_logged,
        row["skipped_steps_total"],
      )
      self.skipped_logged = row["skipped_steps_total"]
    self.last_metrics = row
    self._restart_window()

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
