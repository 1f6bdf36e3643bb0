"""Import: a reference PyTorch checkpoint, or the towers of a standard CLIP checkpoint, into our parameters.

Files are read with safetensors or `torch.load(weights_only=True)`; nothing else is ever unpickled.
Accepted layouts:
  - the reference's (and our export's) `{'backbone_state_dict', 'state_dict', ...}`, as `.pth` or as
    our `.safetensors` (keys prefixed `backbone_state_dict.` / `state_dict.`): every parameter;
  - a CLIP state dict with OpenAI / open_clip names (plain, or an open_clip training checkpoint's
    `{'state_dict': ...}`): the text tower, and with "image" the vision tower when it is a timm
    qk-norm ViT (the reference's `visual.*`, or open_clip's timm models' `visual.trunk.*`).
A `module.` prefix (DDP) is stripped. OpenAI's own ViT (`visual.conv1`, `ln_pre`, no qk-norm,
QuickGELU) is a different architecture from our image tower and is refused with that explanation.
TorchScript archives (OpenAI's released `.pt`) must first be saved as a plain state dict.
"""

import os
from typing import NamedTuple

import numpy as np

from grain_jax.errors import BadFileError
from grain_jax.torch_format import layout, param_tree

# Checkpoint group -> our state dict: "backbone_state_dict" -> "backbone", "state_dict" -> "decoder".
GROUPS = {group: name for name, group in layout.GROUP_NAMES.items()} | {layout.EXTENDED_DECODER_GROUP: layout.DECODER}
OPEN_CLIP_TIMM_TRUNK = "visual.trunk."
OPENAI_VISION_KEY = "visual.conv1.weight"


class TorchCheckpoint(NamedTuple):
  """state_dicts: `{"backbone": {key: float32 array}, "decoder": {...}}`, `module.` stripped.
  reference: whether the file had the reference's `backbone_state_dict` (else a CLIP state dict).
  """

  state_dicts: dict[str, layout.StateDict]
  reference: bool


def _to_numpy(value) -> np.ndarray | None:
  """A torch tensor or numpy array as float32 numpy; None for anything else (sizes, names, ...)."""
  if hasattr(value, "detach"):
    return value.detach().float().cpu().numpy()
  return np.asarray(value, np.float32) if isinstance(value, np.ndarray) else None


def _as_state_dict(mapping) -> layout.StateDict:
  converted = {key: _to_numpy(value) for key, value in mapping.items()}
  return layout.strip_module_prefix({key: value for key, value in converted.items() if value is not None})


def _read_safetensors(path: str) -> dict:
  """Our export's grouped keys -> nested dicts; any other file is one flat state dict."""
  try:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
  except ImportError:
    raise ImportError(f"reading {path} needs safetensors (pip install -r requirements-export.txt)") from None

  try:
    flat = load_file(path)
  except SafetensorError as error:
    raise BadFileError(f"{path} is not a readable safetensors file ({error})") from None
  grouped: dict[str, dict] = {}
  for key, value in flat.items():
    group, _, name = key.partition(".")
    if group not in GROUPS:
      return flat
    grouped.setdefault(group, {})[name] = value
  return grouped


def _read_torch(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise ImportError(
      f"reading {path} needs torch (pip install -r requirements-export.txt), or convert it to .safetensors"
    ) from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # noqa: BLE001 - pickle/zip errors of every kind mean the same to a user
    raise layout.LayoutMismatchError(
      f"{path} is not a weights-only PyTorch checkpoint ({type(error).__name__}: "
      f"{str(error).splitlines()[0]}); a TorchScript archive must first be saved as "
      "torch.save(torch.jit.load(path).state_dict(), new_path)"
    ) from None


def read_checkpoint(path: str) -> TorchCheckpoint:
  """Reads a `.safetensors` or PyTorch file (see the module doc for the accepted layouts)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  top = _read_safetensors(path) if path.endswith(".safetensors") else _read_torch(path)
  if not isinstance(top, dict):
    raise layout.LayoutMismatchError(f"{path} holds a {type(top).__name__}, not a state dict")
  if "backbone_state_dict" in top:
    return TorchCheckpoint(
      {GROUPS[group]: _as_state_dict(top[group]) for group in GROUPS if group in top}, reference=True
    )
  clip = top["state_dict"] if isinstance(top.get("state_dict"), dict) else top
  return TorchCheckpoint({layout.BACKBONE: _as_state_dict(clip)}, reference=False)


def _clip_names(backbone: layout.StateDict, towers, path: str) -> layout.StateDict:
  """open_clip's timm trunk -> the reference's `visual.` names; refuses OpenAI's own ViT."""
  if "image" in towers and OPENAI_VISION_KEY in backbone:
    raise layout.LayoutMismatchError(
      f"{path} has OpenAI CLIP's vision tower ({OPENAI_VISION_KEY}, ln_pre, no qk-norm, QuickGELU), a "
      "different architecture from our qk-norm ViT: initialize only the text tower "
      "(config.model.init_towers=('text',))"
    )
  return {
    ("visual." + key[len(OPEN_CLIP_TIMM_TRUNK) :] if key.startswith(OPEN_CLIP_TIMM_TRUNK) else key): value
    for key, value in backbone.items()
  }


def import_params(path: str, params, model_config, towers=None):
  """`params` (an nnx.State of Params, arrays placed as they should stay) with values from `path`.

  Args:
    path: a reference / exported checkpoint, or a CLIP state dict (then `towers` is required).
    params: the model's current parameters; their shapes and shardings are kept.
    model_config: the `config.model` section.
    towers: None reads every parameter from a reference checkpoint (unknown keys are an error);
      a subset of ("text", "image") reads only those towers from a CLIP state dict.

  Raises:
    layout.LayoutMismatchError listing every missing, unexpected or misshapen key.
  """
  return _import(read_checkpoint(path), path, params, model_config, towers)


def initial_params(params, model_config):
  """`params`, or with `model_config.init_from` set: every parameter of a reference checkpoint, or
  the `model_config.init_towers` of a CLIP state dict (the file decides which it is)."""
  if not model_config.init_from:
    return params
  checkpoint = read_checkpoint(model_config.init_from)
  towers = None if checkpoint.reference else tuple(model_config.init_towers)
  return _import(checkpoint, model_config.init_from, params, model_config, towers)


def _import(checkpoint: TorchCheckpoint, path: str, params, model_config, towers):
  if towers is None and not checkpoint.reference:
    raise layout.LayoutMismatchError(
      f"{path} has no 'backbone_state_dict': it is not a reference GRAIN checkpoint (a CLIP state dict "
      "initializes only towers: config.model.init_towers)"
    )
  state_dicts = checkpoint.state_dicts
  if towers is not None:
    state_dicts = {layout.BACKBONE: _clip_names(state_dicts[layout.BACKBONE], towers, path)}
  shapes = {key: leaf.shape for key, leaf in param_tree.flatten(params).items()}
  values = layout.from_reference(state_dicts, shapes, model_config, towers=towers, source=path)
  return param_tree.replace(params, values)
