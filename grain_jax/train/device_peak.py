"""The dense bfloat16 matmul peak of one device, the denominator of model FLOPs utilization (MFU).

Vendors' published per-chip figures, keyed by `jax.Device.device_kind` (exact names, so that a
variant with another peak, e.g. an H100 PCIe or an H200 NVL, is not taken for the listed one):
- Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), "peak
  compute per chip (bf16)": v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s. JAX names v5e "TPU v5 lite",
  v5p "TPU v5", v6e "TPU v6 lite".
- NVIDIA's H100 and H200 datasheets list BF16 Tensor Core 1,979 TFLOP/s for the SXM parts "with
  sparsity"; dense is half: 989 TFLOP/s.
"""

import logging

PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_for(train_config, device_kind: str) -> float | None:
  """The bf16 FLOP/s of one device: `train_config.peak_flops_per_device` when set (> 0), else the
  table's for `device_kind`; None (said in the log) when neither knows it, e.g. on a CPU."""
  if train_config.peak_flops_per_device > 0:
    return float(train_config.peak_flops_per_device)
  peak = PEAK_BF16_FLOPS.get(device_kind)
  if peak is None:
    logging.info("no mfu: the bf16 peak of a %r device is not known (set config.train.peak_flops_per_device "
                 "to log it)", device_kind)
  return peak


def model_flops_utilization(flops: float, seconds: float, num_devices: int, peak_per_device: float) -> float:
  """The fraction of `num_devices` devices' peak that `flops` model FLOPs in `seconds` achieve."""
  return flops / seconds / (num_devices * peak_per_device)
