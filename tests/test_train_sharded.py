"""Sharded training: the same steps on several meshes give the loss trajectory of one device."""

import jax
import numpy as np
import pytest

from grain_jax import sharding
from grain_jax.config import load_config
from grain_jax.data import pipeline, synthetic
from grain_jax.train import trainer

pytestmark = pytest.mark.integration

NUM_STEPS = 3


@pytest.fixture(scope="module")
def config():
  config = load_config("configs/base.py:tiny")
  config.data.batch_size = 8
  config.data.synthetic.update(num_train=32, images_per_class=1, num_retrieval=2, num_grounding=2)
  config.train.num_steps = NUM_STEPS
  config.optim.update(warmup_steps=1, learning_rate=3e-3)
  return config


@pytest.fixture(scope="module")
def batches(config, tmp_path_factory):
  data_dir = synthetic.for_config(config, str(tmp_path_factory.mktemp("workdir")))["train"]
  iterator = iter(pipeline.train_dataset_from_config(config, data_dir))
  return [next(iterator) for _ in range(NUM_STEPS)]


def losses_on(config, batches, mesh_sizes, devices):
  """The metrics of each step on a mesh, each batch's texts packed for that mesh (one group per batch
  shard: on 8 shards a group is one example)."""
  mesh = sharding.make_mesh(mesh_sizes, devices)
  shards = sharding.batch_shards(mesh, config.sharding_rules)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    training = trainer.build_training(config, mesh)
    state, trajectory = training.state, []
    for batch in batches:
      state, metrics = training.step_fn(state, trainer.global_batch(trainer.pack_texts(batch, config, shards), mesh))
      trajectory.append({name: float(value) for name, value in metrics.items()})
  return trajectory


@pytest.fixture(scope="module")
def one_device(config, batches):
  return losses_on(config, batches, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


@pytest.mark.parametrize(
  "mesh_sizes", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=4, tensor=1), dict(data=2, fsdp=2, tensor=2)]
)
def test_meshes_follow_the_single_device_trajectory(config, batches, one_device, mesh_sizes):
  sharded = losses_on(config, batches, mesh_sizes, jax.devices())
  assert one_device[-1]["loss"] != one_device[0]["loss"]
  for reference, got in zip(one_device, sharded):
    for name in ("loss", "loss_ic", "loss_l1", "loss_giou", "loss_rd", "grad_norm"):
      np.testing.assert_allclose(got[name], reference[name], rtol=2e-4, err_msg=name)
