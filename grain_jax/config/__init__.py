"""Configs: the schema with its defaults, the presets built on it, loading, and every validation rule.

  base.py        every field, documented, with the paper's defaults: the schema
  models.py      model presets: tiny, small, b16, l14
  meshes.py      mesh presets (the machines behind the fixed-size ones: grain_jax/hardware.py)
  recipe.py      the paper's training recipe for a dataset size (configs/cc3m_b16.py, configs/cc12m_b16.py)
  loading.py     config files, dotted overrides, the runs of a comparison
  validation.py  every rule (eval_rules.py: the eval section's), checked once a run by grain_jax/main.py

The config files in configs/ start from base.py. A run loads its file once and validates the config
once; the layers below take it as valid:

  config = validate(load_config("configs/base.py:tiny"), num_devices=jax.device_count())
"""

from grain_jax.config.loading import apply_overrides, comparison_runs, field_section, load_config, parse_arm
from grain_jax.config.validation import validate
from grain_jax.errors import ConfigError

__all__ = ["ConfigError", "apply_overrides", "comparison_runs", "field_section", "load_config", "parse_arm", "validate"]
