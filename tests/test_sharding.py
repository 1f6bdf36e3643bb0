"""The logical-axis policy: mesh construction and logical name -> PartitionSpec mapping."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from grain_jax import sharding
from grain_jax.config import load_config

RULES = load_config("configs/base.py:tiny").sharding_rules


def test_mesh_resolves_the_rest_axis():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 16) == (16, 1, 1)


def test_logical_names_map_through_the_rules():
  assert sharding.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length", "embed"), RULES) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec(("layers", "embed", "qkv", "heads", "kv"), RULES) == P(None, "fsdp", None,
                                                                                           "tensor", None)
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
