"""The text encoder: OpenAI CLIP's causal transformer, pooled at the EOT token."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grain_jax.models import layers
from grain_jax.sharding import RESIDUAL, constrain, split_ways


class TextBlock(nnx.Module):
  """CLIP residual block: `x += attn(ln_1(x), causal)`; `x += mlp(ln_2(x))`. `[B, T, D] -> [B, T, D]`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    width, eps = cfg.width, cfg.layer_norm_eps
    # OpenAI CLIP's init: residual outputs are scaled down with depth.
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * cfg.depth) ** -0.5, (2 * width) ** -0.5
    self.ln_1 = layers.layer_norm(width, eps, dtype, rngs)
    self.attn = layers.Attention(width, cfg.heads, rngs=rngs, dtype=dtype,
                                 qkv_init=layers.normal(attn_std), out_init=layers.normal(proj_std))
    self.ln_2 = layers.layer_norm(width, eps, dtype, rngs)
    self.mlp = layers.Mlp(width, int(width * cfg.mlp_ratio), "quick_gelu", rngs=rngs, dtype=dtype,
                          fc1_init=layers.normal(fc_std), fc2_init=layers.normal(proj_std))

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask=mask)
    x = x + self.mlp(self.ln_2(x))
    return constrain(x, RESIDUAL)

  def at_positions(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """The block's output at one position per sequence: `x [B, T, D]`, `positions [B]` -> `[B, D]`.

    Equal to `block(x, causal)[b, positions[b]]`: keys and values span every position, the query
    is the one row, masked by its row of the causal mask; the MLP sees that row alone.
    """
    row = rows_at(x, positions)[:, None]
    keys = self.ln_1(x)
    visible = jnp.arange(x.shape[1]) <= positions[:, None]
    row = row + self.attn(self.ln_1(row), keys, keys, mask=visible[:, None, None, :])
    row = row + self.mlp(self.ln_2(row))
    return row[:, 0]


class TextTransformer(nnx.Module):
  """`token ids [T, L]` (L <= context_length) -> caption embeddings `[T, embed_dim]` (not normalized).

  The mask is causal and the embedding is read at the EOT token (the highest id), so tokens after
  EOT never influence it: any `L` that keeps every EOT gives the same embeddings as the full
  context (see `truncate_to_bucket`). For the same reason the last block runs only at the EOT
  position: its keys and values span the sequence, its query and MLP one row (at depth 12, about 7%
  fewer matmul FLOPs in the tower).
  """

  def __init__(self, cfg, embed_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               scan: bool = False, remat: bool = False):
    self.dtype = dtype
    self.token_embedding = layers.param(rngs, layers.normal(0.02), (cfg.vocab_size, cfg.width), ("vocab", "embed"))
    self.positional_embedding = layers.param(rngs, layers.normal(0.01), (cfg.context_length, cfg.width),
                                             ("length", "embed"))
    self.blocks = layers.LayerStack(lambda r: TextBlock(cfg, rngs=r, dtype=dtype), cfg.depth,
                                    rngs=rngs, scan=scan, remat=remat)
    self.ln_final = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype, rngs)
    self.text_projection = layers.param(rngs, layers.normal(cfg.width ** -0.5), (cfg.width, embed_dim),
                                        ("embed", "joint"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    length = ids.shape[1]
    table = self.token_embedding[...]
    if split_ways("vocab") > 1:
      # From a table split on both dimensions the lookup replicates the global batch on every
      # device; with `embed` whole (vocabulary still split) it stays on the batch shards, and so
      # does the gradient's scatter-add. A table split on `embed` alone stays so: gathering it
      # costs more than moving the looked-up rows.
      table = constrain(table.astype(self.dtype), ("vocab", None))
    x = jnp.take(table, constrain(ids, RESIDUAL[:2]), axis=0).astype(self.dtype)
    x = x + self.positional_embedding[:length].astype(self.dtype)
    x = constrain(x, RESIDUAL)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    depth = self.blocks.depth
    x = self.blocks(x, causal, upto=depth - 1)
    pooled = self.ln_final(self.blocks.view(depth - 1).at_positions(x, jnp.argmax(ids, axis=-1)))
    return pooled @ self.text_projection.astype(self.dtype)


def rows_at(x: jax.Array, positions: jax.Array) -> jax.Array:
  """`x[b, positions[b]]` for every b: `x [B, T, ...]`, `positions [B]` -> `[B, ...]`.

  A gather along T: with B sharded (and `positions` alike) each device picks its own rows, with no
  collective (fancy indexing with an arange over B all-reduces and all-gathers them).
  """
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, index, axis=1)[:, 0]


def truncate_to_bucket(ids: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Cuts `ids [T, 77]` to the smallest bucket length that keeps every sequence's EOT token.

  Runs on the host so each bucket compiles once; the embeddings are unchanged (see
  TextTransformer). Returns `[T, bucket]`.
  """
  needed = int(np.max(np.argmax(ids, axis=-1))) + 1 if ids.size else 1
  fitting = [bucket for bucket in sorted(buckets) if bucket >= needed]
  length = fitting[0] if fitting else ids.shape[1]
  return ids[:, :length]
