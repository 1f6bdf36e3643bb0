"""Every rule a config must satisfy, checked once a run (`python -m grain_jax.main`) before anything is built.

Every error names the offending field (`config.model.image.heads`, ...), so a typo or an impossible
size fails in a second with a clear message instead of deep inside a compile. The layers below take
the config as valid. The eval section's rules: grain_jax/config/eval_rules.py.
"""

import jax
import ml_collections

from grain_jax import sharding
from grain_jax.config import base, eval_rules
from grain_jax.config.loading import comparison_runs, parse_arm
from grain_jax.errors import ConfigError, check_local_path
from grain_jax.models.decoder import MEMORY_POSITIONS
from grain_jax.models.vit import INITS as VIT_INITS

INIT_TOWERS = ("text", "image")
INIT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# The config's file and folder paths (read or written with the local file system's calls).
PATH_FIELDS = (
  "data.train_dir",
  "data.synthetic_dir",
  "model.init_from",
  "eval.tfds_data_dir",
  "eval.descriptors_dir",
  "eval.places365_dir",
)
# Counts of steps, intervals, batches and kept checkpoints: 0 would divide by zero, batch nothing or
# keep nothing to resume from. (train.num_steps too, but for evaluating an imported model: see
# _check_bounds.)
AT_LEAST_ONE = (
  "train.grad_accum_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.heartbeat_timeout_s",
  "train.initialization_timeout_s",
  "data.batch_size",
  "data.read_threads",
  "data.worker_buffer_size",
  "eval.batch_size",
  "eval.text_batch_size",
)
# Rates, weights and counts where 0 means none or off.
AT_LEAST_ZERO = (
  "optim.learning_rate",
  "optim.warmup_init",
  "optim.end_learning_rate",
  "optim.warmup_steps",
  "optim.weight_decay",
  "optim.grad_clip_norm",
  "data.num_workers",
  "eval.max_examples",
  "eval.num_pictures",
  "eval.fixed_box_records",
  "eval.num_confusions",
)
CHOICES = {
  ("matching", "method"): ("hungarian", "sinkhorn", "greedy"),
  ("loss", "region_negatives"): ("global", "per_device"),
  ("loss", "box_normalization"): ("global", "per_device"),
  ("optim", "weight_decay_exempt"): ("rank_below_2", "authors_name_rule"),
}


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
  _require(
    model.dtype in ("float32", "bfloat16"), f"config.model.dtype={model.dtype!r} must be 'float32' or 'bfloat16'"
  )
  for tower in ("image", "text", "decoder"):
    cfg = model[tower]
    for field in ("width", "depth", "heads"):
      _require(cfg[field] > 0, f"config.model.{tower}.{field}={cfg[field]} must be positive")
    _require(
      cfg.width % cfg.heads == 0,
      f"config.model.{tower}.width={cfg.width} is not divisible by config.model.{tower}.heads={cfg.heads}",
    )
  image = model.image
  _require(
    image.image_size % image.patch_size == 0,
    f"config.model.image.image_size={image.image_size} is not a multiple of "
    f"config.model.image.patch_size={image.patch_size}",
  )
  _require(image.init in VIT_INITS, f"config.model.image.init={image.init!r} must be one of {VIT_INITS}")
  text = model.text
  _require(
    all(0 < bucket <= text.context_length for bucket in text.context_buckets),
    f"config.model.text.context_buckets={tuple(text.context_buckets)} must lie in "
    f"[1, config.model.text.context_length={text.context_length}]",
  )
  _check_decoder(model.decoder)
  towers = tuple(model.init_towers)
  _require(
    bool(towers) and set(towers) <= set(INIT_TOWERS),
    f"config.model.init_towers={towers} must be a non-empty subset of {INIT_TOWERS}",
  )
  _require(
    not model.init_from or model.init_from.endswith(INIT_SUFFIXES),
    f"config.model.init_from={model.init_from!r} must be a {' / '.join(INIT_SUFFIXES)} file",
  )


def _check_decoder(cfg) -> None:
  """The region-query decoder's sizes, and its options (grain_jax/models/decoder.py) fitting together."""
  field = "config.model.decoder"
  _require(cfg.num_region_queries > 0, f"{field}.num_region_queries={cfg.num_region_queries} must be positive")
  _require(0.0 <= cfg.dropout < 1.0, f"{field}.dropout={cfg.dropout} must be in [0, 1)")
  _require(
    cfg.memory_position in MEMORY_POSITIONS,
    f"{field}.memory_position={cfg.memory_position!r} must be one of {MEMORY_POSITIONS}",
  )
  _require(
    not cfg.position_in_values or cfg.memory_position != "none",
    f"{field}.position_in_values=True needs a {field}.memory_position",
  )
  _require(
    not cfg.anchor_queries or cfg.box_refinement, f"{field}.anchor_queries=True needs {field}.box_refinement=True"
  )
  # The sine codes split the width into 4 parts (x, y; sine, cosine).
  sine = [f"memory_position={cfg.memory_position!r}"] if cfg.memory_position == "sine" else []
  sine += ["anchor_queries=True"] if cfg.anchor_queries else []
  _require(
    not sine or cfg.width % 4 == 0,
    f"{field}.width={cfg.width} must be divisible by 4 for the sine codes of {field}.{' and '.join(sine)}",
  )


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
  _require(
    steps >= 1 or evaluates_import,
    f"config.train.num_steps={steps} must be at least 1 (0 only evaluates a "
    "model imported with config.model.init_from)",
  )


def _check_choices(config) -> None:
  for (section, field), allowed in CHOICES.items():
    if section in config and field in config[section]:
      value = config[section][field]
      _require(value in allowed, f"config.{section}.{field}={value!r} must be one of {allowed}")
  _require(
    0.0 <= config.data.max_bad_fraction < 1.0,
    f"config.data.max_bad_fraction={config.data.max_bad_fraction} must be in [0, 1)",
  )
  _require(
    config.loss.iou_union_epsilon >= 0, f"config.loss.iou_union_epsilon={config.loss.iou_union_epsilon} must be >= 0"
  )
  _require(
    config.train.peak_flops_per_device >= 0,
    f"config.train.peak_flops_per_device={config.train.peak_flops_per_device} must be >= 0 (0: from the table)",
  )


def _check_devices(config, num_devices: int, training: bool) -> None:
  """The mesh tiles `num_devices`; for training, the global batch splits into a micro-batch per batch shard
  (its texts are packed per device and micro-batch: grain_jax/train/trainer.py)."""
  try:
    shape = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  if not training:
    return
  shards = sharding.batch_shards(jax.sharding.AbstractMesh(shape, sharding.MESH_AXES), config.sharding_rules)
  accumulate = config.train.grad_accum_steps
  _require(
    config.data.batch_size % (shards * accumulate) == 0,
    f"config.data.batch_size={config.data.batch_size} does not split into {shards} batch shards x "
    f"config.train.grad_accum_steps={accumulate} micro-batches",
  )


def _check_experiment(config, training: bool) -> None:
  """The arms and settings parse and have distinct names; a training run (grain_jax/experiment.py) must
  have arms to vary worlds or settings, and evaluate to compare them."""
  cfg = config.experiment
  for field in ("arms", "settings"):
    entries = tuple(cfg[field])
    names = [parse_arm(entry, field)[0] for entry in entries]
    _require(len(set(names)) == len(names), f"config.experiment.{field}={entries} repeats a name")
  if not training:
    return
  _require(
    bool(cfg.arms) or not (cfg.worlds or cfg.settings),
    "config.experiment.worlds and .settings vary the runs of a comparison: set config.experiment.arms",
  )
  _require(
    not cfg.arms or cfg.evaluate, "config.experiment.arms compares evaluations: set config.experiment.evaluate=True"
  )


def _check_run(config, num_devices: int | None, evaluation_files: bool, training: bool) -> None:
  """Every rule of the config of one run."""
  _check_fields(config, base.get_config(), "config")
  for field in PATH_FIELDS:
    section, name = field.split(".")
    check_local_path(config[section][name], f"config.{field}")
  _check_model(config.model)
  _check_bounds(config)
  _check_choices(config)
  eval_rules.check_settings(config.eval)
  eval_rules.check_entries(config.eval)
  if evaluation_files:
    eval_rules.check_files(config.eval)
  if num_devices is not None:
    _check_devices(config, num_devices, training)


def validate(
  config: ml_collections.ConfigDict,
  num_devices: int | None = None,
  evaluation_files: bool = False,
  training: bool = False,
) -> ml_collections.ConfigDict:
  """Checks the config of every run `config` makes against the documented schema (grain_jax/config/base.py)
  and every rule; returns `config` unchanged.

  Args:
    config: the full config.
    num_devices: when given, the mesh sizes must tile exactly this many devices.
    training: for a run that trains (`--mode train`): with `config.experiment.arms` the runs are the
      comparison's (`comparison_runs`), each checked in place of `config`; with `num_devices` the
      global batch must split over the mesh's batch shards and `config.train.grad_accum_steps`
      micro-batches.
    evaluation_files: also read the descriptor file of every tfds set in `config.eval.classification`
      and look for the Places365 download `places365:full` reads (a run that will evaluate, so that a
      missing file stops it before training, not after).

  Raises:
    ConfigError naming the first offending field (or descriptor file); RemotePathError for a URL in a
    PATH_FIELDS field.
  """
  _check_experiment(config, training)
  runs = list(comparison_runs(config).values()) if training else []
  for run_config in runs or [config]:
    _check_run(run_config, num_devices, evaluation_files, training)
  return config
