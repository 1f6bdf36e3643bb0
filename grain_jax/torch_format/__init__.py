"""The reference's PyTorch checkpoint format, below training (which imports a file to start from).

  layout.py      the one table: our parameter paths <-> PyTorch keys, shapes and transforms
  from_torch.py  reference / exported checkpoints and CLIP towers -> our parameters
  param_tree.py  our nnx parameter state as a flat `path -> array` mapping

The export (newest checkpoint -> PyTorch files) and the PyTorch twins are grain_jax.export.
"""
