"""The one table between our parameters and the reference PyTorch checkpoint's names and shapes.

Export and import both read `reference_layout`: each entry names a PyTorch key, the path of our
parameter and the (exactly invertible) transform between the two layouts. Towers whose blocks are
stacked on a leading `layers` axis map to one PyTorch key per block (`...resblocks.{layer}...`).

PyTorch keys live in two state dicts, as in the reference checkpoint: `backbone` (the CLIP model:
timm `VisionTransformer(qk_norm=True)` names under `visual.`, OpenAI-CLIP text names) and
`decoder` (the DETR-style region-query decoder). Parameters the reference declares but never
trains (`untrained_shapes`) are written as zeros with their reference shapes and ignored on import.
"""

from typing import Callable, Iterable, Mapping, NamedTuple

import einops
import numpy as np

from grain_jax.errors import UserError

Path = tuple[str | int, ...]
StateDict = dict[str, np.ndarray]

BACKBONE, DECODER = "backbone", "decoder"
# The reference checkpoint's names for the two state dicts.
GROUP_NAMES = {BACKBONE: "backbone_state_dict", DECODER: "state_dict"}
# Our name for the decoder's state dict when it has options the reference lacks (`group_names`).
EXTENDED_DECODER_GROUP = "grain_jax_decoder_state_dict"
MODULE_PREFIX = "module."  # what the reference's DDP-wrapped loaders expect on every key
# The reference decoder's class head (22047 classes + "no object"), its 512-patch positional
# table and 4-frame temporal table: declared by the reference, unused by its forward pass.
REFERENCE_CLASSES, REFERENCE_PATCHES, REFERENCE_FRAMES = 22048, 512, 4


class Transform(NamedTuple):
  """`to_torch(ours) -> torch layout`; `from_torch(torch layout, our shape) -> ours`."""

  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


COPY = Transform(lambda x: x, lambda x, shape: x)
# Flax kernels are [in, out], PyTorch Linear weights [out, in].
LINEAR = Transform(lambda k: k.T, lambda w, shape: w.T)
# [embed, 3, heads, kv] -> [3 * heads * kv, embed]: q, k, v then heads, as nn.MultiheadAttention
# and timm's qkv Linear pack them.
QKV = Transform(
  lambda k: einops.rearrange(k, "d n h k -> (n h k) d"),
  lambda w, shape: einops.rearrange(w, "(n h k) d -> d n h k", n=shape[1], h=shape[2]),
)
FLAT = Transform(lambda b: b.reshape(-1), lambda b, shape: b.reshape(shape))
# [heads, kv, embed] -> [embed, heads * kv].
ATTENTION_OUT = Transform(
  lambda k: einops.rearrange(k, "h k d -> d (h k)"),
  lambda w, shape: einops.rearrange(w, "d (h k) -> h k d", h=shape[0]),
)
# [p, p, 3, width] (patch rows, columns, channels) -> Conv2d [width, 3, p, p].
PATCH = Transform(
  lambda k: einops.rearrange(k, "i j c d -> d c i j"), lambda w, shape: einops.rearrange(w, "d c i j -> i j c d")
)


class Entry(NamedTuple):
  """One PyTorch key (with `{layer}` when `layered`) <-> one of our parameters.

  tower: "text", "image", "decoder" or "shared" (logit_scale, image_projection): an initialization
    from a CLIP state dict reads only the towers it names.
  """

  state_dict: str
  key: str
  path: Path
  transform: Transform
  tower: str
  layered: bool = False


class LayoutMismatchError(UserError, ValueError):
  """A PyTorch file is no state dict, or does not fit the model (every missing, unexpected or
  misshapen key is listed)."""


def _norm(state_dict, key, path, tower, layered=False) -> list[Entry]:
  return [
    Entry(state_dict, f"{key}.weight", path + ("scale",), COPY, tower, layered),
    Entry(state_dict, f"{key}.bias", path + ("bias",), COPY, tower, layered),
  ]


def _linear(state_dict, key, path, tower, layered=False, bias=True) -> list[Entry]:
  entries = [Entry(state_dict, f"{key}.weight", path + ("kernel",), LINEAR, tower, layered)]
  if bias:
    entries.append(Entry(state_dict, f"{key}.bias", path + ("bias",), COPY, tower, layered))
  return entries


def _attention(state_dict, key, path, tower, packed_names) -> list[Entry]:
  """`packed_names`: PyTorch names of (qkv weight, qkv bias, out weight, out bias) under `key`."""
  transforms = (QKV, FLAT, ATTENTION_OUT, COPY)
  ours = ("qkv_kernel", "qkv_bias", "out_kernel", "out_bias")
  return [
    Entry(state_dict, f"{key}.{name}", path + (our,), transform, tower, True)
    for name, our, transform in zip(packed_names, ours, transforms)
  ]


MULTIHEAD = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
TIMM = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")


def _text_tower() -> list[Entry]:
  block, ours = "transformer.resblocks.{layer}", ("text", "blocks", "blocks")
  return [
    Entry(BACKBONE, "token_embedding.weight", ("text", "token_embedding"), COPY, "text"),
    Entry(BACKBONE, "positional_embedding", ("text", "positional_embedding"), COPY, "text"),
    Entry(BACKBONE, "text_projection", ("text", "text_projection"), COPY, "text"),
    *_norm(BACKBONE, "ln_final", ("text", "ln_final"), "text"),
    *_norm(BACKBONE, f"{block}.ln_1", ours + ("ln_1",), "text", True),
    *_norm(BACKBONE, f"{block}.ln_2", ours + ("ln_2",), "text", True),
    *_attention(BACKBONE, f"{block}.attn", ours + ("attn",), "text", MULTIHEAD),
    *_linear(BACKBONE, f"{block}.mlp.c_fc", ours + ("mlp", "fc1"), "text", True),
    *_linear(BACKBONE, f"{block}.mlp.c_proj", ours + ("mlp", "fc2"), "text", True),
  ]


def _image_tower(qk_norm: bool) -> list[Entry]:
  block, ours = "visual.blocks.{layer}", ("visual", "blocks", "blocks")
  entries = [
    Entry(BACKBONE, "visual.cls_token", ("visual", "cls_token"), COPY, "image"),
    Entry(BACKBONE, "visual.pos_embed", ("visual", "pos_embed"), COPY, "image"),
    Entry(BACKBONE, "visual.patch_embed.proj.weight", ("visual", "patch_kernel"), PATCH, "image"),
    Entry(BACKBONE, "visual.patch_embed.proj.bias", ("visual", "patch_bias"), COPY, "image"),
    *_norm(BACKBONE, "visual.norm", ("visual", "norm"), "image"),
    *_norm(BACKBONE, f"{block}.norm1", ours + ("norm1",), "image", True),
    *_norm(BACKBONE, f"{block}.norm2", ours + ("norm2",), "image", True),
    *_attention(BACKBONE, f"{block}.attn", ours + ("attn",), "image", TIMM),
    *_linear(BACKBONE, f"{block}.mlp.fc1", ours + ("mlp", "fc1"), "image", True),
    *_linear(BACKBONE, f"{block}.mlp.fc2", ours + ("mlp", "fc2"), "image", True),
  ]
  if qk_norm:
    for name in ("q_norm", "k_norm"):
      entries += _norm(BACKBONE, f"{block}.attn.{name}", ours + ("attn", name), "image", True)
  return entries


def _decoder(decoder_cfg) -> list[Entry]:
  layer, ours = "transformer.decoder.layers.{layer}", ("decoder", "layers", "blocks")
  entries = [
    Entry(DECODER, "obj_proj", ("decoder", "obj_proj"), COPY, "decoder"),
    Entry(DECODER, "img_proj", ("decoder", "img_proj"), COPY, "decoder"),
    Entry(DECODER, "query_embed.weight", ("decoder", "query_embed"), COPY, "decoder"),
    *_linear(DECODER, "proj", ("decoder", "proj"), "decoder", bias=False),
    *_norm(DECODER, "transformer.pre_norm", ("decoder", "pre_norm"), "decoder"),
    *_norm(DECODER, "transformer.decoder.norm", ("decoder", "norm"), "decoder"),
    *_attention(DECODER, f"{layer}.self_attn", ours + ("self_attn",), "decoder", MULTIHEAD),
    *_attention(DECODER, f"{layer}.multihead_attn", ours + ("multihead_attn",), "decoder", MULTIHEAD),
    *_linear(DECODER, f"{layer}.linear1", ours + ("mlp", "fc1"), "decoder", True),
    *_linear(DECODER, f"{layer}.linear2", ours + ("mlp", "fc2"), "decoder", True),
  ]
  for index in (1, 2, 3):
    entries += _norm(DECODER, f"{layer}.norm{index}", ours + (f"norm{index}",), "decoder", True)
  for index in range(3):
    entries += _linear(DECODER, f"bbox_embed.layers.{index}", ("decoder", "bbox_embed", "layers", index), "decoder")
  # Options the reference lacks, under names of our own (see `decoder_extensions`).
  if decoder_cfg.memory_position == "learned":
    entries.append(Entry(DECODER, "memory_pos_embed", ("decoder", "memory_pos_embed"), COPY, "decoder"))
  if decoder_cfg.box_refinement:
    entries.append(Entry(DECODER, "anchor_box_logits", ("decoder", "anchors"), COPY, "decoder"))
  if decoder_cfg.anchor_queries:
    for index in range(2):
      entries += _linear(
        DECODER, f"anchor_pos_mlp.layers.{index}", ("decoder", "anchor_positions", "layers", index), "decoder"
      )
  return entries


def decoder_extensions(model_config) -> list[str]:
  """The `config.model.decoder` options of a GRAIN model that the reference's classes lack, as
  `field=value` strings; empty for the reference decoder (and for the plain-CLIP baseline).

  `model_config` is the `config.model` section, or its plain-dict form from an export's metadata.
  """
  if model_config["kind"] != "grain":
    return []
  decoder, reference = (
    model_config["decoder"],
    dict(memory_position="none", position_in_values=False, box_refinement=False, anchor_queries=False),
  )
  return [
    f"{field}={decoder.get(field, value)!r}" for field, value in reference.items() if decoder.get(field, value) != value
  ]


def group_names(model_config) -> dict[str, str]:
  """Our state dicts -> their names in the checkpoint. A decoder with `decoder_extensions` is written
  as EXTENDED_DECODER_GROUP instead of `state_dict`: the reference's loaders (which read
  `state_dict`) then stop instead of running a different model with the same weights."""
  if decoder_extensions(model_config):
    return {BACKBONE: GROUP_NAMES[BACKBONE], DECODER: EXTENDED_DECODER_GROUP}
  return dict(GROUP_NAMES)


def reference_layout(model_config) -> list[Entry]:
  """Every trained parameter of `model_config` (kind "grain" or "clip") and its PyTorch key."""
  entries = _text_tower() + _image_tower(model_config.image.qk_norm)
  entries.append(Entry(BACKBONE, "logit_scale", ("logit_scale",), COPY, "shared"))
  if model_config.kind == "clip":
    entries.append(Entry(BACKBONE, "image_projection", ("image_projection",), COPY, "shared"))
  else:
    entries += _decoder(model_config.decoder)
  return entries


def untrained_shapes(model_config) -> dict[tuple[str, str], tuple[int, ...]]:
  """(state dict, key) -> shape of what the reference declares but GRAIN never trains."""
  if model_config.kind == "clip":
    return {}
  width = model_config.decoder.width
  return {
    (BACKBONE, "image_projection"): (model_config.image.width, model_config.embed_dim),
    (DECODER, "class_embed.weight"): (REFERENCE_CLASSES, width),
    (DECODER, "class_embed.bias"): (REFERENCE_CLASSES,),
    (DECODER, "pos_embed"): (1, REFERENCE_PATCHES + 1, width),
    (DECODER, "temporal_embed"): (1, REFERENCE_FRAMES, width),
  }


def strip_module_prefix(state_dict: dict) -> dict:
  """Drops the `module.` prefix DistributedDataParallel adds, when every key has it."""
  if state_dict and all(key.startswith(MODULE_PREFIX) for key in state_dict):
    return {key[len(MODULE_PREFIX) :]: value for key, value in state_dict.items()}
  return state_dict


def _keys(entry: Entry, depth: int) -> list[str]:
  return [entry.key.format(layer=index) for index in range(depth)] if entry.layered else [entry.key]


def to_reference(
  params: Mapping[Path, object], model_config, fetch: Callable[[object], np.ndarray] = np.asarray
) -> dict[str, StateDict]:
  """Our parameters (path -> array) -> `{"backbone": {key: array}, "decoder": {...}}` in float32.

  `fetch` brings one parameter to the host at a time (e.g. gathering a sharded array).
  The decoder dict is empty for the plain-CLIP baseline.
  """
  state_dicts: dict[str, StateDict] = {BACKBONE: {}, DECODER: {}}
  for entry in reference_layout(model_config):
    value = np.asarray(fetch(params[entry.path]), np.float32)
    parts = list(value) if entry.layered else [value]
    for key, part in zip(_keys(entry, len(parts)), parts):
      state_dicts[entry.state_dict][key] = np.array(entry.transform.to_torch(part), order="C")
  for (state_dict, key), shape in untrained_shapes(model_config).items():
    state_dicts[state_dict][key] = np.zeros(shape, np.float32)
  return state_dicts


class Slot(NamedTuple):
  """Where one layer of an entry goes: its PyTorch key, our shape for it (without the `layers` axis)
  and its PyTorch shape."""

  key: str
  our_shape: tuple[int, ...]
  torch_shape: tuple[int, ...]


def _slots(entry: Entry, our_shape: tuple[int, ...]) -> list[Slot]:
  layer_shape = our_shape[1:] if entry.layered else our_shape
  # np.empty commits no memory for untouched pages, so even the token embedding costs nothing.
  torch_shape = entry.transform.to_torch(np.empty(layer_shape, np.float32)).shape
  return [Slot(key, layer_shape, torch_shape) for key in _keys(entry, our_shape[0] if entry.layered else 1)]


def torch_shapes(shapes: Mapping[Path, tuple[int, ...]], model_config) -> dict[tuple[str, str], tuple[int, ...]]:
  """(state dict, key) -> PyTorch shape of every trained parameter, given our shapes by path."""
  return {
    (entry.state_dict, slot.key): slot.torch_shape
    for entry in reference_layout(model_config)
    for slot in _slots(entry, tuple(shapes[entry.path]))
  }


def _listing(title: str, items: list[str], limit: int = 20) -> str:
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in items[:limit]) + more


def from_reference(
  state_dicts: Mapping[str, Mapping[str, np.ndarray]],
  shapes: Mapping[Path, tuple[int, ...]],
  model_config,
  towers: Iterable[str] | None = None,
  source: str = "checkpoint",
) -> dict[Path, np.ndarray]:
  """PyTorch state dicts -> our parameters (path -> float32 array of the shape in `shapes`).

  Args:
    state_dicts: `{"backbone": {...}, "decoder": {...}}` (keys without a `module.` prefix).
    shapes: our parameter shapes by path (e.g. from the model's abstract state).
    model_config: the `config.model` section the parameters belong to.
    towers: when given, only parameters of these towers ("text", "image", "decoder", "shared") are
      read and keys outside them are ignored; None reads every parameter and rejects unknown keys.
    source: the file name used in error messages.

  Raises:
    LayoutMismatchError listing every missing, unexpected and misshapen key.
  """
  entries = [entry for entry in reference_layout(model_config) if towers is None or entry.tower in towers]
  missing, mismatched, params, known = [], [], {}, set(untrained_shapes(model_config))
  for entry in entries:
    parts = []
    slots = _slots(entry, tuple(shapes[entry.path]))
    for slot in slots:
      known.add((entry.state_dict, slot.key))
      value = state_dicts.get(entry.state_dict, {}).get(slot.key)
      if value is None:
        missing.append(f"{entry.state_dict}: {slot.key} {list(slot.torch_shape)}")
      elif tuple(value.shape) != slot.torch_shape:
        mismatched.append(
          f"{entry.state_dict}: {slot.key} is {list(value.shape)}, the model needs {list(slot.torch_shape)}"
        )
      else:
        parts.append(entry.transform.from_torch(np.asarray(value, np.float32), slot.our_shape))
    if len(parts) == len(slots):
      params[entry.path] = np.stack(parts) if entry.layered else parts[0]
  unexpected = (
    []
    if towers is not None
    else [
      f"{name}: {key}" for name, state_dict in state_dicts.items() for key in state_dict if (name, key) not in known
    ]
  )
  if missing or mismatched or unexpected:
    sections = [
      _listing(title, items)
      for title, items in (("missing", missing), ("wrong shape", mismatched), ("unexpected", unexpected))
      if items
    ]
    raise LayoutMismatchError(
      f"{source} does not fit config.model (kind={model_config.kind!r}, "
      f"preset={model_config.preset!r}):\n" + "\n".join(sections)
    )
  return params
