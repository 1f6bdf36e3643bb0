"""Loading and validating configs before anything is built.

Every error names the offending field (`config.model.image.heads`, ...), so a typo or an
impossible size fails in a second with a clear message instead of deep inside a compile.
"""

import ast
import importlib.util
import pathlib
import re
from typing import Any

import ml_collections

from grain_jax.defaults import base
from grain_jax.errors import UserError, check_local_path
from grain_jax.eval.datasets import check_descriptors, check_places365_dir
from grain_jax.eval.run import check_settings as check_eval_settings
from grain_jax.models.decoder import check_options as check_decoder_options
from grain_jax.models.vit import INITS as VIT_INITS
from grain_jax.sharding import mesh_shape


INIT_TOWERS = ("text", "image")
INIT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# The config's file and folder paths (read or written with the local file system's calls).
PATH_FIELDS = ("data.train_dir", "data.synthetic_dir", "model.init_from", "eval.tfds_data_dir",
               "eval.descriptors_dir", "eval.places365_dir")
# Counts of steps, intervals, batches and kept checkpoints: 0 would divide by zero, batch nothing or
# keep nothing to resume from. (train.num_steps too, but for evaluating an imported model: see
# _check_bounds.)
AT_LEAST_ONE = ("train.grad_accum_steps", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "train.heartbeat_timeout_s", "data.batch_size", "data.read_threads",
                "data.worker_buffer_size", "eval.batch_size", "eval.text_batch_size")
# Rates, weights and counts where 0 means none or off.
AT_LEAST_ZERO = ("optim.learning_rate", "optim.warmup_init", "optim.end_learning_rate", "optim.warmup_steps",
                 "optim.weight_decay", "optim.grad_clip_norm", "data.num_workers", "eval.max_examples",
                 "eval.num_pictures", "eval.fixed_box_records", "eval.num_confusions")


class ConfigError(UserError, ValueError):
  """A config field is unknown, has the wrong type, or holds an impossible value."""


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


def _check_fields(config, schema, prefix: str) -> None:
  """Every field of `config` must exist in `schema` with a compatible type."""
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if key not in schema:
      raise ConfigError(f"{name} is not a known field (known here: {', '.join(sorted(schema.keys()))})")
    expected = schema[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{name} must be a section, got {value!r}")
      _check_fields(value, expected, name)
    elif expected is not None and value is not None and not _compatible(value, expected):
      raise ConfigError(f"{name}={value!r} should be of type {type(expected).__name__}")


def _compatible(value, expected) -> bool:
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(expected, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  if isinstance(expected, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(expected))


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_model(model) -> None:
  _require(model.kind in ("grain", "clip"), f"config.model.kind={model.kind!r} must be 'grain' or 'clip'")
  _require(model.dtype in ("float32", "bfloat16"),
           f"config.model.dtype={model.dtype!r} must be 'float32' or 'bfloat16'")
  for tower in ("image", "text", "decoder"):
    cfg = model[tower]
    for field in ("width", "depth", "heads"):
      _require(cfg[field] > 0, f"config.model.{tower}.{field}={cfg[field]} must be positive")
    _require(cfg.width % cfg.heads == 0,
             f"config.model.{tower}.width={cfg.width} is not divisible by config.model.{tower}.heads={cfg.heads}")
  image = model.image
  _require(image.image_size % image.patch_size == 0,
           f"config.model.image.image_size={image.image_size} is not a multiple of "
           f"config.model.image.patch_size={image.patch_size}")
  _require(image.init in VIT_INITS, f"config.model.image.init={image.init!r} must be one of {VIT_INITS}")
  text = model.text
  _require(all(0 < bucket <= text.context_length for bucket in text.context_buckets),
           f"config.model.text.context_buckets={tuple(text.context_buckets)} must lie in "
           f"[1, config.model.text.context_length={text.context_length}]")
  _require(model.decoder.num_region_queries > 0,
           f"config.model.decoder.num_region_queries={model.decoder.num_region_queries} must be positive")
  dropout = model.decoder.dropout
  _require(0.0 <= dropout < 1.0, f"config.model.decoder.dropout={dropout} must be in [0, 1)")
  try:
    check_decoder_options(model.decoder)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  towers = tuple(model.init_towers)
  _require(bool(towers) and set(towers) <= set(INIT_TOWERS),
           f"config.model.init_towers={towers} must be a non-empty subset of {INIT_TOWERS}")
  _require(not model.init_from or model.init_from.endswith(INIT_SUFFIXES),
           f"config.model.init_from={model.init_from!r} must be a {' / '.join(INIT_SUFFIXES)} file")


def _check_bounds(config) -> None:
  for fields, low in ((AT_LEAST_ONE, 1), (AT_LEAST_ZERO, 0)):
    for field in fields:
      section, name = field.split(".")
      value = config[section][name]
      _require(value >= low, f"config.{field}={value} must be at least {low}")
  epochs = config.data.num_epochs
  _require(epochs is None or epochs >= 1, f"config.data.num_epochs={epochs} must be at least 1 (None: repeat forever)")
  steps = config.train.num_steps
  evaluates_import = steps == 0 and bool(config.model.init_from) and config.experiment.evaluate
  _require(steps >= 1 or evaluates_import, f"config.train.num_steps={steps} must be at least 1 (0 only evaluates a "
           "model imported with config.model.init_from)")


def _check_choices(config) -> None:
  choices = {
      ("matching", "method"): ("hungarian", "sinkhorn", "greedy"),
      ("loss", "region_negatives"): ("global", "per_device"),
      ("loss", "box_normalization"): ("global", "per_device"),
      ("optim", "weight_decay_exempt"): ("rank_below_2", "authors_name_rule"),
  }
  for (section, field), allowed in choices.items():
    if section in config and field in config[section]:
      value = config[section][field]
      _require(value in allowed, f"config.{section}.{field}={value!r} must be one of {allowed}")


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
  _require(bool(re.fullmatch(r"[A-Za-z0-9_.+-]+", name)),
           f"{where}: the name {name!r} must be a word of letters, digits and _.+- (it names the run's folder)")
  overrides = {}
  for item in filter(None, (part.strip() for part in rest.split(";"))):
    field, equals, value = item.partition("=")
    _require(bool(equals) and bool(field.strip()), f"{where}: {item!r} is not field=value")
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
  known = (f"known in {path}: {', '.join(sorted(section.keys()))}" if isinstance(section, ml_collections.ConfigDict)
           else f"{path} is not a section")
  raise ConfigError(f"{what} is not a known field ({known})")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any],
                    where: str = "override") -> ml_collections.ConfigDict:
  """A copy of `config` with dotted `field: value` overrides set; errors name `where` and the field."""
  config = config.copy_and_resolve_references()
  for field, value in overrides.items():
    section, leaf = field_section(config, field, where)
    try:
      section[leaf] = value
    except TypeError as error:
      raise ConfigError(f"{where}: config.{field}={value!r}: {error}") from None
  return config


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             evaluation_files: bool = False) -> ml_collections.ConfigDict:
  """Checks `config` against the documented schema (grain_jax/defaults/base.py); returns it unchanged.

  Args:
    config: the full config.
    num_devices: when given, the mesh sizes must tile exactly this many devices.
    evaluation_files: also read the descriptor file of every tfds set in `config.eval.classification`
      and look for the Places365 download `places365:full` reads (a run that will evaluate, so that a
      missing file stops it before training, not after).

  Raises:
    ConfigError naming the first offending field (or descriptor file); RemotePathError for a URL in a
    PATH_FIELDS field.
  """
  _check_fields(config, base.get_config(), "config")
  for field in PATH_FIELDS:
    section, name = field.split(".")
    check_local_path(config[section][name], f"config.{field}")
  _check_model(config.model)
  _check_bounds(config)
  _check_choices(config)
  _require(0.0 <= config.data.max_bad_fraction < 1.0,
           f"config.data.max_bad_fraction={config.data.max_bad_fraction} must be in [0, 1)")
  _require(config.loss.iou_union_epsilon >= 0,
           f"config.loss.iou_union_epsilon={config.loss.iou_union_epsilon} must be >= 0")
  _require(config.train.peak_flops_per_device >= 0,
           f"config.train.peak_flops_per_device={config.train.peak_flops_per_device} must be >= 0 (0: from the table)")
  try:
    check_eval_settings(config.eval)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if evaluation_files:
    try:
      check_descriptors(config.eval.classification, config.eval.descriptors_dir,
                        config.eval.allow_missing_descriptors, config.eval.tfds_data_dir)
      check_places365_dir(config.eval.classification, config.eval.places365_dir)
    except (OSError, ValueError) as error:
      raise ConfigError(str(error)) from None
  for field in ("arms", "settings"):
    entries = tuple(config.experiment[field])
    names = [parse_arm(entry, field)[0] for entry in entries]
    _require(len(set(names)) == len(names), f"config.experiment.{field}={entries} repeats a name")
  if num_devices is not None:
    try:
      mesh_shape(config.mesh, num_devices)
    except ValueError as error:
      raise ConfigError(str(error)) from None
  return config
