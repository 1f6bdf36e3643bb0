"""Mesh presets: `configs/base.py:<model>,<mesh>` (e.g. `configs/base.py:b16,tpu_v5p_128`).

Each preset sets `config.mesh` (data x fsdp x tensor; -1 = the rest of the devices) and whether
the job spans several processes (`jax.distributed.initialize()`, auto-detected on Cloud TPU and
SLURM). The per-device batch is `config.data.batch_size / number of devices`.
"""

MESHES = {
    # One process, every local device data-parallel (laptop CPU, one GPU, tests).
    "cpu": dict(data=-1, fsdp=1, tensor=1, multiprocess=False),
    # One node of 8 GPUs: parameters and optimizer state sharded over the node (FSDP).
    "gpu_node": dict(data=1, fsdp=-1, tensor=1, multiprocess=False),
    # Several GPU nodes under SLURM (one process per node or per GPU): FSDP inside, data across.
    "gpu_multinode": dict(data=-1, fsdp=8, tensor=1, multiprocess=True),
    # The paper's machine, 2 nodes x 8 H100: FSDP inside a node (NVLink), data across (InfiniBand).
    "gpu_2x8_h100": dict(data=2, fsdp=8, tensor=1, multiprocess=True),
    # Cloud TPU slices, one process per host. v4-32: FSDP over the whole slice. v5e-64 (an 8x8 torus)
    # and v5p-128 (4x4x4): the TPU compiler writes weight gathers and gradient reductions over all 64
    # chips as all-reduces (v5p: all of them; v5e: most), about twice the bytes;
    # FSDP over 16 chips keeps them all-gathers and reduce-scatters, and data parallelism over the 4
    # groups adds a small gradient all-reduce (`python -m grain_jax.bench collectives`).
    "tpu_v4_32": dict(data=1, fsdp=-1, tensor=1, multiprocess=True),
    "tpu_v5e_64": dict(data=-1, fsdp=16, tensor=1, multiprocess=True),
    "tpu_v5p_128": dict(data=-1, fsdp=16, tensor=1, multiprocess=True),
}

# The machines behind the fixed-size presets: JAX devices, hosts, memory per device (GiB), and for
# TPUs the slice's topology (chips per dimension), which `python -m grain_jax.bench memory` compiles
# for deviceless. TPU v4 and v5p names count TensorCores (2 per chip, one JAX device per chip), v5e
# names count chips. No v4 topology: libtpu's deviceless v4 devices are TensorCores, not the
# one-device-per-chip (megacore) layout a v4 slice runs. H100: 80 GB, of which nvidia-smi reports
# 81,559 MiB.
HARDWARE = {
    "gpu_2x8_h100": dict(devices=16, hosts=2, memory_gib=79.6, device="H100 SXM 80GB"),
    "tpu_v4_32": dict(devices=16, hosts=4, memory_gib=32.0, device="TPU v4"),
    "tpu_v5e_64": dict(devices=64, hosts=16, memory_gib=16.0, device="TPU v5e", tpu_topology="v5e:8x8"),
    "tpu_v5p_128": dict(devices=64, hosts=16, memory_gib=95.0, device="TPU v5p", tpu_topology="v5p:4x4x4"),
}


def apply(config, name: str) -> None:
  """Sets `config.mesh` and `config.train.multiprocess` from preset `name`."""
  if name not in MESHES:
    raise ValueError(f"mesh preset {name!r} is unknown; choose one of {sorted(MESHES)}")
  preset = dict(MESHES[name])
  config.train.multiprocess = preset.pop("multiprocess")
  config.mesh.update(preset)
