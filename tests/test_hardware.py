"""The hardware table (grain_jax/hardware.py): its facts agree with each other and with the mesh
presets, and `python -m grain_jax.hardware` answers the launch scripts."""

import math
import subprocess
import sys

import pytest

from grain_jax import hardware
from grain_jax.config import meshes, recipe
from grain_jax.hardware import CHIPS, MACHINES

# Cloud TPU accelerator types count TensorCores for v4 and v5p (2 per chip, which JAX runs as one
# device), chips for v5e.
CORES_PER_DEVICE = {"v4": 2, "v5p": 2, "v5litepod": 1}


def test_a_device_kind_names_one_chip():
  kinds = [kind for chip in CHIPS.values() for kind in chip.device_kinds]
  assert len(kinds) == len(set(kinds))
  for chip in CHIPS.values():
    assert all(hardware.chip_of_device(kind) is chip for kind in chip.device_kinds)
  assert hardware.chip_of_device("cpu") is None
  assert hardware.chip_of_device("NVIDIA H100 PCIe") is None  # another peak: not taken for the SXM part


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_a_machine_agrees_with_its_chip_and_accelerator_type(name):
  machine = MACHINES[name]
  chip = CHIPS[machine.chip]
  assert machine.devices % machine.hosts == 0
  if machine.accelerator:
    tpu_type, _, cores = machine.accelerator.rpartition("-")
    assert tpu_type == chip.tpu_type and int(cores) == machine.devices * CORES_PER_DEVICE[tpu_type]
  else:
    assert not chip.tpu_type and not machine.tpu_topology


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_the_fixed_size_mesh_presets_fit_their_machines(name):
  preset = meshes.MESHES[name]
  sizes = [preset[axis] for axis in ("data", "fsdp", "tensor")]
  fixed = math.prod(size for size in sizes if size != -1)
  assert (MACHINES[name].devices % fixed == 0) if -1 in sizes else (MACHINES[name].devices == fixed)
  assert preset["multiprocess"] == (MACHINES[name].hosts > 1)
  assert name in recipe.FITS


@pytest.mark.parametrize(
  "accelerator, field, value",
  [
    ("v5p-128", "mesh_preset", "tpu_v5p_128"),
    ("v5litepod-64", "mesh_preset", "tpu_v5e_64"),
    ("v5p-8", "mesh_preset", ""),
    ("v5p-8", "runtime_version", "v2-alpha-tpuv5"),
    ("v6e-256", "runtime_version", "v2-alpha-tpuv6e"),
    ("v9-8", "runtime_version", ""),
    ("v5p", "runtime_version", ""),
  ],
)
def test_the_command_prints_a_field_of_an_accelerator_type(accelerator, field, value):
  result = subprocess.run(
    [sys.executable, "-m", "grain_jax.hardware", accelerator, field], capture_output=True, text=True, check=True
  )
  assert result.stdout == value + "\n"


@pytest.mark.parametrize("args", [[], ["v5p-128"], ["v5p-128", "peak"]])
def test_the_command_refuses_a_malformed_call(args, capsys):
  assert hardware.main(args) == 2
  assert "usage: python -m grain_jax.hardware ACCELERATOR {mesh_preset|runtime_version}" in capsys.readouterr().err
