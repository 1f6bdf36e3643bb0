"""The memory benchmark: abstract training state equals the real one, and the compiled step's
argument bytes equal the per-device shards of the state and batch, counted independently."""

import importlib.util

import jax
import numpy as np
import pytest

from grain_jax import sharding
from grain_jax.bench import memory
from grain_jax.config import load_config
from grain_jax.hardware import MACHINES
from grain_jax.train import trainer

FSDP = {"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1}


def layout(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), tree)


def test_abstract_state_has_the_real_shapes_and_shardings():
  config = load_config("configs/base.py:tiny")
  config.update_from_flattened_dict(FSDP)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    real = trainer.build_training(config, mesh).state
    abstract = trainer.build_training(config, mesh, abstract=True).state
  assert layout(abstract) == layout(real)
  param_shardings = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, real.params))
  moment_shardings = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, real.opt_state[0].mu))
  assert moment_shardings == param_shardings
  assert any("fsdp" in str(s.spec) for s in moment_shardings)


def per_device_bytes(tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_arguments_are_the_state_and_batch_shards():
  overrides = {**FSDP, "model.kind": "clip", "data.batch_size": 16}  # clip: the quickest step to compile
  row = memory.analyze("configs/base.py:tiny", overrides)
  config = load_config("configs/base.py:tiny")
  config.update_from_flattened_dict(overrides)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    state = trainer.build_training(config, mesh, abstract=True).state
    batch = memory.abstract_batch(config, mesh)
  # jit drops the inputs plain CLIP does not read (boxes, descriptions).
  used_batch = per_device_bytes(
    [batch[key] for key in ("image", "text_tokens", "text_segments", "text_positions", "text_eot", "caption_slot")]
  )
  assert row["arguments"] == per_device_bytes(state) + used_batch
  assert row["aliased"] == per_device_bytes(state)  # the donated state is updated in place
  assert row["total"] == row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
  assert (row["devices"], row["per_device_batch"], row["mesh"]) == (8, 2, dict(data=2, fsdp=4, tensor=1))


def test_hardware_comes_from_the_mesh_preset_in_the_config_argument():
  assert memory.hardware_for("configs/cc12m_b16.py:grain,tpu_v5e_64").devices == 64
  assert memory.hardware_for("configs/base.py:b16,gpu_2x8_h100").memory_gib == 79.6
  assert memory.hardware_for("configs/base.py:tiny") is None


def test_tpu_topologies_have_the_presets_device_counts():
  for name, machine in MACHINES.items():
    if machine.tpu_topology:
      chips = np.prod([int(size) for size in machine.tpu_topology.split(":")[1].split("x")])
      assert chips == machine.devices, name
      has_libtpu = importlib.util.find_spec("libtpu") is not None
      assert memory.tpu_topology(machine) == (machine.tpu_topology if has_libtpu else None)
  assert memory.tpu_topology(MACHINES["gpu_2x8_h100"]) is None


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="needs the TPU extra: pip install -r requirements-tpu.txt"
)
def test_tpu_hardware_compiles_with_the_tpu_compiler_deviceless():
  overrides = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 1, "model.kind": "clip", "data.batch_size": 16}
  row = memory.analyze_in_subprocess("configs/base.py:tiny", 4, "v5p:2x2x1", overrides, with_collectives=True)
  assert row["compiler"].startswith("TPU v5p:2x2x1") and row["devices"] == 4
  # FSDP on 4 chips: the weights are all-gathered in the forward pass.
  assert any(c["op"] == "all-gather" and not c["backward"] for c in row["collectives"])


def test_table_marks_what_does_not_fit():
  row = dict(
    config="c",
    hardware="h",
    mesh=dict(data=1, fsdp=4, tensor=1),
    per_device_batch=2,
    dtype="bfloat16",
    remat=True,
    grad_accum_steps=1,
    arguments=2 * memory.GIB,
    outputs=memory.GIB,
    aliased=memory.GIB,
    temporaries=3 * memory.GIB,
    total=5 * memory.GIB,
  )
  row["compiler"] = "TPU v5p:2x2x1 (libtpu, deviceless)"
  fits, too_big = memory.table([dict(row, memory_gib=16.0), dict(row, memory_gib=4.0)]).splitlines()[2:]
  assert fits.endswith("| 5.00 | 16 | yes |") and too_big.endswith("| 5.00 | 4 | **no** |")
  assert "| 1 x 4 x 1 |" in fits and "bfloat16, remat, 1" in fits and "| TPU v5p:2x2x1 (libtpu, deviceless) |" in fits
