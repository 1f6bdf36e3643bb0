"""Command line: `python -m grain_jax.main --config configs/<x>.py[:arg] --workdir DIR [--mode train|eval|export]`.

Any config field can be overridden: `--config.train.num_steps=100`. The workdir (and --output-dir)
is a local folder or a bucket's gs://BUCKET/PATH. Running again with the same workdir resumes from
its newest checkpoint. An error the user caused (grain_jax.errors) is printed as one message with
exit status 2; GRAIN_JAX_TRACEBACK=1 shows its traceback. A run stopped by a preemption notice
(SIGTERM) saves a checkpoint first and exits with status 75
(`grain_jax.train.preemption.PREEMPTED_STATUS`); a Ctrl-C during training saves too and exits with
status 130 (a second Ctrl-C stops at once): run the same command again to resume.
"""

import logging
import re
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from grain_jax import errors, experiment, files
from grain_jax.config import field_section, load_config, validate
from grain_jax.export import to_torch
from grain_jax.train.preemption import Preempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, path.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "export"],
  "train (then evaluate, per config.experiment); eval: the newest checkpoint in workdir; "
  "export: the newest checkpoint to PyTorch files in workdir/export.",
)
_OUTPUT_DIR = flags.DEFINE_string(
  "output-dir",
  "",
  "--mode eval / export: write the results or the PyTorch files here instead of "
  "<workdir>/eval or <workdir>/export (a read-only, archived workdir, say).",
)
_EXPORT_MODULE_PREFIX = flags.DEFINE_bool(
  "export-module-prefix", False, "--mode export: prefix every key with `module.` (DDP-wrapped loaders)."
)
flags.mark_flags_as_required(["config", "workdir"])
_CONFIG_FLAG = re.compile(r"--?config(?:=(?P<spec>.*))?$")
_OVERRIDE_FLAG = re.compile(r"--?config\.(?P<field>[^=]+)")
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


class _LoadedConfig(flags.ArgumentParser):
  """--config's parser: the config `check_config_flags` loaded, so that absl does not run the file again."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    self.config.lock()  # as config_flags' lock_config=True: an override cannot add a field
    return self.config

  def flag_type(self) -> str:
    return "config object"


def check_config_flags(args: list[str]) -> ml_collections.ConfigDict | None:
  """The config the --config file gives (None without --config: absl says that it is required).

  Raises ConfigError for a --config file that does not exist or a --config.FIELD it does not have:
  ml_collections reports either with a traceback, and a field without its full path; this runs before
  it parses the flags, on the same file.
  """
  spec = None
  for index, arg in enumerate(args):
    match = _CONFIG_FLAG.match(arg)
    if match:
      spec = match["spec"] if match["spec"] is not None else next(iter(args[index + 1 :]), None)
  if spec is None:
    return None
  config = load_config(spec)
  for arg in args:
    match = _OVERRIDE_FLAG.match(arg)
    if match:
      field_section(config, match["field"], "command line")
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing (its own errors print the usage), after check_config_flags; the config file runs once."""
  config = check_config_flags(argv[1:])
  if config is not None:
    flags.FLAGS[_CONFIG.name].parser = _LoadedConfig(config)
  try:
    return app.parse_flags_with_usage(argv)
  except SystemExit as stop:
    # absl ends a help it was asked for with status 1, as it does a bad flag; help is no failure.
    if stop.code == 1 and any(arg in _HELP_FLAGS for arg in argv[1:]):
      raise SystemExit(0) from None
    raise


def initialize_distributed(train_config) -> None:
  """`jax.distributed.initialize()` when the config asks for several processes.

  Without a coordinator address JAX detects the cluster itself (Cloud TPU, SLURM, ...). When a process
  dies, a survivor's next collective fails at once, but its exit waits at the distributed service's
  shutdown barrier until the dead process has sent no heartbeat for `heartbeat_timeout_s` (with JAX's
  default of 100 s, as long).
  """
  if not train_config.multiprocess:
    return
  timeout = dict(
    heartbeat_timeout_seconds=train_config.heartbeat_timeout_s,
    initialization_timeout=train_config.initialization_timeout_s,
  )
  if train_config.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=train_config.coordinator_address,
      num_processes=train_config.num_processes,
      process_id=train_config.process_id,
      **timeout,
    )
  else:
    jax.distributed.initialize(**timeout)
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def quiet_orbax(record: logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter from the console; its warnings and errors still show, as one
  line each: the error that stops a run says what failed (GRAIN_JAX_TRACEBACK=1 keeps their tracebacks)."""
  if "orbax" not in record.pathname:
    return True
  if not errors.tracebacks_wanted():
    record.exc_info, record.exc_text = None, None
  return record.levelno >= logging.WARNING


def run(
  config: ml_collections.ConfigDict, mode: str, workdir: str, output_dir: str = "", export_module_prefix: bool = False
) -> int:
  """Validates `config` for `mode` (the run's one validation: the layers below take it as valid), then
  trains (and evaluates, per `config.experiment`), evaluates or exports; returns the exit status."""
  validate(
    config,
    num_devices=jax.device_count(),
    training=mode == "train",
    evaluation_files=mode == "eval" or mode == "train" and config.experiment.evaluate,
  )
  if mode == "eval":
    experiment.evaluate_checkpoint(config, workdir, output_dir)
  elif mode == "export":
    to_torch.export_checkpoint(config, workdir, module_prefix=export_module_prefix, directory=output_dir)
  else:
    try:
      experiment.run(config, workdir)
    except Preempted as preempted:
      logging.warning("%s", preempted)
      return preempted.status
  return 0


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger("absl").addFilter(quiet_orbax)
  files.check_location(_WORKDIR.value, "--workdir")
  files.check_location(_OUTPUT_DIR.value, "--output-dir")
  if _OUTPUT_DIR.value and _MODE.value == "train":
    raise errors.ArgumentError("--output-dir is for --mode eval and --mode export: training writes into --workdir")
  config = _CONFIG.value
  initialize_distributed(config.train)
  return run(config, _MODE.value, _WORKDIR.value, _OUTPUT_DIR.value, _EXPORT_MODULE_PREFIX.value)


if __name__ == "__main__":
  sys.exit(errors.run_command(lambda: app.run(main, flags_parser=parse_flags)))
