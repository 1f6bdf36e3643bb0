"""The paper's recipes (configs/cc3m_b16.py, configs/cc12m_b16.py): the hyperparameters of
docs/reference_behaviour.md, "Training", on every mesh preset."""

import math

import pytest

from grain_jax.config import load_config, recipe, validate
from grain_jax.hardware import MACHINES

RECIPES = {"configs/cc3m_b16.py": 3_318_333, "configs/cc12m_b16.py": 12_423_374}


@pytest.mark.parametrize("path", RECIPES)
@pytest.mark.parametrize("kind", recipe.KINDS)
@pytest.mark.parametrize("mesh", sorted(recipe.FITS))
def test_recipe_has_the_papers_hyperparameters(path, kind, mesh):
  devices = MACHINES[mesh].devices
  config = validate(load_config(f"{path}:{kind},{mesh}"), num_devices=devices)
  assert config.model.kind == ("grain" if kind == "grain_grounded" else kind) and config.model.preset == "b16"
  grounded = kind == "grain_grounded"
  assert (config.model.decoder.memory_position == "learned") == grounded
  assert config.loss.aux_layers == grounded and (config.loss.description_to_query > 0) == grounded
  assert (config.model.decoder.depth, config.model.decoder.width) == (6, 512)
  assert config.model.image.width == 768 and config.model.decoder.num_region_queries == 5
  assert config.data.batch_size == 2048 and config.data.batch_size % devices == 0
  epoch = math.ceil(RECIPES[path] / 2048)
  assert config.train.num_steps == 35 * epoch and config.optim.warmup_steps == epoch
  optim = config.optim
  assert (optim.learning_rate, optim.warmup_init, optim.end_learning_rate) == (1e-3, 1e-6, 1e-5)
  assert (optim.b1, optim.b2, optim.eps, optim.weight_decay) == (0.9, 0.98, 1e-8, 0.1)
  assert config.data.mllm_caption_prob == 0.5
  assert config.train.multiprocess
  assert config.model.remat == recipe.FITS[mesh]["remat"]
  # The authors' training choices (docs/authors_differences.md), ours in grain_grounded.
  authors = (
    config.loss.region_negatives,
    config.loss.mask_duplicate_descriptions,
    config.loss.box_normalization,
    config.loss.iou_union_epsilon,
    config.optim.weight_decay_exempt,
    config.model.image.init,
  )
  assert authors == (
    ("global", True, "global", 0.0, "rank_below_2", "trunc_normal")
    if grounded
    else ("per_device", False, "per_device", 1e-4, "authors_name_rule", "pytorch_default")
  )


def test_default_mesh_is_the_papers_machine():
  config = load_config("configs/cc12m_b16.py")
  assert (config.model.kind, config.mesh.data, config.mesh.fsdp) == ("grain", 2, 8)


@pytest.mark.parametrize("arg, named", [("vit", "'vit'"), ("grain,tpu_v9", "'tpu_v9'")])
def test_a_bad_argument_is_named(arg, named):
  with pytest.raises(ValueError, match=named):
    load_config(f"configs/cc3m_b16.py:{arg}")
