"""The region-query decoder: DETR's pre-norm decoder (no encoder) over the ViT's tokens.

Q learned region queries plus one global image query (the last) read the image tokens. Query
embeddings are the *positional* part of the queries (added to self-attention q and k and to
cross-attention q); the query contents start at zero. As in the authors' code, by default the
memory gets no positional encoding; `RegionQueryDecoder` lists the options that change that and how
boxes are predicted.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grain_jax.models import layers, positions
from grain_jax.sharding import RESIDUAL, constrain

# DETR initializes every matrix Xavier-uniform; packed q/k/v count as PyTorch's [3*D, D] weight.
xavier = jax.nn.initializers.xavier_uniform()
xavier_qkv = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2, 3))
xavier_out = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)

MEMORY_POSITIONS = ("none", "learned", "sine", "vit")


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
  """`t += SelfAttn(LN1(t)+pos, LN1(t)+pos, LN1(t))`; `t += CrossAttn(LN2(t)+pos, mem+mem_pos, mem)`;
  `t += FFN(LN3(t))`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    width, eps = cfg.width, cfg.layer_norm_eps
    attention = dict(rngs=rngs, dtype=dtype, qkv_init=xavier_qkv, out_init=xavier_out, dropout=cfg.dropout)
    self.norm1 = layers.layer_norm(width, eps, dtype, rngs)
    self.self_attn = layers.Attention(width, cfg.heads, **attention)
    self.norm2 = layers.layer_norm(width, eps, dtype, rngs)
    self.multihead_attn = layers.Attention(width, cfg.heads, **attention)
    self.norm3 = layers.layer_norm(width, eps, dtype, rngs)
    self.mlp = layers.Mlp(
      width,
      cfg.mlp_dim,
      "relu",
      rngs=rngs,
      dtype=dtype,
      fc1_init=xavier,
      fc2_init=xavier,
      fc1_bias_init=layers.torch_linear_init(width),
      fc2_bias_init=layers.torch_linear_init(cfg.mlp_dim),
      dropout=cfg.dropout,
    )
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def _self_attend(self, targets: jax.Array, query_pos: jax.Array) -> jax.Array:
    normed = self.norm1(targets)
    with_pos = normed + query_pos
    return targets + self.dropout(self.self_attn(with_pos, with_pos, normed))

  def __call__(
    self,
    targets: jax.Array,
    memory: jax.Array,
    query_pos: jax.Array,
    memory_pos: jax.Array | None = None,
    position_in_values: bool = False,
  ) -> jax.Array:
    """targets `[B, Q+1, D]`, memory `[B, T, D]`, query_pos `[1 or B, Q+1, D]`, memory_pos `[1, T, D]`
    or None (the reference: memory keys carry no position) -> `[B, Q+1, D]`."""
    targets = self._self_attend(targets, query_pos)
    keys = memory if memory_pos is None else memory + memory_pos
    values = keys if position_in_values else memory
    targets = targets + self.dropout(self.multihead_attn(self.norm2(targets) + query_pos, keys, values))
    targets = targets + self.dropout(self.mlp(self.norm3(targets)))
    return constrain(targets, RESIDUAL)

  def cross_attention(
    self, targets: jax.Array, memory: jax.Array, query_pos: jax.Array, memory_pos: jax.Array | None = None
  ) -> jax.Array:
    """The cross-attention weights `[B, heads, Q+1, T]` of `__call__` with the same inputs."""
    targets = self._self_attend(targets, query_pos)
    keys = memory if memory_pos is None else memory + memory_pos
    return self.multihead_attn.weights(self.norm2(targets) + query_pos, keys)


def _mlp_layer(fan_in: int, fan_out: int, names: tuple[str, str], rngs: nnx.Rngs, dtype) -> nnx.Linear:
  """A Linear with PyTorch's default init (the reference's box MLP)."""
  init = layers.torch_linear_init(fan_in)
  return layers.dense(fan_in, fan_out, names, dtype, rngs, init, init)


class BoxHead(nnx.Module):
  """MLP 3 layers (ReLU between) + sigmoid: `[..., D] -> [..., 4]` normalized (cx, cy, w, h)."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, dtype):
    self.layers = nnx.List(
      [
        _mlp_layer(width, width, ("embed", "mlp"), rngs, dtype),
        _mlp_layer(width, width, ("mlp", "embed"), rngs, dtype),
        _mlp_layer(width, 4, ("embed", "box"), rngs, dtype),
      ]
    )

  def logits(self, x: jax.Array) -> jax.Array:
    """`[..., D] -> [..., 4]` float32 before the sigmoid (box refinement adds them to a reference)."""
    for index, layer in enumerate(self.layers):
      x = layer(x)
      if index < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x.astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(self.logits(x))


class AnchorPositions(nnx.Module):
  """Positional queries from boxes (DAB-DETR): `boxes [..., 4]` -> sine code `[..., 2D]` -> 2-layer
  ReLU MLP -> `[..., D]`."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, dtype):
    self.width = width
    self.layers = nnx.List(
      [
        _mlp_layer(2 * width, width, ("embed", "mlp"), rngs, dtype),
        _mlp_layer(width, width, ("mlp", "embed"), rngs, dtype),
      ]
    )

  def __call__(self, boxes: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(self.layers[0](positions.sine_encode(boxes, self.width // 2, xp=jnp)))
    return self.layers[1](hidden)


def _anchor_init(key, shape, dtype=jnp.float32):
  """Box logits of boxes with centres uniform in [0.1, 0.9] and sides uniform in [0.2, 0.4]."""
  low, high = jnp.array([0.1, 0.1, 0.2, 0.2]), jnp.array([0.9, 0.9, 0.4, 0.4])
  return jax.scipy.special.logit(jax.random.uniform(key, shape, dtype, low, high))


class RegionQueryDecoder(nnx.Module):
  """ViT tokens `[B, T, image_width]` -> DecoderOutputs (embeddings in float32).

  Options beyond the reference (each off there; see `config.model.decoder`):
    memory_position: a position code added to the cross-attention keys: "learned" (a table per
      token), "sine" (fixed 2-D sine of each patch's centre, zero for CLS), "vit" (the ViT's own
      position embedding through the decoder's input projection).
    position_in_values: the position code is added to the values too, so what a query reads
      carries where it was read.
    box_refinement: every region query starts from a learned anchor box; each layer predicts a
      correction to the previous layer's box (in logit space), which the next layer starts from.
    anchor_queries: with box_refinement, the positional query of each region query is also an MLP of
      the sine code of its current box, so cross-attention looks where the box is.
  `cfg` is `config.model.decoder`, its options checked together by grain_jax/config/validation.py.
  """

  def __init__(
    self, cfg, image_cfg, embed_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, scan: bool = False, remat: bool = False
  ):
    width, queries = cfg.width, cfg.num_region_queries
    self.num_region_queries, self.dtype, self.memory_position = queries, dtype, cfg.memory_position
    self.position_in_values = cfg.position_in_values
    self.proj = layers.dense(
      image_cfg.width, width, ("embed", "mlp"), dtype, rngs, layers.torch_linear_init(image_cfg.width), bias_init=None
    )
    self.pre_norm = layers.layer_norm(width, cfg.layer_norm_eps, dtype, rngs)
    self.query_embed = layers.param(rngs, layers.normal(1.0), (queries + 1, width), ("length", "embed"))
    num_tokens = 1 + (image_cfg.image_size // image_cfg.patch_size) ** 2
    self.memory_pos_embed = (
      layers.param(rngs, layers.normal(1.0), (num_tokens, width), ("length", "embed"))
      if cfg.memory_position == "learned"
      else None
    )
    self.patch_grid = image_cfg.image_size // image_cfg.patch_size
    self.anchors = layers.param(rngs, _anchor_init, (queries, 4), ("length", "box")) if cfg.box_refinement else None
    self.anchor_positions = AnchorPositions(width, rngs=rngs, dtype=dtype) if cfg.anchor_queries else None
    self.layers = layers.LayerStack(
      lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype), cfg.depth, rngs=rngs, scan=scan, remat=remat
    )
    self.norm = layers.layer_norm(width, cfg.layer_norm_eps, dtype, rngs)
    self.bbox_embed = BoxHead(width, rngs=rngs, dtype=dtype)
    self.obj_proj = layers.param(rngs, layers.normal(width**-0.5), (width, embed_dim), ("embed", "joint"))
    self.img_proj = layers.param(rngs, layers.normal(width**-0.5), (width, embed_dim), ("embed", "joint"))

  def _memory_pos(self, vit_pos_embed: jax.Array) -> jax.Array | None:
    """`[1, T, D]` position code of the memory tokens, or None."""
    if self.memory_position == "learned":
      return self.memory_pos_embed[None].astype(self.dtype)
    if self.memory_position == "sine":
      table = positions.patch_grid_table(self.patch_grid, self.query_embed.shape[-1])
      return jnp.asarray(table, self.dtype)[None]
    if self.memory_position == "vit":
      if vit_pos_embed is None:
        raise ValueError("memory_position='vit' reads the ViT's position embedding: pass it as vit_pos_embed")
      return self.proj(vit_pos_embed.astype(self.dtype))
    return None

  def _query_pos(self, boxes: jax.Array | None) -> jax.Array:
    """`[1 or B, Q+1, D]`: learned query embeddings, plus the anchor code of region query boxes
    `[B, Q, 4]` with anchor_queries."""
    query_pos = self.query_embed[None].astype(self.dtype)
    if self.anchor_positions is None:
      return query_pos
    regions = query_pos[:, : self.num_region_queries] + self.anchor_positions(boxes.astype(self.dtype))
    image_query = jnp.broadcast_to(query_pos[:, self.num_region_queries :], (boxes.shape[0], 1, query_pos.shape[-1]))
    return jnp.concatenate([regions, image_query], axis=1)

  def _start(self, image_tokens: jax.Array, vit_pos_embed: jax.Array | None):
    """The memory `[B, T, D]`, its position code (or None) and the zero targets `[B, Q+1, D]`."""
    memory = self.pre_norm(self.proj(image_tokens))
    targets = jnp.zeros((image_tokens.shape[0], self.num_region_queries + 1, self.query_embed.shape[-1]), self.dtype)
    return memory, self._memory_pos(vit_pos_embed), targets

  def _refine_step(self, memory: jax.Array, memory_pos: jax.Array | None):
    """One layer of box refinement, for `LayerStack.scan`: carry (targets, box logits `[B, Q, 4]`) ->
    outputs (normed hidden `[B, Q+1, D]`, boxes `[B, Q, 4]`)."""
    queries = self.num_region_queries

    def refine(layer, carry):
      targets, box_logits = carry
      targets = layer(targets, memory, self._query_pos(jax.nn.sigmoid(box_logits)), memory_pos, self.position_in_values)
      hidden = self.norm(targets)
      box_logits = box_logits + self.bbox_embed.logits(hidden[:, :queries])
      # As in DAB-DETR, each layer learns its own correction: the next starts from a constant.
      return (targets, jax.lax.stop_gradient(box_logits)), (hidden, jax.nn.sigmoid(box_logits))

    return refine

  def _anchor_start(self, batch: int) -> jax.Array:
    return jnp.broadcast_to(self.anchors[None], (batch, self.num_region_queries, 4))

  def last_layer_attention(self, image_tokens: jax.Array, vit_pos_embed: jax.Array | None = None) -> jax.Array:
    """The last layer's cross-attention weights `[B, heads, Q+1, T]` over the image tokens (row Q: the
    image query, the others the region queries), as `__call__` computes them."""
    memory, memory_pos, targets = self._start(image_tokens, vit_pos_embed)
    upto = self.layers.depth - 1
    if self.anchors is None:
      if upto:
        targets = self.layers(targets, memory, self._query_pos(None), memory_pos, self.position_in_values, upto=upto)
      query_pos = self._query_pos(None)
    else:
      carry = (targets, self._anchor_start(image_tokens.shape[0]))
      if upto:
        carry, _ = self.layers.scan(self._refine_step(memory, memory_pos), carry, upto=upto)
      targets, box_logits = carry
      query_pos = self._query_pos(jax.nn.sigmoid(box_logits))
    return self.layers.view(-1).cross_attention(targets, memory, query_pos, memory_pos)

  def __call__(self, image_tokens: jax.Array, vit_pos_embed: jax.Array | None = None) -> DecoderOutputs:
    """image_tokens `[B, T, image_width]`; vit_pos_embed `[1, T, image_width]` (memory_position "vit")."""
    memory, memory_pos, targets = self._start(image_tokens, vit_pos_embed)
    queries = self.num_region_queries
    if self.anchors is None:
      per_layer = self.layers(
        targets, memory, self._query_pos(None), memory_pos, self.position_in_values, keep_intermediates=True
      )
      hidden = self.norm(per_layer)
      boxes = self.bbox_embed(hidden[:, :, :queries])
    else:
      start = self._anchor_start(image_tokens.shape[0])
      _, (hidden, boxes) = self.layers.scan(self._refine_step(memory, memory_pos), (targets, start))
    regions, image_query = hidden[-1, :, :queries], hidden[-1, :, queries]
    return DecoderOutputs(
      region_embed=(regions @ self.obj_proj.astype(self.dtype)).astype(jnp.float32),
      global_embed=(image_query @ self.img_proj.astype(self.dtype)).astype(jnp.float32),
      boxes=boxes,
    )
