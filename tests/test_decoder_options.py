"""The decoder's options beyond the reference: memory position codes, box refinement, anchor queries.

Shapes, parameter counts and annotations; what each option changes (the reference decoder cannot
tell where an image token is, the options can); scan, remat and a data x fsdp x tensor mesh give the
same function.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import param_count
from grain_jax import sharding
from grain_jax.config import ConfigError, load_config, validate
from grain_jax.models import positions
from grain_jax.models.grain import build_model

ALL_OPTIONS = dict(memory_position="learned", position_in_values=True, box_refinement=True, anchor_queries=True)


def model_config(preset="tiny", **decoder):
  config = load_config(f"configs/base.py:{preset}")
  config.model.decoder.update(decoder)
  return config


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)


@pytest.fixture(scope="module")
def decode():
  return nnx.jit(lambda model, tokens: model.decoder(tokens, model.visual.pos_embed[...]))


def test_b16_parameter_counts_of_each_option():
  width, tokens, queries = 512, 197, 5
  reference = 26_674_180
  expected = {
    (): reference,
    (("memory_position", "learned"),): reference + tokens * width,
    (("memory_position", "sine"),): reference,
    (("memory_position", "vit"),): reference,
    (("box_refinement", True),): reference + queries * 4,
    (("box_refinement", True), ("anchor_queries", True)): reference
    + queries * 4
    + 2 * width * width
    + width
    + width * width
    + width,
  }
  for options, count in expected.items():
    config = model_config("b16", **dict(options))
    model = nnx.eval_shape(functools.partial(build_model, config.model, seed=0))
    assert param_count(model.decoder) == count, options


def test_every_option_parameter_has_logical_names_the_rules_know():
  config = model_config("b16", **ALL_OPTIONS)
  model = nnx.eval_shape(lambda: build_model(config.model, seed=0))
  known = {name for name, _ in config.sharding_rules}
  for path, variable in nnx.to_flat_state(nnx.state(model.decoder, nnx.Param)):
    names = variable.get_metadata().get("out_sharding")
    assert names is not None and len(names) == variable.ndim and set(names) - {None} <= known, path


@pytest.mark.parametrize("memory_position", ["none", "learned", "sine", "vit"])
def test_only_a_memory_position_lets_the_decoder_tell_where_a_token_is(memory_position, images, decode):
  """Without a position code, cross-attention is blind to token order: shuffling the patch tokens
  leaves every output unchanged. With one, the boxes move."""
  model = build_model(model_config(memory_position=memory_position).model, seed=0)
  model.eval()
  tokens = model.visual(images)
  patches = 1 + np.random.default_rng(1).permutation(tokens.shape[1] - 1)
  shuffled = tokens[:, np.concatenate([[0], patches])]
  original, moved = decode(model, tokens), decode(model, shuffled)
  difference = np.abs(np.asarray(original.boxes) - np.asarray(moved.boxes)).max()
  if memory_position == "none":
    assert difference < 1e-6
  else:
    assert difference > 1e-4


def test_sine_table_codes_patch_centres():
  table = positions.patch_grid_table(4, 8)
  assert table.shape == (17, 8) and not table[0].any() and np.abs(table).max() <= 1
  # Patch (row 1, column 2): centre (0.375, 0.625); features (sin, cos) of 2 pi c / 10000^(2i/4).
  y, x = 0.375, 0.625
  want = [f(2 * np.pi * c / 10000 ** (i / 2)) for c in (y, x) for i in (0, 1) for f in (np.sin, np.cos)]
  np.testing.assert_allclose(table[1 + 1 * 4 + 2], want, rtol=1e-6, atol=1e-6)
  # Neighbours have more similar codes than far patches.
  similarity = table[1:] @ table[1:][0]
  assert similarity[1] > similarity[3] and similarity[4] > similarity[15]
  with pytest.raises(ValueError, match="divisible by 4"):
    positions.patch_grid_table(4, 6)


def test_box_refinement_starts_from_the_anchors(images, decode):
  """With the box head's output zeroed every layer's correction is 0: each layer returns the anchors."""
  model = build_model(model_config(box_refinement=True, anchor_queries=True).model, seed=0)
  model.eval()
  last = model.decoder.bbox_embed.layers[-1]
  last.kernel[...] = jnp.zeros_like(last.kernel[...])
  last.bias[...] = jnp.zeros_like(last.bias[...])
  boxes = np.asarray(decode(model, model.visual(images)).boxes)
  anchors = np.asarray(jax.nn.sigmoid(model.decoder.anchors[...]))
  np.testing.assert_allclose(boxes, np.broadcast_to(anchors, boxes.shape), rtol=1e-6)
  assert anchors.std(axis=0).min() > 0.01  # distinct anchors: queries start in different places


@pytest.mark.parametrize("options", [dict(memory_position="sine", box_refinement=True), ALL_OPTIONS])
def test_options_are_the_same_function_scanned_rematerialized_and_sharded(options, images):
  config = model_config(**options)
  forward = nnx.jit(lambda model, x: model.encode_image(x))
  model = build_model(config.model, seed=0)
  model.eval()
  want = forward(model, images)
  assert want.boxes.shape == (2, 4, 5, 4) and want.region_embed.shape == (4, 5, 64)
  assert ((np.asarray(want.boxes) >= 0) & (np.asarray(want.boxes) <= 1)).all()
  scanned_config = model_config(**options)
  scanned_config.model.update(scan_layers=True, remat=True)
  scanned = build_model(scanned_config.model, seed=0)
  scanned.eval()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  sharded = sharding.create_sharded(lambda: build_model(config.model, seed=0), mesh, config.sharding_rules)
  sharded.eval()
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    on_mesh = forward(sharded, images)
  for got in (forward(scanned, images), on_mesh):
    for name in ("global_embed", "region_embed", "boxes"):
      np.testing.assert_allclose(
        np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=1e-4, atol=1e-5, err_msg=name
      )


@pytest.mark.parametrize(
  "decoder,message",
  [
    (dict(memory_position="fourier"), "memory_position='fourier' must be one of"),
    (dict(anchor_queries=True), "anchor_queries=True needs config.model.decoder.box_refinement=True"),
    (dict(position_in_values=True), "position_in_values=True needs a config.model.decoder.memory_position"),
    (dict(memory_position="sine", width=66, heads=2), "width=66 must be divisible by 4"),
  ],
)
def test_bad_options_are_refused_naming_the_field(decoder, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    validate(model_config(**decoder))


def test_refinement_gradients_scanned_equal_unrolled_and_each_layer_learns_its_own_correction(images):
  """The anchors learn from the first layer's boxes only: later layers start from a detached box."""

  def box_gradients(scan: bool):
    config = model_config(memory_position="learned", position_in_values=True, box_refinement=True)
    config.model.update(scan_layers=scan, remat=scan)
    model = build_model(config.model, seed=0)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def gradients(params):
      boxes = lambda p: nnx.merge(graphdef, p, rest, copy=True).encode_image(images).boxes
      return jax.grad(lambda p: boxes(p)[0].sum())(params), jax.grad(lambda p: boxes(p)[-1].sum())(params)

    return gradients(params)

  (first, last), (scanned_first, scanned_last) = box_gradients(False), box_gradients(True)
  assert np.abs(np.asarray(first["decoder"]["anchors"][...])).max() > 1e-4
  assert not np.asarray(last["decoder"]["anchors"][...]).any()
  assert np.abs(np.asarray(last["decoder"]["bbox_embed"]["layers"][2]["kernel"][...])).max() > 1e-4
  for got, want in ((scanned_first, first), (scanned_last, last)):
    for path, value in nnx.to_flat_state(want):
      np.testing.assert_allclose(
        np.asarray(dict(nnx.to_flat_state(got))[path][...]),
        np.asarray(value[...]),
        rtol=1e-4,
        atol=1e-6,
        err_msg=str(path),
      )
