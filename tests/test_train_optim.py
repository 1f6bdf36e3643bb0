"""The weight-decay rules: ours by rank, the authors' by the PyTorch names their parameters have."""

import pytest
from flax import nnx

from grain_jax.config import ConfigError, load_config, validate
from grain_jax.models.grain import build_model
from grain_jax.torch_format import layout, param_tree
from grain_jax.train import optim


def authors_optim_policy(backbone: dict, decoder: dict) -> dict:
  """{(state dict, name): decayed} as the authors' `optim_policy` splits a DDP-wrapped model's
  `named_parameters()` (names prefixed `module.`) into parameter groups."""
  no_decay = [".ln_", ".bn", ".bias", ".logit_scale", ".entropy_scale"]
  decayed = {}
  for key in decoder:
    name = "module." + key
    decayed[layout.DECODER, key] = not any(part in name for part in no_decay)
  for key, value in backbone.items():
    name = "module." + key
    decayed[layout.BACKBONE, key] = not (value.ndim < 2 or "bias" in name or "ln" in name or "bn" in name)
  return decayed


def per_torch_key(mask, params, model_config) -> dict:
  """Our mask as {(state dict, PyTorch key): decayed}: every layer of a stacked parameter."""
  flags, shapes = dict(nnx.to_flat_state(mask)), {path: v.shape for path, v in nnx.to_flat_state(params)}
  return {
    (entry.state_dict, entry.key.format(layer=index)): bool(flags[entry.path])
    for entry in layout.reference_layout(model_config)
    for index in range(shapes[entry.path][0] if entry.layered else 1)
  }


@pytest.mark.parametrize("spec", ["configs/base.py:tiny", "configs/demo.py"])
def test_authors_rule_is_their_optim_policy_on_the_exported_names(spec):
  config = load_config(spec)
  params = nnx.state(build_model(config.model, 0), nnx.Param)
  state_dicts = layout.to_reference(param_tree.flatten(params), config.model)
  untrained = set(layout.untrained_shapes(config.model))
  trained = {
    group: {key: value for key, value in keys.items() if (group, key) not in untrained}
    for group, keys in state_dicts.items()
  }
  expected = authors_optim_policy(trained[layout.BACKBONE], trained[layout.DECODER])
  ours = per_torch_key(optim.weight_decay_mask(params, "authors_name_rule", config.model), params, config.model)
  assert ours == expected
  # Where the two rules part: the decoder's LayerNorm weights and attention in_proj_bias.
  by_rank = per_torch_key(optim.weight_decay_mask(params), params, config.model)
  differ = sorted(key for (group, key), flag in by_rank.items() if flag != ours[group, key])
  assert differ and all(
    key.endswith(("in_proj_bias", "norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) for key in differ
  ), differ
  assert all(ours[layout.DECODER, key] for key in differ)


def test_the_rule_is_a_named_choice():
  config = load_config("configs/base.py:tiny")
  config.optim.weight_decay_exempt = "by_name"
  with pytest.raises(ConfigError, match=r"config\.optim\.weight_decay_exempt='by_name' must be one of"):
    validate(config)
