"""`checkpoint.restore_model`, the one way evaluation and export restore a model: the parameters of the
newest intact checkpoint, sharded over the mesh, in eval mode; errors that name the workdir; the
workdir only read."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grain_jax import sharding
from grain_jax.config import load_config
from grain_jax.models.grain import build_model
from grain_jax.train import optim, trainer
from grain_jax.train.checkpoint import (
  CHECKSUMS,
  Checkpointer,
  CheckpointMismatchError,
  NoReadableCheckpointError,
  checkpoint_dir,
  restore_model,
)

STEP = 5


def tiny_config():
  config = load_config("configs/base.py:tiny")
  config.mesh.update(data=2, fsdp=4)
  return config


def files_of(folder) -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir holding a step-5 checkpoint of the tiny model with parameters other than its
  initial ones: (workdir, the saved parameters by path)."""
  config = tiny_config()
  model = build_model(config.model, config.seed)
  params = jax.tree.map(lambda x: x + 1.0, nnx.state(model, nnx.Param))
  nnx.update(model, params)
  state = trainer.init_state(model, optim.make_optimizer(params, config.optim, 10))
  workdir = str(tmp_path_factory.mktemp("run"))
  checkpointer = Checkpointer(checkpoint_dir(workdir), keep=1, async_save=False)
  checkpointer.save(state._replace(step=jnp.int32(STEP)), iter(grain.MapDataset.range(4).to_iter_dataset()))
  checkpointer.close()
  return workdir, {path: np.asarray(value) for path, value in nnx.to_flat_state(params)}


def test_the_newest_checkpoint_restores_sharded_in_eval_mode(saved):
  workdir, params = saved
  config = tiny_config()
  mesh = sharding.make_mesh(config.mesh)
  before = files_of(workdir)
  model, step = restore_model(config, workdir, mesh)
  dropouts = [module for _, module in nnx.iter_modules(model) if isinstance(module, nnx.Dropout)]
  assert step == STEP and dropouts and all(dropout.deterministic for dropout in dropouts)  # eval mode
  restored = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert restored.keys() == params.keys()
  for path, value in params.items():
    np.testing.assert_array_equal(restored[path], value, err_msg=str(path))
  shardings = [leaf.sharding for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]
  assert all(leaf.mesh == mesh for leaf in shardings) and any("fsdp" in str(leaf.spec) for leaf in shardings)
  assert files_of(workdir) == before


@pytest.mark.parametrize("made", [True, False])
def test_a_workdir_without_a_checkpoint_is_named(tmp_path, made):
  workdir = tmp_path / "run"
  if made:
    workdir.mkdir()
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match=f"--workdir {workdir} holds no checkpoint"):
    restore_model(config, str(workdir), sharding.make_mesh(config.mesh))
  assert made == workdir.exists() and (not made or not os.listdir(workdir))  # only read: nothing made


def test_a_damaged_checkpoint_is_named_and_left_in_place(saved, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(saved[0], workdir)
  path = os.path.join(checkpoint_dir(workdir), str(STEP), CHECKSUMS, "metadata")
  with open(path) as f:
    checksums = json.load(f)
  checksums[next(name for name in checksums if name.startswith("params/"))] ^= 1
  with open(path, "w") as f:
    json.dump(checksums, f)
  before = files_of(workdir)
  config = tiny_config()
  with pytest.raises(NoReadableCheckpointError, match=f"every checkpoint in {checkpoint_dir(workdir)} is corrupt"):
    restore_model(config, workdir, sharding.make_mesh(config.mesh))
  assert files_of(workdir) == before


def test_another_models_checkpoint_is_refused(saved):
  config = tiny_config()
  config.model.decoder.num_region_queries += 1
  with pytest.raises(CheckpointMismatchError, match=f"in {checkpoint_dir(saved[0])} does not fit this config"):
    restore_model(config, saved[0], sharding.make_mesh(config.mesh))
