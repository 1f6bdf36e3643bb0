"""The throughput and MFU arithmetic (grain_jax/train/throughput.py) against independent computations
on random windows of training, the peak it divides by, and training's per-step report built on it."""

import fractions
import json
import logging
import os

import jax
import ml_collections
import numpy as np
import pytest

from grain_jax.config import ConfigError, load_config, validate
from grain_jax.hardware import CHIPS
from grain_jax.train import throughput
from grain_jax.train.step_report import StepReport

SEEDS = range(40)


def random_window(seed: int) -> tuple[list[int], list[float], int, float]:
  """A random stretch of training: each step's model FLOPs and seconds, the device count and one
  device's peak (FLOP/s)."""
  rng = np.random.default_rng(seed)
  steps = int(rng.integers(1, 64))
  flops = [int(count) for count in rng.integers(1, 10**15, steps)]
  seconds = [float(s) for s in rng.uniform(1e-3, 30.0, steps)]
  devices = int(rng.choice([1, 2, 8, 16, 64, 256, 512]))
  peak = float(rng.choice([chip.peak_bf16_flops for chip in CHIPS.values()]) * rng.uniform(0.5, 2.0))
  return flops, seconds, devices, peak


@pytest.mark.parametrize("seed", SEEDS)
def test_mfu_is_the_time_at_peak_over_the_time_taken(seed):
  """How long the steps' FLOPs would take with every device at its peak, over how long they took,
  step by step in exact rational arithmetic."""
  flops, seconds, devices, peak = random_window(seed)
  at_peak = sum(fractions.Fraction(count) / (devices * fractions.Fraction(peak)) for count in flops)
  expected = at_peak / sum(fractions.Fraction(s) for s in seconds)
  mfu = throughput.model_flops_utilization(sum(flops), sum(seconds), devices, peak)
  assert mfu == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_mfu_scales_with_work_rate_devices_and_peak(seed):
  flops, seconds, devices, peak = random_window(seed)
  total, elapsed = sum(flops), sum(seconds)
  mfu = throughput.model_flops_utilization(total, elapsed, devices, peak)
  factor = float(np.random.default_rng(seed).uniform(0.1, 10.0))
  assert throughput.model_flops_utilization(total * factor, elapsed * factor, devices, peak) == pytest.approx(mfu)
  assert throughput.model_flops_utilization(total, elapsed * factor, devices, peak) == pytest.approx(mfu / factor)
  assert throughput.model_flops_utilization(total, elapsed, 2 * devices, peak) == pytest.approx(mfu / 2)
  assert throughput.model_flops_utilization(total, elapsed, devices, peak * factor) == pytest.approx(mfu / factor)
  # Every device at its peak for the whole time.
  assert throughput.model_flops_utilization(devices * peak * elapsed, elapsed, devices, peak) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_images_per_second_is_the_images_over_the_time(seed):
  _, seconds, _, _ = random_window(seed)
  images = 8 * len(seconds)
  expected = fractions.Fraction(images) / sum(fractions.Fraction(s) for s in seconds)
  assert throughput.per_second(images, sum(seconds)) == pytest.approx(float(expected), rel=1e-12)


def test_the_peak_is_the_configs_else_the_vendors_figure():
  assert throughput.peak_flops_per_device("TPU v4") == 275e12
  assert throughput.peak_flops_per_device("TPU v5 lite") == 197e12
  assert throughput.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
  assert throughput.peak_flops_per_device("TPU v4", override=5e14) == 5e14
  assert throughput.peak_flops_per_device("cpu") is None
  assert throughput.peak_flops_per_device("cpu", override=1e12) == 1e12
  for chip in CHIPS.values():
    assert all(throughput.peak_flops_per_device(kind) == chip.peak_bf16_flops for kind in chip.device_kinds)


def test_a_negative_peak_is_refused():
  config = load_config("configs/base.py:tiny")
  config.train.peak_flops_per_device = -1.0
  with pytest.raises(ConfigError, match="config.train.peak_flops_per_device=-1.0"):
    validate(config)


def report_config(peak: float) -> ml_collections.ConfigDict:
  train = dict(log_every=3, profile_steps=(), num_steps=3, peak_flops_per_device=peak)
  return ml_collections.ConfigDict(dict(train=train, data=dict(batch_size=4)))


def test_the_reports_mfu_is_the_windows_flops_over_the_devices_peak(tmp_path):
  """Against the throughput the same window gives: mfu = images/s / batch x FLOPs per step / peak."""
  report = StepReport(report_config(2e9), str(tmp_path), first_step=0, last_step=3, skipped_before=0.0)
  state = ml_collections.ConfigDict(dict(skipped_steps=0))
  for step, flops in enumerate([3e6, 5e6, 4e6]):
    report.ended(step, state, {"loss": np.float32(1.0)}, flops, None)
  report.close()
  row = report.last_metrics
  steps_per_second = row["images_per_second"] / 4
  np.testing.assert_allclose(row["mfu"], steps_per_second * 4e6 / (jax.device_count() * 2e9), rtol=1e-9)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    assert json.loads(f.read().splitlines()[-1])["mfu"] == row["mfu"]


def test_a_report_on_an_unknown_device_logs_no_mfu_and_says_so(tmp_path, caplog):
  with caplog.at_level(logging.INFO):
    report = StepReport(report_config(0.0), str(tmp_path), first_step=0, last_step=1, skipped_before=0.0)
  report.ended(0, ml_collections.ConfigDict(dict(skipped_steps=0)), {"loss": np.float32(1.0)}, 3e6, None)
  report.close()
  assert report.peak_flops is None and "images_per_second" in report.last_metrics and "mfu" not in report.last_metrics
  assert "no mfu" in caplog.text and repr(jax.devices()[0].device_kind) in caplog.text
