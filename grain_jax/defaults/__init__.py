"""The config schema, its defaults and the presets built on it; the config files in configs/ start here.

  base.py    every field, documented, with the paper's defaults (what `grain_jax.config.validate` checks)
  models.py  model presets: tiny, small, b16, l14
  meshes.py  mesh presets (the machines behind the fixed-size ones: grain_jax/hardware.py)
  recipe.py  the paper's training recipe for a dataset size (configs/cc3m_b16.py, configs/cc12m_b16.py)
"""
