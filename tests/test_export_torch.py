"""Export to PyTorch and back: the twins reproduce the JAX model; JAX -> PyTorch -> JAX is exact.

A tiny GRAIN model with every parameter moved off its initial value (so a transposed or misplaced
tensor shows) is saved as a real training checkpoint, exported through `--mode export`'s function
onto a 2x2x2 (data, fsdp, tensor) mesh, and loaded by the twins with `strict=True`. A read-only
(archived) run exports into the folder named by --output-dir.
"""

import json
import os
import shutil

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from grain_jax import sharding
from grain_jax.config import load_config
from grain_jax.data.tokenizer import tokenize
from grain_jax.errors import ArgumentError
from grain_jax.export import to_torch
from grain_jax.models.grain import build_model
from grain_jax.torch_format import from_torch, layout, param_tree
from grain_jax.train import optim, trainer
from grain_jax.train.checkpoint import Checkpointer

INSTALL = "pip install -r requirements-export.txt"
pytestmark = pytest.mark.extras
torch = pytest.importorskip("torch", reason=f"the PyTorch export tests need torch ({INSTALL})")
safetensors_numpy = pytest.importorskip(
  "safetensors.numpy", reason=f"the PyTorch export tests need safetensors ({INSTALL})"
)
safe_open = pytest.importorskip("safetensors").safe_open
torch_modules = pytest.importorskip("grain_jax.export.torch_modules")  # imports torch at its top

TOLERANCE = 1e-4


def tiny_config():
  config = load_config("configs/base.py:tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  return config


def moved_model(config):
  """A tiny model with every parameter moved off its initial value, and those values by path."""
  single = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model = sharding.create_sharded(lambda: build_model(config.model, 0), single, config.sharding_rules)
  rng = np.random.default_rng(0)
  moved = {
    path: np.asarray(leaf) + rng.normal(0, 0.05, leaf.shape).astype(np.float32)
    for path, leaf in param_tree.flatten(nnx.state(model, nnx.Param)).items()
  }
  nnx.update(model, param_tree.replace(nnx.state(model, nnx.Param), moved))
  model.eval()
  return model, moved


def export_as_checkpoint(config, model, workdir: str) -> dict[str, str]:
  """Saves `model` as a step-7 training checkpoint in `workdir` and exports it."""
  params = nnx.state(model, nnx.Param)
  state = trainer.init_state(model, optim.make_optimizer(params, config.optim, 10))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  checkpointer.save(state._replace(step=np.int32(7)), iter(grain.MapDataset.range(4).to_iter_dataset()))
  checkpointer.close()
  return to_torch.export_checkpoint(config, workdir)


def twin_outputs(backbone, decoder, images: np.ndarray):
  with torch.no_grad():
    tokens = backbone.visual(torch.from_numpy(images).permute(0, 3, 1, 2))
    return decoder(tokens, backbone.visual.pos_embed)


def assert_twin_matches(model, backbone, decoder):
  images = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  ours = nnx.jit(lambda m, x: m.encode_image(x))(model, images)
  global_embed, region_embed, boxes = twin_outputs(backbone, decoder, images)
  for name, theirs, mine in (
    ("global", global_embed, ours.global_embed),
    ("regions", region_embed, ours.region_embed),
    ("boxes", boxes, ours.boxes),
  ):
    assert theirs.shape == mine.shape, name
    np.testing.assert_allclose(theirs.numpy(), np.asarray(mine), rtol=0, atol=TOLERANCE, err_msg=name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A checkpointed tiny model, its parameters by path, its workdir and its export's files."""
  config = tiny_config()
  model, moved = moved_model(config)
  workdir = str(tmp_path_factory.mktemp("run"))
  return model, moved, workdir, export_as_checkpoint(config, model, workdir)


def test_export_writes_both_files_with_the_same_tensors(exported):
  _, _, workdir, paths = exported
  assert paths == {
    "pth": os.path.join(workdir, "export", "grain_clip.pth"),
    "safetensors": os.path.join(workdir, "export", "grain_clip.safetensors"),
  }
  checkpoint = torch.load(paths["pth"], weights_only=True)
  assert set(checkpoint) == {"backbone_state_dict", "state_dict", "config", "epoch", "iteration"}
  assert checkpoint["config"]["step"] == 7 and checkpoint["config"]["model"]["preset"] == "tiny"
  # What the authors' evaluation scripts read before loading the weights.
  assert checkpoint["iteration"] == 7 and checkpoint["epoch"] == 0
  with safe_open(paths["safetensors"], framework="numpy") as handle:
    assert json.loads(handle.metadata()["config"]) == checkpoint["config"]
  flat = safetensors_numpy.load_file(paths["safetensors"])
  pth = {
    f"{group}.{key}": value.numpy()
    for group in ("backbone_state_dict", "state_dict")
    for key, value in checkpoint[group].items()
  }
  assert flat.keys() == pth.keys()
  for key, value in pth.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=key)


def test_a_read_only_run_exports_into_the_output_dir(exported, tmp_path, read_only):
  _, _, workdir, paths = exported
  archived = tmp_path / "archived"
  shutil.copytree(os.path.join(workdir, "checkpoints"), archived / "checkpoints")
  read_only(archived)
  with pytest.raises(ArgumentError, match=rf"^the output folder {archived}/export cannot be written .*--output-dir"):
    to_torch.export_checkpoint(tiny_config(), str(archived))
  out = to_torch.export_checkpoint(tiny_config(), str(archived), directory=str(tmp_path / "out"))
  assert out == {kind: str(tmp_path / "out" / os.path.basename(path)) for kind, path in paths.items()}
  assert open(out["safetensors"], "rb").read() == open(paths["safetensors"], "rb").read()
  assert os.listdir(archived) == ["checkpoints"]


def test_twins_reproduce_the_jax_model(exported):
  model, _, _, paths = exported
  backbone, decoder = torch_modules.load_exported(paths["pth"])
  assert_twin_matches(model, backbone, decoder)
  ids = tokenize(["a small orange bird with a black back", "a photo of a striped red triangle", "a"])
  ours_text = nnx.jit(lambda m, t: m.encode_text(t))(model, ids)
  with torch.no_grad():
    text_embed = backbone.encode_text(torch.from_numpy(np.asarray(ids, np.int64)))
  np.testing.assert_allclose(text_embed.numpy(), np.asarray(ours_text), rtol=0, atol=TOLERANCE)


EXTENDED = dict(memory_position="learned", position_in_values=True, box_refinement=True, anchor_queries=True)


def test_extended_decoder_export_stops_reference_loaders_and_loads_in_the_twins(tmp_path, capsys):
  config = tiny_config()
  config.model.decoder.update(EXTENDED)
  model, moved = moved_model(config)
  paths = export_as_checkpoint(config, model, str(tmp_path))
  assert (
    "options the authors' PyTorch classes lack (memory_position='learned', position_in_values=True, "
    "box_refinement=True, anchor_queries=True)" in capsys.readouterr().out
  )
  checkpoint = torch.load(paths["pth"], weights_only=True)
  # The reference's loaders read checkpoint['state_dict']: absent, so they stop with a KeyError.
  assert set(checkpoint) == {"backbone_state_dict", layout.EXTENDED_DECODER_GROUP, "config", "epoch", "iteration"}
  assert checkpoint["config"]["layout"].startswith("grain-jax extended decoder")
  assert {"memory_pos_embed", "anchor_box_logits", "anchor_pos_mlp.layers.1.weight"} <= set(
    checkpoint[layout.EXTENDED_DECODER_GROUP]
  )
  backbone, decoder = torch_modules.load_exported(paths["pth"])
  assert_twin_matches(model, backbone, decoder)
  for kind in ("pth", "safetensors"):
    zeros = jax.tree.map(jax.numpy.zeros_like, nnx.state(model, nnx.Param))
    restored = param_tree.flatten(from_torch.import_params(paths[kind], zeros, config.model))
    assert restored.keys() == moved.keys()
    for path, value in moved.items():
      np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg=str(path))


@pytest.mark.parametrize("memory_position", ["sine", "vit"])
def test_twins_compute_the_parameter_free_memory_positions(memory_position):
  """Options without parameters of their own: only the twin's computation can be wrong."""
  config = tiny_config()
  config.model.decoder.update(
    memory_position=memory_position, position_in_values=memory_position == "vit", box_refinement=True
  )
  model, moved = moved_model(config)
  state_dicts = layout.to_reference(moved, config.model)
  backbone = torch_modules.GrainClipBackbone(config.model.to_dict())
  decoder = torch_modules.RegionQueryDecoder(config.model.to_dict())
  for module, name in ((backbone, layout.BACKBONE), (decoder, layout.DECODER)):
    module.load_state_dict({key: torch.from_numpy(value) for key, value in state_dicts[name].items()}, strict=True)
    module.eval()
  assert_twin_matches(model, backbone, decoder)


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_jax_to_pytorch_to_jax_is_exact(exported, kind):
  model, moved, _, paths = exported
  zeros = jax.tree.map(jax.numpy.zeros_like, nnx.state(model, nnx.Param))
  restored = param_tree.flatten(from_torch.import_params(paths[kind], zeros, tiny_config().model))
  assert restored.keys() == moved.keys()
  for path, value in moved.items():
    np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg=str(path))


def test_module_prefix_for_ddp_loaders_round_trips(exported, tmp_path):
  model, moved, _, paths = exported
  checkpoint = torch.load(paths["pth"], weights_only=True)
  state_dicts = {
    name: {key: value.numpy() for key, value in checkpoint[layout.GROUP_NAMES[name]].items()}
    for name in (layout.BACKBONE, layout.DECODER)
  }
  prefixed = to_torch.write_export(state_dicts, checkpoint["config"], str(tmp_path), module_prefix=True)
  reloaded = torch.load(prefixed["pth"], weights_only=True)
  assert all(key.startswith("module.") for group in ("backbone_state_dict", "state_dict") for key in reloaded[group])
  zeros = jax.tree.map(jax.numpy.zeros_like, nnx.state(model, nnx.Param))
  restored = param_tree.flatten(from_torch.import_params(prefixed["pth"], zeros, tiny_config().model))
  for path, value in moved.items():
    np.testing.assert_array_equal(np.asarray(restored[path]), value, err_msg=str(path))


def test_clip_towers_initialize_text_and_image_only(exported, tmp_path):
  """An open_clip-style training checkpoint: `{'state_dict': {'module.' + key}}`, timm trunk names."""
  model, moved, _, paths = exported
  backbone = torch.load(paths["pth"], weights_only=True)["backbone_state_dict"]
  renamed = {
    ("visual.trunk." + key[len("visual.") :] if key.startswith("visual.") else key): value
    for key, value in backbone.items()
    if key not in ("image_projection", "logit_scale")
  }
  renamed["visual.head.proj.weight"] = torch.zeros(64, 64)
  renamed["attn_mask"] = torch.zeros(77, 77)
  clip_file = str(tmp_path / "open_clip.pt")
  torch.save({"epoch": 3, "state_dict": {"module." + key: value for key, value in renamed.items()}}, clip_file)

  config = tiny_config()
  config.model.update(init_from=clip_file, init_towers=("text", "image"))
  zeros = jax.tree.map(jax.numpy.zeros_like, nnx.state(model, nnx.Param))
  initialized = param_tree.flatten(from_torch.initial_params(zeros, config.model))
  for path, value in moved.items():
    if path[0] in ("text", "visual"):
      np.testing.assert_array_equal(np.asarray(initialized[path]), value, err_msg=str(path))
    else:
      assert not np.asarray(initialized[path]).any(), path


def test_openai_vision_tower_and_clip_files_as_references_are_refused(exported, tmp_path):
  model, _, _, paths = exported
  backbone = torch.load(paths["pth"], weights_only=True)["backbone_state_dict"]
  openai_file = str(tmp_path / "openai.pt")
  torch.save(dict(backbone, **{"visual.conv1.weight": torch.zeros(64, 3, 8, 8)}), openai_file)
  zeros = jax.tree.map(jax.numpy.zeros_like, nnx.state(model, nnx.Param))
  with pytest.raises(layout.LayoutMismatchError, match="OpenAI CLIP's vision tower"):
    from_torch.import_params(openai_file, zeros, tiny_config().model, towers=("text", "image"))
  with pytest.raises(layout.LayoutMismatchError, match="not a reference GRAIN checkpoint"):
    from_torch.import_params(openai_file, zeros, tiny_config().model)


def test_pickled_objects_are_not_loaded(tmp_path):
  path = str(tmp_path / "evil.pth")
  torch.save({"backbone_state_dict": {}, "hook": Checkpointer}, path)
  with pytest.raises(layout.LayoutMismatchError, match="not a weights-only PyTorch checkpoint"):
    from_torch.read_checkpoint(path)


@pytest.mark.parametrize(
  "preset,kind,decoder",
  [
    ("tiny", "clip", {}),
    ("small", "grain", {}),
    ("b16", "grain", {}),
    ("l14", "grain", {}),
    ("b16", "grain", EXTENDED),
  ],
)
def test_twins_declare_exactly_the_exported_keys_and_shapes(preset, kind, decoder):
  """For every preset, the export's keys and shapes are the twins' (built without memory on `meta`)."""
  cfg = load_config(f"configs/base.py:{preset}").model
  cfg.kind = kind
  cfg.decoder.update(decoder)
  params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param)
  exported_shapes = {
    **layout.torch_shapes({path: leaf.shape for path, leaf in param_tree.flatten(params).items()}, cfg),
    **layout.untrained_shapes(cfg),
  }
  with torch.device("meta"):
    twins = {layout.BACKBONE: torch_modules.GrainClipBackbone(cfg.to_dict())}
    if kind == "grain":
      twins[layout.DECODER] = torch_modules.RegionQueryDecoder(cfg.to_dict())
  twin_shapes = {
    (group, key): tuple(value.shape) for group, module in twins.items() for key, value in module.state_dict().items()
  }
  assert twin_shapes == exported_shapes
