"""The hardware table: the chips grain-jax knows, and the machines behind the fixed-size mesh presets.

The one home of these facts. The mesh presets (`grain_jax/config/meshes.py`), the MFU's peak
(`grain_jax/train/throughput.py`), `python -m grain_jax.bench memory` and the launch scripts read
them here; the scripts ask `python -m grain_jax.hardware ACCELERATOR FIELD` (`launch/lib.sh`).

Peaks are the vendors' per-chip figures for dense bfloat16 matmuls:
- Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), "peak
  compute per chip (bf16)": v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s.
- NVIDIA's H100 and H200 datasheets list BF16 Tensor Core 1,979 TFLOP/s for the SXM parts "with
  sparsity"; dense is half: 989 TFLOP/s.
"""

# The launch scripts run this module with the python3 of the machine they start from (a laptop's
# may be older than the package's 3.11): annotations stay strings, and only the standard library is used.
from __future__ import annotations

import dataclasses
import sys


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip, which JAX runs as one device (TPU v4 and v5p chips too: megacore).

  device_kinds: the `jax.Device.device_kind` names of the chip, exact, so that a variant with
    another peak (an H100 PCIe, an H200 NVL) is not taken for it; JAX names v5e "TPU v5 lite", v5p
    "TPU v5", v6e "TPU v6 lite".
  peak_bf16_flops: dense bfloat16 matmul peak of one chip, FLOP/s.
  tpu_type: the Cloud TPU accelerator type's prefix ("v5p" of "v5p-128"); "" for a GPU.
  runtime_version: the TPU VM software version `launch/tpu_pod.sh` creates a slice with; "" for a GPU.
  """

  device_kinds: tuple[str, ...]
  peak_bf16_flops: float
  tpu_type: str = ""
  runtime_version: str = ""


CHIPS = {
  "TPU v4": Chip(("TPU v4",), 275e12, "v4", "tpu-ubuntu2204-base"),
  "TPU v5e": Chip(("TPU v5 lite", "TPU v5e"), 197e12, "v5litepod", "v2-alpha-tpuv5-lite"),
  "TPU v5p": Chip(("TPU v5", "TPU v5p"), 459e12, "v5p", "v2-alpha-tpuv5"),
  "TPU v6e": Chip(("TPU v6 lite", "TPU v6e"), 918e12, "v6e", "v2-alpha-tpuv6e"),
  "H100 SXM 80GB": Chip(("NVIDIA H100 80GB HBM3",), 989e12),
  "H200": Chip(("NVIDIA H200",), 989e12),
}


@dataclasses.dataclass(frozen=True)
class Machine:
  """The machine behind a fixed-size mesh preset.

  chip: its key in CHIPS.
  devices: JAX devices (chips) in all; hosts: the machines (one process each) they sit in.
  memory_gib: memory of one device, GiB (an H100's 80 GB: nvidia-smi reports 81,559 MiB).
  accelerator: the Cloud TPU accelerator type that creates it; TPU v4 and v5p types count
    TensorCores (2 per chip), v5e types count chips. "" for GPUs.
  tpu_topology: the slice's chips per dimension, which `python -m grain_jax.bench memory` compiles
    for deviceless; "" where there is none: GPUs, and TPU v4, whose deviceless devices are
    TensorCores rather than the one device per chip (megacore) that a v4 slice runs.
  """

  chip: str
  devices: int
  hosts: int
  memory_gib: float
  accelerator: str = ""
  tpu_topology: str = ""


MACHINES = {
  # The paper's machine: 2 nodes x 8 H100.
  "gpu_2x8_h100": Machine("H100 SXM 80GB", devices=16, hosts=2, memory_gib=79.6),
  "tpu_v4_32": Machine("TPU v4", devices=16, hosts=4, memory_gib=32.0, accelerator="v4-32"),
  "tpu_v5e_64": Machine(
    "TPU v5e", devices=64, hosts=16, memory_gib=16.0, accelerator="v5litepod-64", tpu_topology="v5e:8x8"
  ),
  "tpu_v5p_128": Machine(
    "TPU v5p", devices=64, hosts=16, memory_gib=95.0, accelerator="v5p-128", tpu_topology="v5p:4x4x4"
  ),
}


def chip_of_device(device_kind: str) -> Chip | None:
  """The chip whose `device_kinds` holds `device_kind` (`jax.Device.device_kind`), None when unknown."""
  return next((chip for chip in CHIPS.values() if device_kind in chip.device_kinds), None)


def mesh_preset(accelerator: str) -> str:
  """The mesh preset of the machine a Cloud TPU accelerator type ("v5p-128") creates; "" when no
  preset runs on it."""
  return next((name for name, machine in MACHINES.items() if machine.accelerator == accelerator), "")


def runtime_version(accelerator: str) -> str:
  """The TPU VM software version for an accelerator type ("v5p-128": its generation's); "" when
  unknown."""
  tpu_type = accelerator.rpartition("-")[0]
  return next((chip.runtime_version for chip in CHIPS.values() if tpu_type and chip.tpu_type == tpu_type), "")


# What `python -m grain_jax.hardware ACCELERATOR FIELD` answers.
FIELDS = {"mesh_preset": mesh_preset, "runtime_version": runtime_version}


def main(argv: list[str]) -> int:
  """Prints the FIELD of a Cloud TPU accelerator type, an empty line when the table has none;
  status 2 for a malformed call."""
  if len(argv) != 2 or argv[1] not in FIELDS:
    print(f"usage: python -m grain_jax.hardware ACCELERATOR {{{'|'.join(FIELDS)}}}", file=sys.stderr)
    return 2
  print(FIELDS[argv[1]](argv[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
