"""PyTorch export in the reference checkpoint's layout (the layout itself: grain_jax.torch_format).

  to_torch.py       `--mode export`: newest Orbax checkpoint -> grain_clip.pth / grain_clip.safetensors
  torch_modules.py  PyTorch twins with the reference's names (torch only, no JAX)

Nothing is imported here, so `torch_modules` can be used without JAX's import cost.
"""
