"""The logical-axis policy: mesh construction and logical name -> PartitionSpec mapping."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grain_jax import sharding
from grain_jax.bench import _hlo
from grain_jax.config import load_config

RULES = load_config("configs/base.py:tiny").sharding_rules
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_resolves_the_rest_axis():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 16) == (16, 1, 1)


def test_logical_names_map_through_the_rules():
  assert sharding.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length", "embed"), RULES) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("layers", "embed", "qkv", "heads", "kv"), RULES) == P(
    None, "fsdp", None, "tensor", None
  )
  assert sharding.logical_to_spec((None, "unknown_name"), RULES) == P(None, None)


def test_a_mesh_axis_is_used_once_per_array():
  assert sharding.logical_to_spec(("embed", "embed"), RULES) == P("fsdp", None)
  assert sharding.logical_to_spec(("mlp", "heads"), RULES) == P("tensor", None)


def test_constrain_is_a_noop_without_a_mesh_and_shards_within_one():
  x = np.ones((8, 4, 16), np.float32)
  np.testing.assert_array_equal(sharding.constrain(x, ("batch", "length", "embed")), x)
  mesh = sharding.make_mesh(dict(data=4, fsdp=2, tensor=1))
  with jax.set_mesh(mesh), sharding.axis_rules(RULES):
    y = jax.jit(lambda v: sharding.constrain(v * 2, ("batch", "length", "embed")))(x)
  assert y.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(y), x * 2)


def test_batch_shards_counts_the_devices_holding_distinct_rows():
  assert sharding.batch_shards(sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)), RULES) == 4
  assert sharding.batch_shards(sharding.make_mesh(dict(data=1, fsdp=1, tensor=8)), RULES) == 1


def test_activations_keep_the_residual_whole_and_split_heads_and_hidden_units_over_tensor():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  batch = ("data", "fsdp")
  cases = [
    (sharding.RESIDUAL, (8, 4, 16), P(batch, None, None)),
    (sharding.MLP_HIDDEN, (8, 4, 32), P(batch, None, "tensor")),
    (sharding.ATTENTION_HEADS, (8, 4, 2, 8), P(batch, None, "tensor", None)),
  ]
  with jax.set_mesh(mesh), sharding.axis_rules(RULES):
    for names, shape, expected in cases:
      y = jax.jit(lambda v, names=names: sharding.constrain(v + 1, names))(np.ones(shape, np.float32))
      assert y.sharding.is_equivalent_to(NamedSharding(mesh, expected), len(shape)), (names, y.sharding.spec)
    # a weight used inside a layer: FSDP's axis gathered, the tensor-parallel one kept
    kernel = jax.device_put(np.ones((16, 32), np.float32), NamedSharding(mesh, P("fsdp", "tensor")))
    used = jax.jit(lambda k: sharding.gathered(k * 2, ("embed", "mlp")))(kernel)
  assert used.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor")), 2), used.sharding.spec
  np.testing.assert_array_equal(np.asarray(used), 2 * np.ones((16, 32)))


def test_the_train_step_on_data_fsdp_tensor_compiles_without_replicating_activations():
  """XLA warns when it must replicate a tensor to reshard it (the token lookup used to replicate
  the global batch of texts on every device); the compile must not."""
  overrides = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "data.batch_size": 16}
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "grain_jax.bench.memory",
      "--worker",
      "--config",
      "configs/base.py:tiny",
      "--overrides",
      json.dumps(overrides),
    ],
    env=env,
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])["mesh"] == dict(data=2, fsdp=2, tensor=2)
  assert "Involuntary full rematerialization" not in result.stderr


def test_a_lookup_s_gradient_moves_rows_and_equals_the_plain_gather_s():
  """`sharding.looked_up` against `jnp.take`: same values and table gradient on a data x fsdp mesh, and
  no collective of the whole table's size (XLA's own gradient all-reduces a dense table)."""
  rng = np.random.default_rng(0)
  vocab, width = 50, 16
  table = rng.normal(size=(vocab, width)).astype(np.float32)
  ids = rng.integers(0, vocab, (8, 5)).astype(np.int32)
  ids[:, 0] = 7  # a token every row repeats, as SOT does
  weights = rng.normal(size=(8, 5, width)).astype(np.float32)
  plain = jax.value_and_grad(lambda t: (jax.numpy.take(t, ids, axis=0) * weights).sum())(table)
  config = load_config("configs/base.py:tiny")
  mesh = sharding.make_mesh(dict(data=2, fsdp=4, tensor=1))
  names = ("vocab", "embed")
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    placed = (
      jax.device_put(table, NamedSharding(mesh, sharding.logical_to_spec(names))),
      jax.device_put(ids, NamedSharding(mesh, sharding.logical_to_spec(("batch",)))),
      jax.device_put(weights, NamedSharding(mesh, sharding.logical_to_spec(("batch",)))),
    )
    step = jax.jit(jax.value_and_grad(lambda t, i, w: (sharding.looked_up(t, i, names) * w).sum()))
    value, gradient = step(*placed)
    hlo = step.lower(*placed).compile().as_text()
  np.testing.assert_allclose(float(value), float(plain[0]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gradient), np.asarray(plain[1]), rtol=1e-5, atol=1e-5)
  assert gradient.sharding.is_equivalent_to(placed[0].sharding, 2)
  table_bytes = vocab * width * 4
  assert all(c.tensor_bytes < table_bytes for c in _hlo.collectives(hlo)), [
    (c.op, c.tensor) for c in _hlo.collectives(hlo)
  ]
