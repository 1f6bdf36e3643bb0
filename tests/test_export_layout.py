"""The reference-layout table: key names and shapes against docs/reference_behaviour.md ("Checkpoint
layout"), exact round trips, clear errors.

No torch and no model computation: shapes come from `nnx.eval_shape`, values are random numpy.
"""

import numpy as np
import pytest
from flax import nnx

from grain_jax.config import ConfigError, load_config, validate
from grain_jax.models.grain import build_model
from grain_jax.torch_format import layout, param_tree


def model_config(preset: str, **changes):
  config = load_config(f"configs/base.py:{preset}")
  config.model.update(changes)
  return config.model


def our_shapes(cfg) -> dict:
  params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param)
  return {path: tuple(leaf.shape) for path, leaf in param_tree.flatten(params).items()}


def random_params(shapes: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {path: rng.normal(size=shape).astype(np.float32) for path, shape in shapes.items()}


@pytest.fixture(scope="module")
def b16_torch_shapes():
  cfg = model_config("b16")
  return {**layout.torch_shapes(our_shapes(cfg), cfg), **layout.untrained_shapes(cfg)}


def test_b16_keys_and_shapes_are_the_reference_checkpoints(b16_torch_shapes):
  spec = {  # docs/reference_behaviour.md, "Checkpoint layout"
    ("backbone", "positional_embedding"): (77, 512),
    ("backbone", "image_projection"): (768, 512),
    ("backbone", "text_projection"): (512, 512),
    ("backbone", "logit_scale"): (),
    ("backbone", "visual.cls_token"): (1, 1, 768),
    ("backbone", "visual.pos_embed"): (1, 197, 768),
    ("backbone", "visual.patch_embed.proj.weight"): (768, 3, 16, 16),
    ("backbone", "visual.blocks.11.attn.q_norm.weight"): (64,),
    ("backbone", "visual.blocks.0.attn.k_norm.bias"): (64,),
    ("backbone", "visual.blocks.3.attn.qkv.weight"): (2304, 768),
    ("backbone", "visual.blocks.3.attn.proj.weight"): (768, 768),
    ("backbone", "visual.blocks.3.mlp.fc1.weight"): (3072, 768),
    ("backbone", "transformer.resblocks.11.attn.in_proj_weight"): (1536, 512),
    ("backbone", "transformer.resblocks.0.attn.out_proj.weight"): (512, 512),
    ("backbone", "transformer.resblocks.0.mlp.c_fc.weight"): (2048, 512),
    ("backbone", "token_embedding.weight"): (49408, 512),
    ("backbone", "ln_final.weight"): (512,),
    ("decoder", "obj_proj"): (512, 512),
    ("decoder", "img_proj"): (512, 512),
    ("decoder", "transformer.pre_norm.weight"): (512,),
    ("decoder", "transformer.decoder.layers.5.multihead_attn.in_proj_weight"): (1536, 512),
    ("decoder", "transformer.decoder.layers.0.self_attn.out_proj.bias"): (512,),
    ("decoder", "transformer.decoder.layers.0.linear1.weight"): (2048, 512),
    ("decoder", "transformer.decoder.layers.0.norm3.bias"): (512,),
    ("decoder", "transformer.decoder.norm.weight"): (512,),
    ("decoder", "bbox_embed.layers.2.weight"): (4, 512),
    ("decoder", "query_embed.weight"): (6, 512),
    ("decoder", "proj.weight"): (512, 768),
    ("decoder", "class_embed.weight"): (22048, 512),
    ("decoder", "class_embed.bias"): (22048,),
    ("decoder", "pos_embed"): (1, 513, 512),
    ("decoder", "temporal_embed"): (1, 4, 512),
  }
  for key, shape in spec.items():
    assert b16_torch_shapes[key] == shape, key
  assert ("decoder", "proj.bias") not in b16_torch_shapes


def test_b16_parameter_counts_are_the_references(b16_torch_shapes):
  def count(select):
    return sum(int(np.prod(shape)) for key, shape in b16_torch_shapes.items() if select(*key))

  text_keys = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
  assert count(lambda group, key: key.startswith("visual.")) == 85_801_728
  assert count(lambda group, key: group == "backbone" and key.startswith(text_keys)) == 63_428_096


@pytest.mark.parametrize("preset,kind", [("tiny", "grain"), ("tiny", "clip")])
def test_to_reference_and_back_is_exact(preset, kind):
  cfg = model_config(preset, kind=kind)
  shapes = our_shapes(cfg)
  params = random_params(shapes)
  state_dicts = layout.to_reference(params, cfg)
  assert bool(state_dicts["decoder"]) == (kind == "grain")
  if kind == "clip":
    np.testing.assert_array_equal(state_dicts["backbone"]["image_projection"], params[("image_projection",)])
  back = layout.from_reference(state_dicts, shapes, cfg)
  assert back.keys() == params.keys()
  for path, value in params.items():
    np.testing.assert_array_equal(back[path], value, err_msg=str(path))


def test_pytorch_layouts_follow_the_reference_formulas():
  """Each transform checked against the reference's own forward computation, on one parameter each."""
  cfg = model_config("tiny")
  shapes = our_shapes(cfg)
  params = random_params(shapes)
  backbone = layout.to_reference(params, cfg)["backbone"]
  x = np.random.default_rng(1).normal(size=(5, 64)).astype(np.float32)
  # timm: qkv(x).reshape(B, N, 3, heads, head_dim); ours: einsum over the [embed, 3, heads, kv] kernel.
  ours = np.einsum("td,dnhk->tnhk", x, params[("visual", "blocks", "blocks", "attn", "qkv_kernel")][1])
  timm = x @ backbone["visual.blocks.1.attn.qkv.weight"].T + backbone["visual.blocks.1.attn.qkv.bias"]
  ours = ours + params[("visual", "blocks", "blocks", "attn", "qkv_bias")][1]
  np.testing.assert_allclose(timm.reshape(5, 3, 4, 16), ours, rtol=1e-5, atol=1e-5)
  # Attention output: proj(heads concatenated) vs einsum over [heads, kv, embed].
  heads = x.reshape(5, 4, 16)
  ours = np.einsum("thk,hkd->td", heads, params[("text", "blocks", "blocks", "attn", "out_kernel")][0])
  np.testing.assert_allclose(x @ backbone["transformer.resblocks.0.attn.out_proj.weight"].T, ours, rtol=1e-5, atol=1e-5)
  # Conv2d patch embedding of one 8x8 patch (NCHW) vs our (row, column, channel) patch kernel.
  patch = np.random.default_rng(2).normal(size=(8, 8, 3)).astype(np.float32)
  conv = np.einsum("dcij,cij->d", backbone["visual.patch_embed.proj.weight"], patch.transpose(2, 0, 1))
  np.testing.assert_allclose(
    conv, np.einsum("ijc,ijcd->d", patch, params[("visual", "patch_kernel")]), rtol=1e-5, atol=1e-5
  )


def test_mismatches_are_listed_together():
  cfg = model_config("tiny")
  shapes = our_shapes(cfg)
  state_dicts = layout.to_reference(random_params(shapes), cfg)
  del state_dicts["backbone"]["transformer.resblocks.1.ln_2.bias"]
  state_dicts["decoder"]["obj_proj"] = np.zeros((3, 3), np.float32)
  state_dicts["decoder"]["extra.weight"] = np.zeros(2, np.float32)
  with pytest.raises(layout.LayoutMismatchError) as error:
    layout.from_reference(state_dicts, shapes, cfg, source="ref.pth")
  message = str(error.value)
  assert "ref.pth" in message
  assert "missing (1)" in message and "transformer.resblocks.1.ln_2.bias [64]" in message
  assert "wrong shape (1)" in message and "obj_proj is [3, 3], the model needs [64, 64]" in message
  assert "unexpected (1)" in message and "decoder: extra.weight" in message


def test_untrained_reference_parameters_are_zeros_and_ignored_on_import():
  cfg = model_config("tiny")
  shapes = our_shapes(cfg)
  state_dicts = layout.to_reference(random_params(shapes), cfg)
  for (group, key), shape in layout.untrained_shapes(cfg).items():
    assert state_dicts[group][key].shape == shape and not state_dicts[group][key].any()
    del state_dicts[group][key]
  layout.from_reference(state_dicts, shapes, cfg)


def test_towers_read_only_their_keys():
  cfg = model_config("tiny")
  shapes = our_shapes(cfg)
  params = random_params(shapes)
  backbone = {
    key: value for key, value in layout.to_reference(params, cfg)["backbone"].items() if not key.startswith("visual.")
  }
  backbone["unrelated"] = np.zeros(1, np.float32)
  text = layout.from_reference({"backbone": backbone}, shapes, cfg, towers=("text",))
  assert text and all(path[0] == "text" for path in text)
  for path, value in text.items():
    np.testing.assert_array_equal(value, params[path])


def test_layout_without_qk_norm_has_no_qk_norm_keys():
  cfg = model_config("tiny")
  cfg.image.qk_norm = False
  keys = layout.torch_shapes(our_shapes(cfg), cfg)
  assert ("backbone", "visual.blocks.0.attn.qkv.weight") in keys
  assert not any("q_norm" in key or "k_norm" in key for _, key in keys)


def test_module_prefix_is_stripped_only_when_every_key_has_it():
  assert layout.strip_module_prefix({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
  assert layout.strip_module_prefix({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("init_towers", ("text", "audio"), "config.model.init_towers"),
    ("init_towers", (), "config.model.init_towers"),
    ("init_from", "clip.npz", "config.model.init_from"),
  ],
)
def test_config_rejects_bad_init_fields(field, value, message):
  config = load_config("configs/base.py:tiny")
  config.model[field] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)
