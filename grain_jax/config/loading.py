"""Loading config files and deriving configs from them: dotted overrides, and the runs of a comparison.

  config = load_config("configs/base.py:tiny")        # calls the file's get_config("tiny")
  changed = apply_overrides(config, {"loss.region": 0.5})
  runs = comparison_runs(config)                      # (setting, arm) -> that run's config

Errors name the field or entry (ConfigError); grain_jax/config/validation.py checks the values.
"""

import ast
import importlib.util
import pathlib
import re
from typing import Any

import ml_collections

from grain_jax.errors import ConfigError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)` (or `get_config()`)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_grain_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()


def _literal(text: str) -> Any:
  """A Python literal (`1e-3`, `True`, `(16, 32)`, `'a'`), else the text itself (`learned`)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_arm(entry: str, field: str = "arms") -> tuple[str, dict[str, Any]]:
  """`"name"` or `"name: field=value; field=value"` (fields relative to the config's root, values
  Python literals or bare strings) -> (name, {field: value}); an entry of `config.experiment.<field>`.

  Raises:
    ConfigError naming the entry when its name is not a plain word or an item is not field=value.
  """
  name, _, rest = entry.partition(":")
  name = name.strip()
  where = f"config.experiment.{field} entry {entry!r}"
  if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
    raise ConfigError(
      f"{where}: the name {name!r} must be a word of letters, digits and _.+- (it names the run's folder)"
    )
  overrides = {}
  for item in filter(None, (part.strip() for part in rest.split(";"))):
    field, equals, value = item.partition("=")
    if not equals or not field.strip():
      raise ConfigError(f"{where}: {item!r} is not field=value")
    overrides[field.strip()] = _literal(value.strip())
  return name, overrides


def field_section(config: ml_collections.ConfigDict, field: str, where: str) -> tuple[ml_collections.ConfigDict, str]:
  """The section of `config` holding the dotted `field`, and the field's last name.

  Raises:
    ConfigError naming `where`, the field's full path and the fields known where it went wrong.
  """
  *sections, leaf = field.split(".")
  section, path = config, "config"
  for part in sections:
    _require_known(section, path, part, f"{where}: config.{field}")
    section, path = section[part], f"{path}.{part}"
  _require_known(section, path, leaf, f"{where}: config.{field}")
  return section, leaf


def _require_known(section, path: str, name: str, what: str) -> None:
  if isinstance(section, ml_collections.ConfigDict) and name in section:
    return
  known = (
    f"known in {path}: {', '.join(sorted(section.keys()))}"
    if isinstance(section, ml_collections.ConfigDict)
    else f"{path} is not a section"
  )
  raise ConfigError(f"{what} is not a known field ({known})")


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str = "override"
) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `field: value` overrides set; errors name `where` and the field."""
  config = config.copy_and_resolve_references()
  for field, value in overrides.items():
    section, leaf = field_section(config, field, where)
    try:
      section[leaf] = value
    except TypeError as error:
      raise ConfigError(f"{where}: config.{field}={value!r}: {error}") from None
  return config


def comparison_runs(config: ml_collections.ConfigDict) -> dict[tuple[str, str], ml_collections.ConfigDict]:
  """The configs a comparison (`config.experiment.arms`, grain_jax/experiment.py) runs, by (setting, arm):
  `config` with the setting's overrides and then the arm's, its experiment section emptied (each is one
  run); the setting is "" without `config.experiment.settings`; {} without arms. Seeds and worlds
  change only `seed` and `data.synthetic.seed`, which the experiment sets."""
  experiment = config.experiment
  settings = [parse_arm(entry, "settings") for entry in experiment.settings] or [("", {})]
  runs = {}
  for setting, setting_overrides in settings:
    for name, overrides in (parse_arm(entry) for entry in experiment.arms):
      where = f"config.experiment arm/setting {name!r}"
      run_config = apply_overrides(config, {**setting_overrides, **overrides}, where)
      with run_config.unlocked():
        run_config.experiment.update(arms=(), seeds=(), worlds=(), settings=())
      runs[(setting, name)] = run_config
  return runs
