"""Export: the newest Orbax checkpoint of a run -> the reference's PyTorch checkpoint layout.

`python -m grain_jax.main --config C --workdir DIR --mode export [--export-module-prefix] [--output-dir OUT]`
writes into `DIR/export/` (or OUT; DIR is only read):
  grain_clip.pth          `{'backbone_state_dict', 'state_dict', 'config', 'epoch', 'iteration'}` (no
                          `state_dict` for the plain-CLIP baseline), loadable with `strict=True` by
                          the reference's model classes and by `grain_jax.export.torch_modules`;
                          `epoch` and `iteration` are what the authors' evaluation scripts read first
                          (`training_progress`);
  grain_clip.safetensors  the same tensors, keys prefixed `backbone_state_dict.` / `state_dict.`,
                          the config as JSON under the header metadata key `config`.
A decoder with options the reference lacks (`layout.decoder_extensions`: a memory position code,
box refinement, anchor queries) cannot run in the reference's classes: export says so and writes
its state dict as `grain_jax_decoder_state_dict`, which only our twins load.
Only the parameters are read from the checkpoint (not the optimizer state), into the config's
mesh and sharding; each parameter is then gathered to the host on its own.
"""

import json
import os

import jax
from flax import nnx

from grain_jax import files, sharding
from grain_jax.errors import output_dir
from grain_jax.torch_format import layout, param_tree
from grain_jax.train import checkpoint

EXPORT_NAME = "grain_clip"
TORCH_MISSING = "exporting to PyTorch needs torch: pip install -r requirements-export.txt"


def export_metadata(config, step: int) -> dict:
  """The `config` entry of the export: the model section (what the twins are built from), the step
  and the layout ("grain-clip reference", or the decoder options the reference lacks).

  Plain JSON values (lists, not tuples), so the .pth and the .safetensors header hold the same.
  """
  extensions = layout.decoder_extensions(config.model)
  kind = f"grain-jax extended decoder ({', '.join(extensions)})" if extensions else "grain-clip reference"
  return json.loads(json.dumps({"model": config.model.to_dict(), "step": step, "layout": kind}))


def extension_message(model_config) -> str:
  """What export says about a decoder the reference's classes cannot run ("" when they can)."""
  extensions = layout.decoder_extensions(model_config)
  if not extensions:
    return ""
  return (
    f"config.model.decoder has options the authors' PyTorch classes lack ({', '.join(extensions)}): they "
    f"cannot run this model, so its decoder is written as '{layout.EXTENDED_DECODER_GROUP}' instead of "
    "'state_dict' (their loaders stop there rather than run a different model). Load it with "
    "grain_jax.export.torch_modules.load_exported."
  )


def training_progress(step: int) -> dict[str, int]:
  """The `epoch` and `iteration` entries the authors' evaluation scripts read right after loading
  (docs/reference_behaviour.md, "The authors' scripts"); without them those scripts stop with a KeyError.

  `iteration` is the checkpoint's step. `epoch` is 0: training here is counted in steps over data that
  repeats without epoch boundaries (`config.data.num_epochs` unset), and the export reads no training
  data to learn its size, so no epoch count is known; 0 says "not counted" rather than a guess.
  """
  return {"epoch": 0, "iteration": step}


def write_export(
  state_dicts: dict[str, layout.StateDict], metadata: dict, directory: str, module_prefix: bool = False
) -> dict[str, str]:
  """Writes `grain_clip.pth` and `grain_clip.safetensors` into `directory`; returns their paths.

  Group names come from `layout.group_names(metadata["model"])`. `module_prefix` prepends `module.`
  to every key, as the reference's DDP-wrapped loaders expect.
  """
  try:
    import torch
  except ImportError:
    raise ImportError(TORCH_MISSING) from None
  from safetensors.numpy import save

  prefix = layout.MODULE_PREFIX if module_prefix else ""
  names = layout.group_names(metadata["model"])
  groups = {
    names[name]: {prefix + key: value for key, value in state_dict.items()}
    for name, state_dict in state_dicts.items()
    if state_dict
  }
  paths = {
    "pth": os.path.join(directory, f"{EXPORT_NAME}.pth"),
    "safetensors": os.path.join(directory, f"{EXPORT_NAME}.safetensors"),
  }
  checkpoint = {
    group: {key: torch.from_numpy(value) for key, value in tensors.items()} for group, tensors in groups.items()
  }
  files.write_through(
    paths["pth"], lambda f: torch.save(dict(checkpoint, config=metadata, **training_progress(metadata["step"])), f)
  )
  files.replace_durably(
    paths["safetensors"],
    save(
      {f"{group}.{key}": value for group, tensors in groups.items() for key, value in tensors.items()},
      metadata={"config": json.dumps(metadata)},
    ),
  )
  return paths


def export_checkpoint(config, workdir: str, module_prefix: bool = False, directory: str = "") -> dict[str, str]:
  """`--mode export`: the newest checkpoint in `workdir` -> `directory` (default `workdir/export/`;
  see the module doc). Reads `workdir` only, so a read-only (archived) run exports elsewhere."""
  directory = output_dir(directory, workdir, "export")
  model, step = checkpoint.restore_model(config, workdir, sharding.make_mesh(config.mesh))
  state_dicts = layout.to_reference(
    param_tree.flatten(nnx.state(model, nnx.Param)), config.model, fetch=param_tree.to_host
  )
  paths = {}
  if jax.process_index() == 0:
    message = extension_message(config.model)
    if message:
      print(message, flush=True)
    paths = write_export(state_dicts, export_metadata(config, step), directory, module_prefix)
    sizes = {kind: f"{files.size(path) / 2**20:.1f} MiB" for kind, path in paths.items()}
    print(f"exported step {step} of {checkpoint.checkpoint_dir(workdir)} to {directory}: {sizes}", flush=True)
  return paths
