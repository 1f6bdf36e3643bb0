"""The image encoder: a ViT with qk-norm, as timm's `VisionTransformer(qk_norm=True)`.

Initialization (`config.model.image.init`): "trunc_normal" is timm's ViT init (linear weights
truncated-normal 0.02, zero biases, a LeCun-normal patch embedding); "pytorch_default" is what the
authors' ViT gets (docs/reference_behaviour.md, "Training"): they rebuild the blocks after timm
initialized them, so every linear layer has PyTorch's default `nn.Linear` init, U(-1/sqrt(fan_in),
1/sqrt(fan_in)) for weight and bias, and timm leaves the patch embedding's `Conv2d` at PyTorch's
default, the same law. Position table, CLS token and norms start alike under both.
"""

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from grain_jax.models import layers
from grain_jax.sharding import RESIDUAL, constrain

INITS = ("trunc_normal", "pytorch_default")


def _linear_inits(init: str, fan_in: int) -> tuple[layers.Initializer, layers.Initializer]:
  """(weight, bias) initializers of a linear layer with `fan_in` inputs under `init` (INITS)."""
  if init == "pytorch_default":
    return layers.torch_linear_init(fan_in), layers.torch_linear_init(fan_in)
  return layers.trunc_normal_02, layers.zeros


class VitBlock(nnx.Module):
  """Pre-norm block: `x += attn(norm1(x))`; `x += mlp(norm2(x))`. `[B, T, D] -> [B, T, D]`."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype):
    width, eps = cfg.width, cfg.layer_norm_eps
    hidden = int(width * cfg.mlp_ratio)
    (qkv, qkv_bias), (out, out_bias) = _linear_inits(cfg.init, width), _linear_inits(cfg.init, width)
    (fc1, fc1_bias), (fc2, fc2_bias) = _linear_inits(cfg.init, width), _linear_inits(cfg.init, hidden)
    self.norm1 = layers.layer_norm(width, eps, dtype, rngs)
    self.attn = layers.Attention(
      width,
      cfg.heads,
      rngs=rngs,
      dtype=dtype,
      qk_norm=cfg.qk_norm,
      norm_eps=eps,
      qkv_init=qkv,
      out_init=out,
      qkv_bias_init=qkv_bias,
      out_bias_init=out_bias,
    )
    self.norm2 = layers.layer_norm(width, eps, dtype, rngs)
    self.mlp = layers.Mlp(
      width,
      hidden,
      "gelu",
      rngs=rngs,
      dtype=dtype,
      fc1_init=fc1,
      fc2_init=fc2,
      fc1_bias_init=fc1_bias,
      fc2_bias_init=fc2_bias,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x))
    x = x + self.mlp(self.norm2(x))
    return constrain(x, RESIDUAL)


class VisionTransformer(nnx.Module):
  """`images [B, H, W, 3]` -> all final tokens `[B, 1 + N, D]` (CLS first), after the final norm."""

  def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, scan: bool = False, remat: bool = False):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(
        f"config.model.image.image_size={cfg.image_size} is not a multiple of "
        f"config.model.image.patch_size={cfg.patch_size}"
      )
    if cfg.init not in INITS:
      raise ValueError(f"config.model.image.init={cfg.init!r} must be one of {INITS}")
    self.patch_size, self.dtype = cfg.patch_size, dtype
    num_patches = (cfg.image_size // cfg.patch_size) ** 2
    patch_in = cfg.patch_size * cfg.patch_size * 3
    patch_init = (
      layers.torch_linear_init(patch_in)
      if cfg.init == "pytorch_default"
      else jax.nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    )
    self.patch_kernel = layers.param(
      rngs, patch_init, (cfg.patch_size, cfg.patch_size, 3, cfg.width), ("patch", "patch", "patch", "embed")
    )
    self.patch_bias = layers.param(rngs, layers.torch_linear_init(patch_in), (cfg.width,), ("embed",))
    self.cls_token = layers.param(rngs, layers.normal(1e-6), (1, 1, cfg.width), (None, None, "embed"))
    self.pos_embed = layers.param(
      rngs, layers.trunc_normal_02, (1, 1 + num_patches, cfg.width), (None, "length", "embed")
    )
    self.blocks = layers.LayerStack(
      lambda r: VitBlock(cfg, rngs=r, dtype=dtype), cfg.depth, rngs=rngs, scan=scan, remat=remat
    )
    self.norm = layers.layer_norm(cfg.width, cfg.layer_norm_eps, dtype, rngs)

  def _embed(self, images: jax.Array) -> jax.Array:
    """`images [B, H, W, 3]` -> the first block's input `[B, 1 + N, D]`."""
    # Row-major over the patch grid, as the PyTorch conv's flattened output.
    patches = einops.rearrange(images, "b (h i) (w j) c -> b (h w) i j c", i=self.patch_size, j=self.patch_size)
    x = jnp.einsum("bnijc,ijcd->bnd", patches.astype(self.dtype), self.patch_kernel.astype(self.dtype))
    x = x + self.patch_bias.astype(self.dtype)
    cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(self.dtype)
    return constrain(x, RESIDUAL)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.norm(self.blocks(self._embed(images)))

  def last_block_attention(self, images: jax.Array) -> jax.Array:
    """The last block's self-attention weights `[B, heads, 1 + N, 1 + N]` (row 0: what CLS reads)."""
    x = self._embed(images)
    if self.blocks.depth > 1:
      x = self.blocks(x, upto=self.blocks.depth - 1)
    last = self.blocks.view(-1)
    return last.attn.weights(last.norm1(x))
