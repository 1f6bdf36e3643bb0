"""GRAIN: the image and text towers, the region-query decoder and the shared temperature.

`kind="grain"` reads the global image embedding from the decoder's image query and region
embeddings from its region queries; `kind="clip"` is the plain-CLIP baseline (CLS token ->
`image_projection`, no decoder), trained and evaluated through the same functions.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from grain_jax.models import layers
from grain_jax.models.decoder import RegionQueryDecoder
from grain_jax.models.text import TextTransformer
from grain_jax.models.vit import VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MAX_LOGIT_SCALE = math.log(100.0)


class ImageOutputs(NamedTuple):
  """What `encode_image` returns; region fields are None for the plain-CLIP baseline.

  global_embed: `[B, E]` (not normalized).
  region_embed: `[B, Q, E]` (not normalized), or None.
  boxes: `[L, B, Q, 4]` normalized (cx, cy, w, h) for each of the L decoder layers, or None.
  """

  global_embed: jax.Array
  region_embed: jax.Array | None
  boxes: jax.Array | None


class GrainModel(nnx.Module):
  """Built from the `config.model` section; deterministic under `rngs`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.kind not in ("grain", "clip"):
      raise ValueError(f"config.model.kind={cfg.kind!r} must be 'grain' or 'clip'")
    self.kind = cfg.kind
    dtype = DTYPES[cfg.dtype]
    stack = dict(scan=cfg.scan_layers, remat=cfg.remat)
    self.visual = VisionTransformer(cfg.image, rngs=rngs, dtype=dtype, **stack)
    self.text = TextTransformer(cfg.text, cfg.embed_dim, rngs=rngs, dtype=dtype, **stack)
    if cfg.kind == "grain":
      self.decoder = RegionQueryDecoder(cfg.decoder, cfg.image, cfg.embed_dim, rngs=rngs, dtype=dtype, **stack)
    else:
      self.image_projection = layers.param(
        rngs, layers.normal(cfg.image.width**-0.5), (cfg.image.width, cfg.embed_dim), ("embed", "joint")
      )
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32), out_sharding=())

  def encode_image(self, images: jax.Array) -> ImageOutputs:
    """`images [B, H, W, 3]` (normalized) -> ImageOutputs, embeddings and boxes in float32."""
    tokens = self.visual(images)
    if self.kind == "clip":
      return ImageOutputs((tokens[:, 0] @ self.image_projection.astype(tokens.dtype)).astype(jnp.float32), None, None)
    decoded = self.decoder(tokens, self.visual.pos_embed[...])
    return ImageOutputs(decoded.global_embed, decoded.region_embed, decoded.boxes)

  def image_attention(self, images: jax.Array) -> jax.Array:
    """`images [B, H, W, 3]` -> where the global embedding reads from, `[B, heads, R, 1 + N]` float32
    over the ViT's tokens (CLS first): for GRAIN the last decoder layer's cross-attention of its Q
    region queries and, last, its image query (R = Q + 1); for plain CLIP what the CLS token attends
    to in the last ViT block (R = 1)."""
    if self.kind == "clip":
      return self.visual.last_block_attention(images)[:, :, :1]
    return self.decoder.last_layer_attention(self.visual(images), self.visual.pos_embed[...])

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """`ids [T, L]` int32 (L <= context length) -> `[T, E]` float32 (not normalized)."""
    return self.text(ids).astype(jnp.float32)

  def encode_packed_text(
    self, tokens: jax.Array, segments: jax.Array, positions: jax.Array, eot: jax.Array
  ) -> jax.Array:
    """Texts packed into rows (`[R, P]` each; `eot [R, M]`) -> `[R, M, E]` float32 (not normalized);
    see `TextTransformer.packed`."""
    return self.text.packed(tokens, segments, positions, eot).astype(jnp.float32)

  def clamp_logit_scale(self) -> None:
    """Keeps the temperature in [1, 100] (logit_scale in [0, ln 100]), as the reference does after each step."""
    self.logit_scale[...] = jnp.clip(self.logit_scale[...], 0.0, MAX_LOGIT_SCALE)


def build_model(model_config, seed: int) -> GrainModel:
  """The model with parameters from `seed` (same seed, same parameters, on any mesh).

  Parameters are created unsharded; `grain_jax.sharding.create_sharded(lambda: build_model(...))`
  creates them directly in their sharded layout instead.
  """
  with nnx.use_eager_sharding(False):
    return GrainModel(model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
