"""PyTorch twins of the GRAIN model, named exactly as the reference checkpoint (needs torch, not JAX).

  backbone, decoder = load_exported("runs/x/export/grain_clip.pth")   # strict=True loading
  tokens = backbone.visual(images)               # images [B, 3, H, W], ImageNet-normalized
  global_embed, region_embed, boxes = decoder(tokens, backbone.visual.pos_embed)
  text_embed = backbone.encode_text(token_ids)   # [T, L] int64 CLIP BPE ids

The vision tower has timm `VisionTransformer(qk_norm=True, num_classes=0)`'s names, the text tower
OpenAI CLIP's, the decoder the reference's DETR-style decoder (with its declared but unused
`class_embed`, `pos_embed`, `temporal_embed`). Everything runs in eval mode as plain float32 PyTorch.
"""

import collections
import math

import einops
import torch
from torch import nn

from grain_jax.models import positions
from grain_jax.torch_format.layout import (
  REFERENCE_CLASSES,
  REFERENCE_FRAMES,
  REFERENCE_PATCHES,
  group_names,
  strip_module_prefix,
)


class TimmAttention(nn.Module):
  """timm's Attention with qk-norm: packed `qkv` Linear, LayerNorm over each head's q and k, and
  `scaled_dot_product_attention` (timm's default fused path)."""

  def __init__(self, width: int, heads: int, eps: float, qk_norm: bool):
    super().__init__()
    self.heads, self.head_dim = heads, width // heads
    self.qkv = nn.Linear(width, 3 * width)
    self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
    self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
    self.proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    q, k, v = einops.rearrange(self.qkv(x), "b t (n h k) -> n b h t k", n=3, h=self.heads)
    attended = nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
    return self.proj(einops.rearrange(attended, "b h t k -> b t (h k)"))


class TimmMlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class VitBlock(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    eps = cfg["layer_norm_eps"]
    self.norm1 = nn.LayerNorm(cfg["width"], eps=eps)
    self.attn = TimmAttention(cfg["width"], cfg["heads"], eps, cfg["qk_norm"])
    self.norm2 = nn.LayerNorm(cfg["width"], eps=eps)
    self.mlp = TimmMlp(cfg["width"], int(cfg["width"] * cfg["mlp_ratio"]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch_size: int, width: int):
    super().__init__()
    self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size)


class QkNormVisionTransformer(nn.Module):
  """`images [B, 3, H, W]` -> every final token `[B, 1 + N, D]` (CLS first), after the final norm."""

  def __init__(self, cfg):
    super().__init__()
    width, num_patches = cfg["width"], (cfg["image_size"] // cfg["patch_size"]) ** 2
    self.patch_embed = PatchEmbed(cfg["patch_size"], width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, width))
    self.blocks = nn.ModuleList(VitBlock(cfg) for _ in range(cfg["depth"]))
    self.norm = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = einops.rearrange(self.patch_embed.proj(images), "b d h w -> b (h w) d")
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class QuickGELU(nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  """OpenAI CLIP's text block: `x += attn(ln_1(x), causal)`; `x += mlp(ln_2(x))`."""

  def __init__(self, cfg):
    super().__init__()
    width, eps = cfg["width"], cfg["layer_norm_eps"]
    self.attn = nn.MultiheadAttention(width, cfg["heads"], batch_first=True)
    self.ln_1 = nn.LayerNorm(width, eps=eps)
    hidden = int(width * cfg["mlp_ratio"])
    self.mlp = nn.Sequential(
      collections.OrderedDict(c_fc=nn.Linear(width, hidden), gelu=QuickGELU(), c_proj=nn.Linear(hidden, width))
    )
    self.ln_2 = nn.LayerNorm(width, eps=eps)

  def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    normed = self.ln_1(x)
    x = x + self.attn(normed, normed, normed, attn_mask=blocked, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class TextStack(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg["depth"]))


class GrainClipBackbone(nn.Module):
  """The reference's CLIP model: `visual` (qk-norm ViT) and the OpenAI-CLIP text tower.

  `encode_image` is the plain-CLIP baseline's path (CLS -> `image_projection`); GRAIN reads the
  image through `visual` and the decoder instead.
  """

  def __init__(self, model_config):
    super().__init__()
    text, embed_dim = model_config["text"], model_config["embed_dim"]
    self.visual = QkNormVisionTransformer(model_config["image"])
    self.transformer = TextStack(text)
    self.token_embedding = nn.Embedding(text["vocab_size"], text["width"])
    self.positional_embedding = nn.Parameter(torch.zeros(text["context_length"], text["width"]))
    self.ln_final = nn.LayerNorm(text["width"], eps=text["layer_norm_eps"])
    self.image_projection = nn.Parameter(torch.zeros(model_config["image"]["width"], embed_dim))
    self.text_projection = nn.Parameter(torch.zeros(text["width"], embed_dim))
    self.logit_scale = nn.Parameter(torch.zeros(()))

  def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
    """`ids [T, L]` (L <= context length; EOT = highest id) -> `[T, E]`, not normalized."""
    length = ids.shape[1]
    x = self.token_embedding(ids) + self.positional_embedding[:length]
    blocked = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
    for block in self.transformer.resblocks:
      x = block(x, blocked)
    x = self.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

  def encode_image(self, images: torch.Tensor) -> torch.Tensor:
    """Plain-CLIP baseline: `images [B, 3, H, W]` -> `[B, E]`, not normalized."""
    return self.visual(images)[:, 0] @ self.image_projection


class DecoderLayer(nn.Module):
  """Pre-norm DETR layer: self-attention (query positions in q, k), cross-attention, ReLU FFN."""

  def __init__(self, cfg):
    super().__init__()
    width, heads, dropout, eps = cfg["width"], cfg["heads"], cfg["dropout"], cfg["layer_norm_eps"]
    self.multihead_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
    self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
    self.linear1 = nn.Linear(width, cfg["mlp_dim"])
    self.dropout = nn.Dropout(dropout)
    self.linear2 = nn.Linear(cfg["mlp_dim"], width)
    self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width, eps=eps) for _ in range(3))
    self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

  def forward(
    self,
    targets: torch.Tensor,
    memory: torch.Tensor,
    query_pos: torch.Tensor,
    memory_pos: torch.Tensor | None = None,
    position_in_values: bool = False,
  ) -> torch.Tensor:
    normed = self.norm1(targets)
    with_pos = normed + query_pos
    targets = targets + self.dropout1(self.self_attn(with_pos, with_pos, normed, need_weights=False)[0])
    keys = memory if memory_pos is None else memory + memory_pos
    values = keys if position_in_values else memory
    attended = self.multihead_attn(self.norm2(targets) + query_pos, keys, values, need_weights=False)[0]
    targets = targets + self.dropout2(attended)
    hidden = self.linear2(self.dropout(torch.relu(self.linear1(self.norm3(targets)))))
    return targets + self.dropout3(hidden)


class DecoderStack(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["depth"]))
    self.norm = nn.LayerNorm(cfg["width"], eps=cfg["layer_norm_eps"])


class DecoderTransformer(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    self.pre_norm = nn.LayerNorm(cfg["width"], eps=cfg["layer_norm_eps"])
    self.decoder = DecoderStack(cfg)


class BoxMlp(nn.Module):
  """ReLU MLP; the box head (3 layers, sigmoid applied by the caller) and the anchor MLP (2 layers)."""

  def __init__(self, sizes: list[int]):
    super().__init__()
    self.layers = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(sizes, sizes[1:]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for index, layer in enumerate(self.layers):
      x = layer(x) if index == len(self.layers) - 1 else torch.relu(layer(x))
    return x


def sine_encode(coords: torch.Tensor, features_per_coord: int) -> torch.Tensor:
  """`[..., n]` in [0, 1] -> `[..., n * F]`: (sin, cos) pairs of 2 pi x / 10000^(2i / F) per coordinate
  (grain_jax.models.positions, in torch)."""
  exponents = torch.arange(features_per_coord // 2, dtype=torch.float32, device=coords.device) * 2 / features_per_coord
  angles = coords.float()[..., None] * (2 * math.pi) / positions.TEMPERATURE**exponents
  return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-3)


class RegionQueryDecoder(nn.Module):
  """ViT tokens `[B, T, image_width]` -> (global `[B, E]`, regions `[B, Q, E]`, boxes `[L, B, Q, 4]`).

  Boxes are normalized (cx, cy, w, h) at every decoder layer; embeddings are not normalized. With
  the decoder options the reference lacks (`memory_position`, `position_in_values`, `box_refinement`,
  `anchor_queries`)
  it computes what grain_jax.models.decoder does with them; `memory_position="vit"` needs the ViT's
  position embedding (`backbone.visual.pos_embed`) as the second argument.
  """

  def __init__(self, model_config):
    super().__init__()
    cfg, embed_dim, image = model_config["decoder"], model_config["embed_dim"], model_config["image"]
    width = cfg["width"]
    self.num_region_queries = cfg["num_region_queries"]
    self.memory_position = cfg.get("memory_position", "none")
    self.position_in_values = cfg.get("position_in_values", False)
    self.transformer = DecoderTransformer(cfg)
    self.class_embed = nn.Linear(width, REFERENCE_CLASSES)
    self.bbox_embed = BoxMlp([width, width, width, 4])
    self.query_embed = nn.Embedding(self.num_region_queries + 1, width)
    self.pos_embed = nn.Parameter(torch.zeros(1, REFERENCE_PATCHES + 1, width))
    self.temporal_embed = nn.Parameter(torch.zeros(1, REFERENCE_FRAMES, width))
    self.proj = nn.Linear(image["width"], width, bias=False)
    self.obj_proj = nn.Parameter(torch.zeros(width, embed_dim))
    self.img_proj = nn.Parameter(torch.zeros(width, embed_dim))
    grid = image["image_size"] // image["patch_size"]
    if self.memory_position == "learned":
      self.memory_pos_embed = nn.Parameter(torch.zeros(1 + grid * grid, width))
    if self.memory_position == "sine":
      self.register_buffer("sine_table", torch.from_numpy(positions.patch_grid_table(grid, width)), persistent=False)
    self.anchor_box_logits = (
      nn.Parameter(torch.zeros(self.num_region_queries, 4)) if cfg.get("box_refinement") else None
    )
    self.anchor_pos_mlp = BoxMlp([2 * width, width, width]) if cfg.get("anchor_queries") else None

  def _memory_pos(self, vit_pos_embed: torch.Tensor | None) -> torch.Tensor | None:
    if self.memory_position == "learned":
      return self.memory_pos_embed[None]
    if self.memory_position == "sine":
      return self.sine_table[None]
    if self.memory_position == "vit":
      if vit_pos_embed is None:
        raise ValueError(
          "memory_position='vit': call the decoder with backbone.visual.pos_embed as its second argument"
        )
      return self.proj(vit_pos_embed)
    return None

  def _query_pos(self, boxes: torch.Tensor | None) -> torch.Tensor:
    query_pos = self.query_embed.weight[None]
    if self.anchor_pos_mlp is None:
      return query_pos
    width = query_pos.shape[-1]
    regions = query_pos[:, : self.num_region_queries] + self.anchor_pos_mlp(sine_encode(boxes, width // 2))
    return torch.cat([regions, query_pos[:, self.num_region_queries :].expand(boxes.shape[0], -1, -1)], dim=1)

  def forward(
    self,
    image_tokens: torch.Tensor,
    vit_pos_embed: torch.Tensor | None = None,
  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    memory = self.transformer.pre_norm(self.proj(image_tokens))
    memory_pos = self._memory_pos(vit_pos_embed)
    batch, queries = image_tokens.shape[0], self.num_region_queries
    targets = torch.zeros(batch, queries + 1, memory.shape[-1], dtype=memory.dtype, device=memory.device)
    # With box refinement each layer corrects the box it starts from, which is the previous layer's
    # box detached (the learned anchors for the first layer), as in grain_jax.models.decoder.
    start = None if self.anchor_box_logits is None else self.anchor_box_logits[None].expand(batch, -1, -1)
    per_layer, boxes = [], []
    for layer in self.transformer.decoder.layers:
      query_pos = self._query_pos(None if start is None else start.sigmoid())
      targets = layer(targets, memory, query_pos, memory_pos, self.position_in_values)
      hidden = self.transformer.decoder.norm(targets)
      per_layer.append(hidden)
      if start is not None:
        box_logits = start + self.bbox_embed(hidden[:, :queries])
        boxes.append(box_logits.sigmoid())
        start = box_logits.detach()
    hidden = torch.stack(per_layer)
    boxes = torch.stack(boxes) if boxes else self.bbox_embed(hidden[:, :, :queries]).sigmoid()
    regions, image_query = hidden[-1, :, :queries], hidden[-1, :, queries]
    return image_query @ self.img_proj, regions @ self.obj_proj, boxes


def load_exported(path: str) -> tuple[GrainClipBackbone, RegionQueryDecoder | None]:
  """The twins of an exported `grain_clip.pth` (weights-only unpickling, `strict=True`), in eval mode.

  The decoder is None for a plain-CLIP baseline export.
  """
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  model_config = checkpoint["config"]["model"]
  backbone = GrainClipBackbone(model_config)
  backbone.load_state_dict(strip_module_prefix(checkpoint["backbone_state_dict"]), strict=True)
  decoder = None
  if model_config["kind"] == "grain":
    decoder = RegionQueryDecoder(model_config)
    decoder.load_state_dict(strip_module_prefix(checkpoint[group_names(model_config)["decoder"]]), strict=True)
    decoder.eval()
  backbone.eval()
  return backbone, decoder
