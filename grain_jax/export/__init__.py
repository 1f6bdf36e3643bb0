"""PyTorch export and import in the reference checkpoint's layout.

  layout.py         the one table: our parameter paths <-> PyTorch keys, shapes and transforms
  to_torch.py       `--mode export`: newest Orbax checkpoint -> grain_clip.pth / grain_clip.safetensors
  from_torch.py     reference / exported checkpoints and CLIP towers -> our parameters
  torch_modules.py  PyTorch twins with the reference's names (torch only, no JAX)
  param_tree.py     our nnx parameter state as a flat `path -> array` mapping

Nothing is imported here, so `torch_modules` can be used without JAX's import cost.
"""
