"""The region-query decoder: DETR's pre-norm decoder (no encoder) over the ViT's tokens.

Q learned region queries plus one global image query (the last) read the image tokens. Query
embeddings are the *positional* part of the queries (added to self-attention q and k and to
cross-attention q); the query contents start at zero. The memory gets no positional encoding.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grain_jax.models import layers
from grain_jax.sharding import constrain

# DETR initializes every matrix Xavier-uniform; packed q/k/v count as PyTorch's [3*D, D] weight.
xavier = jax.nn.initializers.xavier_uniform()
xavier_qkv = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2, 3))
xavier_out = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)


class DecoderOutputs(NamedTuple):
  """Outputs for L layers, B images, Q region queries, embedding width E.

  region_embed: `[B, Q, E]` region queries of the last layer through `obj_proj`.
  global_embed: `[B, E]` the image query of the last layer through `img_proj`.
  boxes: `[L, B, Q, 4]` normalized (cx, cy, w, h) of the region queries at every layer.
  """
  region_embed: jax.Array
  global_embed: jax.Array
  boxes: jax.Array


class DecoderLayer(nnx.Module):
  """`t += SelfAttn(LN1(t)+pos, LN1(t)+pos, LN1(t))`; `t += CrossAttn(LN2(t)+pos, mem, mem)`; `t += FFN(LN3(t))`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    width, eps = cfg.width, cfg.layer_norm_eps
    attention = dict(rngs=rngs, dtype=dtype, qkv_init=xavier_qkv, out_init=xavier_out, dropout=cfg.dropout)
    self.norm1 = layers.layer_norm(width, eps, dtype, rngs)
    self.self_attn = layers.Attention(width, cfg.heads, **attention)
    self.norm2 = layers.layer_norm(width, eps, dtype, rngs)
    self.multihead_attn = layers.Attention(width, cfg.heads, **attention)
    self.norm3 = layers.layer_norm(width, eps, dtype, rngs)
    self.mlp = layers.Mlp(width, cfg.mlp_dim, "relu", rngs=rngs, dtype=dtype, fc1_init=xavier, fc2_init=xavier,
                          fc1_bias_init=layers.torch_linear_init(width),
                          fc2_bias_init=layers.torch_linear_init(cfg.mlp_dim), dropout=cfg.dropout)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, targets: jax.Array, memory: jax.Array, query_pos: jax.Array) -> jax.Array:
    """targets `[B, Q+1, D]`, memory `[B, T, D]`, query_pos `[1, Q+1, D]` -> `[B, Q+1, D]`."""
    normed = self.norm1(targets)
    with_pos = normed + query_pos
    targets = targets + self.dropout(self.self_attn(with_pos, with_pos, normed))
    targets = targets + self.dropout(self.multihead_attn(self.norm2(targets) + query_pos, memory, memory))
    targets = targets + self.dropout(self.mlp(self.norm3(targets)))
    return constrain(targets, ("batch", "length", "embed"))


class BoxHead(nnx.Module):
  """MLP 3 layers (ReLU between) + sigmoid: `[..., D] -> [..., 4]` normalized (cx, cy, w, h)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, dtype):
    def torch_default(fan_in, fan_out, names):
      init = layers.torch_linear_init(fan_in)
      return layers.dense(fan_in, fan_out, names, dtype, rngs, init, init)

    self.layers = nnx.List([torch_default(width, width, ("embed", "mlp")),
                            torch_default(width, width, ("mlp", "embed")),
                            torch_default(width, 4, ("embed", "box"))])

  def __call__(self, x: jax.Array) -> jax.Array:
    for index, layer in enumerate(self.layers):
      x = layer(x)
      if index < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return jax.nn.sigmoid(x.astype(jnp.float32))


class RegionQueryDecoder(nnx.Module):
  """ViT tokens `[B, T, image_width]` -> DecoderOutputs (embeddings in float32)."""

  def __init__(self, cfg, image_width: int, embed_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               scan: bool = False, remat: bool = False):
    self.num_region_queries, self.dtype = cfg.num_region_queries, dtype
    self.proj = layers.dense(image_width, cfg.width, ("embed", "mlp"), dtype, rngs,
                             layers.torch_linear_init(image_width), bias_init=None)
    self.pre_norm = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype, rngs)
    self.query_embed = layers.param(rngs, layers.normal(1.0), (cfg.num_region_queries + 1, cfg.width),
                                    ("length", "embed"))
    self.layers = layers.LayerStack(lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype), cfg.depth,
                                    rngs=rngs, scan=scan, remat=remat)
    self.norm = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype, rngs)
    self.bbox_embed = BoxHead(cfg.width, rngs=rngs, dtype=dtype)
    self.obj_proj = layers.param(rngs, layers.normal(cfg.width ** -0.5), (cfg.width, embed_dim), ("embed", "joint"))
    self.img_proj = layers.param(rngs, layers.normal(cfg.width ** -0.5), (cfg.width, embed_dim), ("embed", "joint"))

  def __call__(self, image_tokens: jax.Array) -> DecoderOutputs:
    memory = self.pre_norm(self.proj(image_tokens))
    query_pos = self.query_embed[None].astype(self.dtype)
    targets = jnp.zeros((image_tokens.shape[0],) + query_pos.shape[1:], self.dtype)
    per_layer = self.layers(targets, memory, query_pos, keep_intermediates=True)
    hidden = self.norm(per_layer)
    regions, image_query = hidden[-1, :, : self.num_region_queries], hidden[-1, :, self.num_region_queries]
    return DecoderOutputs(
        region_embed=(regions @ self.obj_proj.astype(self.dtype)).astype(jnp.float32),
        global_embed=(image_query @ self.img_proj.astype(self.dtype)).astype(jnp.float32),
        boxes=self.bbox_embed(hidden[:, :, : self.num_region_queries]))
