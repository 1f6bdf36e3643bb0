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
    # Cloud TPU slices, one process per host: FSDP over the whole slice.
    "tpu_v4_32": dict(data=1, fsdp=-1, tensor=1, multiprocess=True),
    "tpu_v5e_64": dict(data=1, fsdp=-1, tensor=1, multiprocess=True),
    "tpu_v5p_128": dict(data=1, fsdp=-1, tensor=1, multiprocess=True),
}


def apply(config, name: str) -> None:
  """Sets `config.mesh` and `config.train.multiprocess` from preset `name`."""
  if name not in MESHES:
    raise ValueError(f"mesh preset {name!r} is unknown; choose one of {sorted(MESHES)}")
  preset = dict(MESHES[name])
  config.train.multiprocess = preset.pop("multiprocess")
  config.mesh.update(preset)
