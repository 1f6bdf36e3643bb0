"""The text encoder: OpenAI CLIP's causal transformer, pooled at the EOT token."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from grain_jax.models import layers
from grain_jax.sharding import RESIDUAL, constrain, looked_up, split_ways


class TextBlock(nnx.Module):
  """CLIP residual block: `x += attn(ln_1(x), mask)`; `x += mlp(ln_2(x))`. `[B, T, D] -> [B, T, D]`,
  the mask `[B, 1, T, T]` causal within each packed text."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    width, eps = cfg.width, cfg.layer_norm_eps
    # OpenAI CLIP's init: residual outputs are scaled down with depth.
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * cfg.depth) ** -0.5, (2 * width) ** -0.5
    self.ln_1 = layers.layer_norm(width, eps, dtype, rngs)
    self.attn = layers.Attention(
      width, cfg.heads, rngs=rngs, dtype=dtype, qkv_init=layers.normal(attn_std), out_init=layers.normal(proj_std)
    )
    self.ln_2 = layers.layer_norm(width, eps, dtype, rngs)
    self.mlp = layers.Mlp(
      width,
      int(width * cfg.mlp_ratio),
      "quick_gelu",
      rngs=rngs,
      dtype=dtype,
      fc1_init=layers.normal(fc_std),
      fc2_init=layers.normal(proj_std),
    )

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln_1(x), mask=mask)
    x = x + self.mlp(self.ln_2(x))
    return constrain(x, RESIDUAL)

  def at_positions(self, x: jax.Array, positions: jax.Array, segments: jax.Array) -> jax.Array:
    """The block's output at M positions per row: `x [B, T, D]`, `positions [B, M]`, `segments
    [B, T]` -> `[B, M, D]`.

    Equal to `block(x, mask)[b, positions[b, m]]` for the mask `TextTransformer.packed` builds: keys
    and values span the row, each query is one row position that sees its own segment up to itself;
    the MLP sees those rows alone.
    """
    rows = rows_at(x, positions)
    keys = self.ln_1(x)
    own_segment = rows_at(segments, positions)
    visible = (segments[:, None, :] == own_segment[..., None]) & (jnp.arange(x.shape[1]) <= positions[..., None])
    rows = rows + self.attn(self.ln_1(rows), keys, keys, mask=visible[:, None])
    rows = rows + self.mlp(self.ln_2(rows))
    return rows


class TextTransformer(nnx.Module):
  """`token ids [T, L]` (L <= context_length) -> text embeddings `[T, embed_dim]` (not normalized);
  `packed` runs many texts per row (training packs captions and descriptions into one pass).

  The mask is causal and the embedding is read at the EOT token (the highest id), so tokens after
  EOT never influence it: any `L` that keeps every EOT gives the same embeddings as the full
  context (see `truncate_to_bucket`), and texts packed side by side in a row, each attending only
  within itself and with positions from 0, get the embeddings they get alone. For the same reason
  the last block runs only at the EOT positions: its keys and values span the row, its queries and
  MLP the M EOT rows of each row (M = 1 for one text per row, `TEXTS_PER_ROW` when packed).
  """

  def __init__(
    self, cfg, embed_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, scan: bool = False, remat: bool = False
  ):
    self.dtype = dtype
    self.token_embedding = layers.param(rngs, layers.normal(0.02), (cfg.vocab_size, cfg.width), ("vocab", "embed"))
    self.positional_embedding = layers.param(
      rngs, layers.normal(0.01), (cfg.context_length, cfg.width), ("length", "embed")
    )
    self.blocks = layers.LayerStack(
      lambda r: TextBlock(cfg, rngs=r, dtype=dtype), cfg.depth, rngs=rngs, scan=scan, remat=remat
    )
    self.ln_final = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype, rngs)
    self.text_projection = layers.param(
      rngs, layers.normal(cfg.width**-0.5), (cfg.width, embed_dim), ("embed", "joint")
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    """`ids [T, L]`, one text per row -> `[T, embed_dim]`."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return self.packed(ids, jnp.ones_like(ids), positions, jnp.argmax(ids, axis=-1)[:, None])[:, 0]

  def packed(self, tokens: jax.Array, segments: jax.Array, positions: jax.Array, eot: jax.Array) -> jax.Array:
    """Texts packed into rows (see `grain_jax.data.text_packing`) -> the embedding of each.

    Args:
      tokens: `[R, P]` token ids.
      segments: `[R, P]` the text each token belongs to, numbered within its row.
      positions: `[R, P]` each token's position in its text (indexes the positional embedding).
      eot: `[R, M]` the column of each of a row's texts' EOT token.

    Returns:
      `[R, M, embed_dim]`: the m-th text's embedding of each row (values where a row holds fewer
      than M texts are to be ignored).
    """
    table, names = self.token_embedding[...], ("vocab", "embed")
    if split_ways("vocab") > 1:
      # From a table split on both dimensions the lookup replicates the global batch on every
      # device; with `embed` whole (vocabulary still split) it stays on the batch shards, and so
      # does the gradient's scatter-add. A table split on `embed` alone stays so: gathering it
      # costs more than moving the looked-up rows.
      table, names = constrain(table.astype(self.dtype), ("vocab", None)), ("vocab", None)
    x = constrain(looked_up(table, constrain(tokens, RESIDUAL[:2]), names).astype(self.dtype), RESIDUAL)
    # The table is small: whole on every device, the lookup stays on the batch shards.
    position_table = constrain(self.positional_embedding[...].astype(self.dtype), (None, None))
    x = x + jnp.take(position_table, constrain(positions, RESIDUAL[:2]), axis=0)
    length = tokens.shape[1]
    causal = jnp.arange(length)[:, None] >= jnp.arange(length)
    same_text = segments[:, :, None] == segments[:, None, :]
    depth = self.blocks.depth
    x = self.blocks(x, (causal & same_text)[:, None], upto=depth - 1)
    pooled = self.ln_final(self.blocks.view(depth - 1).at_positions(x, eot, segments))
    return pooled @ self.text_projection.astype(self.dtype)


def rows_at(x: jax.Array, positions: jax.Array) -> jax.Array:
  """`x[b, positions[b, n]]` for every b and n: `x [B, T, ...]`, `positions [B, N]` -> `[B, N, ...]`.

  A gather along T: with B sharded (and `positions` alike) each device picks its own rows, with no
  collective (fancy indexing with an arange over B all-reduces and all-gathers them).
  """
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def texts_at(embeds: jax.Array, slots: jax.Array, groups: int) -> jax.Array:
  """Each packed text's embedding: `embeds [G * R, M, E]` from `TextTransformer.packed`, `slots
  [G * n, ...]` (`row * M + m` for a row's m-th text, rows counted within each of the G groups, as
  `grain_jax.data.text_packing` writes them) -> `[G * n, ..., E]`."""
  per_group = embeds.reshape(groups, -1, embeds.shape[-1])
  return rows_at(per_group, slots.reshape(groups, -1)).reshape(*slots.shape, embeds.shape[-1])


def truncate_to_bucket(ids: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Cuts `ids [T, 77]` to the smallest bucket length that keeps every sequence's EOT token.

  Runs on the host so each bucket compiles once; the embeddings are unchanged (see
  TextTransformer). Returns `[T, bucket]`.
  """
  needed = int(np.max(np.argmax(ids, axis=-1))) + 1 if ids.size else 1
  fitting = [bucket for bucket in sorted(buckets) if bucket >= needed]
  length = fitting[0] if fitting else ids.shape[1]
  return ids[:, :length]
