"""Model presets: `tiny` (tests, CPU demo), `small` (ViT-S/16), `b16` (the paper's), `l14`.

Each preset returns the `model` section of a config (see base.py for field meanings).
The text tower is OpenAI CLIP's 512x12x8 for every preset but `tiny`; the decoder is 512 wide,
6 layers, 8 heads for every preset but `tiny`, as in the reference.
"""

import ml_collections

from grain_jax.errors import ConfigError

PRESETS = ("tiny", "small", "b16", "l14")


def _tower(width: int, depth: int, heads: int, **extra) -> dict:
  return dict(width=width, depth=depth, heads=heads, **extra)


def get_model_config(preset: str) -> ml_collections.ConfigDict:
  """The `model` section for `preset`; raises ConfigError naming the preset if unknown."""
  if preset not in PRESETS:
    raise ConfigError(f"config.model preset {preset!r} is unknown; choose one of {PRESETS}")
  clip_text = _tower(512, 12, 8)
  reference_decoder = _tower(512, 6, 8, mlp_dim=2048)
  towers = {
    "tiny": dict(
      embed_dim=64,
      image=_tower(64, 2, 4, image_size=32, patch_size=8),
      text=_tower(64, 2, 4),
      decoder=_tower(64, 2, 4, mlp_dim=128),
    ),
    "small": dict(
      embed_dim=512,
      image=_tower(384, 12, 12, image_size=224, patch_size=16),
      text=clip_text,
      decoder=reference_decoder,
    ),
    "b16": dict(
      embed_dim=512,
      image=_tower(768, 12, 12, image_size=224, patch_size=16),
      text=clip_text,
      decoder=reference_decoder,
    ),
    "l14": dict(
      embed_dim=512,
      image=_tower(1024, 24, 16, image_size=224, patch_size=14),
      text=clip_text,
      decoder=reference_decoder,
    ),
  }[preset]
  model = default_model_config()
  model.preset = preset
  # Scanned stacks compile once per tower instead of once per layer, and run faster: unrolled,
  # XLA:CPU fuses the backward pass across layers into large transposing copies (a third of the
  # ViT-S step in a profile). `tiny` stays unrolled: two layers, nothing to gain.
  model.scan_layers = preset != "tiny"
  model.embed_dim = towers["embed_dim"]
  for section in ("image", "text", "decoder"):
    model[section].update(towers[section])
  return model


def default_model_config() -> ml_collections.ConfigDict:
  """Every model field with its meaning; sizes are the b16 reference."""
  return ml_collections.ConfigDict(
    dict(
      # Preset name this section was built from (informational; sizes below are what count).
      preset="b16",
      # "grain": global image query + region queries; "clip": CLS -> image_projection, no decoder.
      kind="grain",
      # Shared image/text embedding width.
      embed_dim=512,
      # Computation dtype of activations ("float32" or "bfloat16"); parameters stay float32.
      dtype="float32",
      # Rematerialize each transformer block in the backward pass (saves activation memory).
      remat=False,
      # Run the blocks of each tower as a loop over stacked parameters (faster compiles; the presets
      # but `tiny` set it); False unrolls them. Same parameters and same function either way.
      scan_layers=False,
      # A PyTorch file (.pth/.pt/.bin via weights-only torch.load, or .safetensors) to start from when
      # the workdir has no checkpoint yet (grain_jax/torch_format/from_torch.py): a reference GRAIN checkpoint
      # or our export (every parameter), or a CLIP state dict with OpenAI / open_clip names (the towers
      # in init_towers). "" = random initialization.
      init_from="",
      # Towers read from a CLIP state dict: "text" (OpenAI / open_clip text transformer and
      # text_projection) and "image" (only a timm qk-norm ViT: open_clip's `visual.trunk.*`).
      init_towers=("text",),
      image=dict(
        image_size=224,  # input height = width (images are squashed, not cropped)
        patch_size=16,
        width=768,
        depth=12,
        heads=12,
        mlp_ratio=4.0,
        qk_norm=True,  # LayerNorm over each head's q and k (the reference's timm ViT)
        layer_norm_eps=1e-6,
        # "trunc_normal" (timm's ViT init: linear weights N(0, 0.02) truncated, zero biases,
        # LeCun-normal patch embedding) or "pytorch_default" (the authors': PyTorch's default
        # Linear / Conv2d init, U(+-1/sqrt(fan_in)) for weights and biases; grain_jax/models/vit.py).
        init="trunc_normal",
      ),
      text=dict(
        vocab_size=49408,
        context_length=77,
        width=512,
        depth=12,
        heads=8,
        mlp_ratio=4.0,
        layer_norm_eps=1e-5,
        # Evaluation runs its text batches on the shortest of these lengths that holds every EOT
        # (training packs its texts into rows of context_length instead).
        context_buckets=(16, 32, 48, 77),
      ),
      decoder=dict(
        num_region_queries=5,  # plus one global image query (the last)
        width=512,
        depth=6,
        heads=8,
        mlp_dim=2048,
        dropout=0.1,
        layer_norm_eps=1e-5,
        # Position code added to the cross-attention keys: "none" (the authors' code), "learned"
        # (a table per image token), "sine" (2-D sine of each patch's centre; width divisible by
        # 4) or "vit" (the ViT's position embedding through the decoder's input projection).
        memory_position="none",
        # Also add the position code to the cross-attention values: what a query reads then says
        # where it was read.
        position_in_values=False,
        # Learned anchor box per region query, refined by every layer (DAB-DETR style).
        box_refinement=False,
        # With box_refinement: positional queries from the current boxes' sine code (width
        # divisible by 4).
        anchor_queries=False,
      ),
    )
  )
