"""Mesh presets: `configs/base.py:<model>,<mesh>` (e.g. `configs/base.py:b16,tpu_v5p_128`).

Each preset sets `config.mesh` (data x fsdp x tensor; -1 = the rest of the devices) and whether
the job spans several processes (`jax.distributed.initialize()`, auto-detected on Cloud TPU and
SLURM). The per-device batch is `config.data.batch_size / number of devices`. The fixed-size
presets are named after their machines in `grain_jax.hardware.MACHINES` (devices, hosts, chip),
which also say whether they span several processes.
"""

from grain_jax.errors import ConfigError
from grain_jax.hardware import MACHINES


def _on_machine(name: str, **axes) -> dict:
  """A fixed-size preset's axes; several processes when machine `name` has several hosts."""
  return dict(axes, multiprocess=MACHINES[name].hosts > 1)


MESHES = {
  # One process, every local device data-parallel (laptop CPU, one GPU, tests).
  "cpu": dict(data=-1, fsdp=1, tensor=1, multiprocess=False),
  # One node of 8 GPUs: parameters and optimizer state sharded over the node (FSDP).
  "gpu_node": dict(data=1, fsdp=-1, tensor=1, multiprocess=False),
  # Several GPU nodes under SLURM (one process per node or per GPU): FSDP inside, data across.
  "gpu_multinode": dict(data=-1, fsdp=8, tensor=1, multiprocess=True),
  # The paper's machine, 2 nodes x 8 H100: FSDP inside a node (NVLink), data across (InfiniBand).
  "gpu_2x8_h100": _on_machine("gpu_2x8_h100", data=2, fsdp=8, tensor=1),
  # Cloud TPU slices. v4-32: FSDP over the whole slice. v5e-64 (an 8x8 torus) and v5p-128
  # (4x4x4): the TPU compiler writes weight gathers and gradient reductions over all 64
  # chips as all-reduces (v5p: all of them; v5e: most), about twice the bytes;
  # FSDP over 16 chips keeps them all-gathers and reduce-scatters, and data parallelism over the 4
  # groups adds a small gradient all-reduce (`python -m grain_jax.bench collectives`).
  "tpu_v4_32": _on_machine("tpu_v4_32", data=1, fsdp=-1, tensor=1),
  "tpu_v5e_64": _on_machine("tpu_v5e_64", data=-1, fsdp=16, tensor=1),
  "tpu_v5p_128": _on_machine("tpu_v5p_128", data=-1, fsdp=16, tensor=1),
}


def apply(config, name: str) -> None:
  """Sets `config.mesh` and `config.train.multiprocess` from preset `name`."""
  if name not in MESHES:
    raise ConfigError(f"mesh preset {name!r} is unknown; choose one of {sorted(MESHES)}")
  preset = dict(MESHES[name])
  config.train.multiprocess = preset.pop("multiprocess")
  config.mesh.update(preset)
