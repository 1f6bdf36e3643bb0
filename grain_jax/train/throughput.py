"""Throughput and model FLOPs utilization (MFU): the arithmetic behind training's metrics rows
(`step_report`) and `python -m grain_jax.bench step`.

Units: time in seconds of wall clock; FLOPs are floating-point operations (a multiply-add counts
2), and a step's model FLOPs are its matmuls, counted by `grain_jax.train.flops` from the step
without remat, so the forward pass that remat computes again does not count; peaks are FLOP/s of
one device (a chip). Pure functions: what is logged about a missing peak is the caller's.
"""

from grain_jax.hardware import chip_of_device


def per_second(count: float, seconds: float) -> float:
  """`count` things (images, FLOPs) done in `seconds` -> things per second."""
  return count / seconds


def model_flops_utilization(flops: float, seconds: float, num_devices: int, peak_flops_per_device: float) -> float:
  """The fraction of `num_devices` devices' peak (each `peak_flops_per_device` FLOP/s) that
  `flops` model FLOPs done in `seconds` achieve: 1.0 is every device at its peak the whole time."""
  return per_second(flops, seconds) / (num_devices * peak_flops_per_device)


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
  """The dense bf16 peak (FLOP/s) of one device: `override` when > 0 (`config.train.peak_flops_per_device`),
  else the hardware table's for `device_kind` (`jax.Device.device_kind`); None when neither
  knows it (a CPU, a chip the table lacks)."""
  if override > 0:
    return float(override)
  chip = chip_of_device(device_kind)
  return None if chip is None else chip.peak_bf16_flops
