"""The rules of `config.eval`: its protocol's settings, the syntax of its entries, and the files those
entries read (checked only for a run that will evaluate, so that a missing file stops it before training).

Entry syntax (the sets behind each name: grain_jax/eval/datasets.py):
  classification  a registry name or NAME:VARIANT, synthetic/attributes, synthetic/novel, folder:PATH
  retrieval       synthetic, karpathy:JSON:IMAGE_ROOT
  grounding       synthetic, json:PATH
  probes          synthetic, json:PATH
"""

import os

from grain_jax.errors import ConfigError
from grain_jax.eval import datasets, prompts, protocol
from grain_jax.eval import descriptors as descriptor_files
from grain_jax.eval import heads as heads_lib

# The files of torchvision's Places365 download that `places365:full` reads.
PLACES365_FILES = ("categories_places365.txt", "places365_val.txt", "val_large")


def check_settings(cfg) -> None:
  """Raises ConfigError naming the field unless the protocol, every head, alpha and the template set of
  the eval section `cfg` (after the protocol fills what `cfg` leaves open) exist and fit."""
  if cfg.protocol not in protocol.PROTOCOLS:
    raise ConfigError(f"config.eval.protocol={cfg.protocol!r} must be one of {sorted(protocol.PROTOCOLS)}")
  settings = protocol.settings(cfg)
  for head in settings["heads"]:
    try:
      heads_lib.check(head)
    except ValueError as error:
      raise ConfigError(f"config.eval.heads: {error}") from None
  if not 0 <= settings["alpha"] <= 1:
    raise ConfigError(f"config.eval.alpha={settings['alpha']} must be in [0, 1]")
  if settings["templates"] not in prompts.TEMPLATE_SETS:
    raise ConfigError(f"config.eval.templates={settings['templates']!r} must be one of {sorted(prompts.TEMPLATE_SETS)}")


def check_entries(cfg) -> None:
  """Raises ConfigError naming the first entry of the eval section `cfg` that names no set (reads nothing)."""
  for entry in cfg.classification:
    if entry.startswith("synthetic/"):
      ok = entry.split("/", 1)[1] in datasets.SYNTHETIC_SPLITS
    elif entry.startswith("folder:"):
      ok = bool(entry.split(":", 1)[1])
    else:
      ok = datasets.spec_of(entry) is not None
    if not ok:
      raise ConfigError(
        f"config.eval.classification entry {entry!r} is not a dataset: use one of "
        f"{sorted(datasets.TFDS_DATASETS)}, {', '.join(datasets.VARIANTS)}, "
        f"{', '.join('synthetic/' + s for s in datasets.SYNTHETIC_SPLITS)} or folder:PATH"
      )
  for entry in cfg.retrieval:
    kind, _, rest = entry.partition(":")
    json_path, _, image_root = rest.partition(":")
    if entry != "synthetic" and (kind != "karpathy" or not json_path or not image_root):
      raise ConfigError(f"config.eval.retrieval entry {entry!r} must be 'synthetic' or 'karpathy:JSON:IMAGE_ROOT'")
  for field in ("grounding", "probes"):
    for entry in cfg[field]:
      kind, _, path = entry.partition(":")
      if entry != "synthetic" and (kind != "json" or not path):
        raise ConfigError(f"config.eval.{field} entry {entry!r} must be 'synthetic' or 'json:PATH'")


def check_files(cfg) -> None:
  """Raises ConfigError naming the file or folder unless every descriptor file the classification sets
  of the eval section `cfg` need is there and fits (`check_descriptors`), and the Places365 download is
  there when `places365:full` reads it."""
  try:
    check_descriptors(cfg.classification, cfg.descriptors_dir, cfg.allow_missing_descriptors, cfg.tfds_data_dir)
  except (OSError, ValueError) as error:
    raise ConfigError(str(error)) from None
  if "places365:full" in cfg.classification:
    folder = cfg.places365_dir
    absent = [n for n in PLACES365_FILES if not folder or not os.path.exists(os.path.join(folder, n))]
    if absent:
      raise ConfigError(
        f"config.eval.classification has 'places365:full' but config.eval.places365_dir="
        f"{folder!r} lacks {', '.join(absent)}: torchvision.datasets.Places365(DIR, "
        "split='val', small=False, download=True) writes them"
      )


def check_descriptors(names, descriptors_dir: str, allow_missing: bool, tfds_data_dir: str = "") -> None:
  """Raises FileNotFoundError naming the file unless every registry set among `names` has a descriptor
  file in `descriptors_dir`, and BadFileError (a ValueError) unless it is in the right format: for sets
  labelled by ids one key per class, in label order where the classes' names are known without
  evaluating (ImageNet's; CUB's when prepared in `tfds_data_dir`). With `allow_missing`, sets whose
  labels are words may go without one (they get names-only prompts)."""
  for name in names:
    spec = datasets.spec_of(name)
    if spec is None:
      continue
    path = datasets.descriptors_path(name, descriptors_dir)
    if path and os.path.exists(path):
      raw, _ = descriptor_files.read(path)
      if not spec.readable_labels:
        known = datasets.id_class_names(spec, tfds_data_dir)
        num_classes = len(datasets.registry_class_names(name) if known is None else known)
        datasets.check_id_file(path, list(raw), num_classes, known)
      continue
    if allow_missing and spec.readable_labels:
      continue
    where = (
      f"write it with `python -m grain_jax.annotate descriptors --dataset {name} --out DIR`, or set "
      "config.eval.allow_missing_descriptors=True to evaluate it with class names only"
      if spec.readable_labels
      else "its tfds labels are ids, so only that file names its classes: get it from Menon & Vondrick's release"
    )
    raise FileNotFoundError(
      f"config.eval.classification has {name!r} but its descriptor file {spec.descriptors_file} "
      f"is not in config.eval.descriptors_dir={descriptors_dir!r}: {where} "
      "(docs/evaluation.md says where each file comes from)"
    )
