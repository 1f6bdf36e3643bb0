"""Attention maps: the weights the models really use, maps that sum to 1, scores against a numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grain_jax.config import load_config
from grain_jax.eval import attention
from grain_jax.models import layers
from grain_jax.models.grain import build_model


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)


def _model(kind: str, **decoder):
  config = load_config("configs/base.py:tiny")
  config.model.kind = kind
  config.model.decoder.update(dropout=0.0, **decoder)
  model = build_model(config.model, seed=1)
  model.eval()
  return model


def test_attention_weights_are_those_the_layer_applies():
  with nnx.use_eager_sharding(False):
    layer = layers.Attention(
      16,
      4,
      rngs=nnx.Rngs(0),
      qkv_init=jax.nn.initializers.normal(0.3),
      out_init=jax.nn.initializers.normal(0.3),
      qk_norm=True,
    )
  rng = np.random.default_rng(1)
  queries, keys = (jnp.asarray(rng.normal(size=(2, n, 16)), jnp.float32) for n in (3, 5))
  weights = layer.weights(queries, keys)  # [B, heads, Tq, Tk]
  np.testing.assert_allclose(weights.sum(-1), 1, atol=1e-6)
  values = layer._project(keys, slice(2, 3))[:, :, 0]  # [B, Tk, heads, kv]
  attended = jnp.einsum("bhqt,bthk->bqhk", weights, values)
  expected = jnp.einsum("bqhk,hkd->bqd", attended, layer.out_kernel[...]) + layer.out_bias[...]
  np.testing.assert_allclose(layer(queries, keys, keys), expected, atol=1e-5)


@pytest.mark.parametrize("memory_position", ["none", "learned"])
def test_the_decoders_last_layer_attention_reads_the_layer_before(images, memory_position):
  model = _model("grain", memory_position=memory_position)
  decoder = model.decoder
  tokens = model.visual(images)
  memory, memory_pos, targets = decoder._start(tokens, model.visual.pos_embed[...])
  query_pos = decoder._query_pos(None)
  before_last = decoder.layers(targets, memory, query_pos, memory_pos, False, keep_intermediates=True)[-2]
  expected = decoder.layers.view(-1).cross_attention(before_last, memory, query_pos, memory_pos)
  got = model.image_attention(images)
  assert got.shape == (3, 4, 6, 17)  # tiny: 4 heads, 5 region queries + the image query, CLS + 4 x 4 patches
  np.testing.assert_allclose(got, expected, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1, atol=1e-5)


def test_anchor_refinement_decoders_give_attention_too(images):
  got = _model("grain", box_refinement=True, anchor_queries=True).image_attention(images)
  assert got.shape == (3, 4, 6, 17)
  np.testing.assert_allclose(got.sum(-1), 1, atol=1e-5)


def test_clip_attention_is_what_cls_reads_in_the_last_vit_block(images):
  model = _model("clip")
  vit = model.visual
  before_last = vit.blocks(vit._embed(images), keep_intermediates=True)[-2]
  last = vit.blocks.view(-1)
  expected = last.attn.weights(last.norm1(before_last))[:, :, :1]
  got = model.image_attention(images)
  assert got.shape == (3, 4, 1, 17)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_patch_maps_drop_cls_and_sum_to_one():
  weights = jax.nn.softmax(jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4, 10))), axis=-1)
  maps = attention.patch_maps(weights)
  assert maps.shape == (2, 4, 9)
  np.testing.assert_allclose(maps.sum(-1), 1, atol=1e-6)
  expected = weights.mean(1)[..., 1:] / weights.mean(1)[..., 1:].sum(-1, keepdims=True)
  np.testing.assert_allclose(maps, expected, atol=1e-6)


def test_inside_and_scores_equal_a_loop_over_patches():
  rng = np.random.default_rng(3)
  grid, boxes = 5, np.column_stack([rng.uniform(0.2, 0.8, (6, 2)), rng.uniform(0.1, 0.6, (6, 2))])
  got = attention.inside(boxes, grid)
  for b, (cx, cy, w, h) in enumerate(boxes):
    for row in range(grid):
      for column in range(grid):
        x, y = (column + 0.5) / grid, (row + 0.5) / grid
        assert got[b, row * grid + column] == (cx - w / 2 <= x <= cx + w / 2 and cy - h / 2 <= y <= cy + h / 2)
  maps = rng.dirichlet(np.ones(grid * grid), size=6)
  scores = attention.map_scores(maps, got)
  assert scores["pointing"] == pytest.approx(100 * np.mean([got[i, maps[i].argmax()] for i in range(6)]))
  assert scores["mass"] == pytest.approx(100 * np.mean([maps[i][got[i]].sum() for i in range(6)]))
  assert scores["uniform"] == pytest.approx(100 * got.mean())
  uniform = attention.map_scores(np.full((6, grid * grid), 1 / grid**2), got)
  assert uniform["mass"] == pytest.approx(uniform["uniform"])
