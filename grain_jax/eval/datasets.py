"""Which eval sets exist and how `config.eval` names them.

Classification entries:
  a registry name   one of TFDS_DATASETS below: read with `tfds.data_source` from
                    `config.eval.tfds_data_dir`, prepared once with
                    `tfds build TFDS_NAME --data_dir=DIR --file_format=array_record` (some need
                    the archives downloaded by hand first, e.g. ImageNet), with the Menon &
                    Vondrick descriptor JSON named here from `config.eval.descriptors_dir`
  NAME:VARIANT      a registry set under another protocol (VARIANTS): `sun397:all` (all of SUN397's
                    images, as torchvision's), `places365:full` (the full-size images, from
                    torchvision's download in `config.eval.places365_dir`); the authors' choices
  synthetic/attributes, synthetic/novel
                    the built-in synthetic splits (grain_jax/data/synthetic.py)
  folder:PATH       any image folder PATH/<class>/<image> (Products-2023 style), with optional
                    PATH/classes.txt and PATH/descriptors.json (read and paired as a registry set's)
Retrieval entries: `synthetic`, or `karpathy:JSON:IMAGE_ROOT` (Flickr30k / MSCOCO Karpathy test).
Grounding entries: `synthetic`, or `json:PATH` ({"images": [{"file", "regions": [...]}]}).
Probe entries: `synthetic`, or `json:PATH` (a probe.json, grain_jax/eval/probe.py).
The resolvers below take entries that grain_jax/config/eval_rules.py has checked.

Class names are the dataset's own (tfds label names, in label order) made readable, or for CIFAR
the shipped lists in grain_jax/eval/class_lists (tfds learns their names only when preparing them,
so they cannot be checked without the data otherwise). Descriptor files are paired with them class
by class (grain_jax/eval/descriptors.py); ImageNet's and CUB's tfds labels are ids, so their
classes take the file's keys in order, as the reference does for every dataset, and a file whose keys
are in another order is refused (`descriptors.check_order`, against CUB's `label_name`s and the WordNet
names of ImageNet's wnids shipped in grain_jax/eval/class_lists/imagenet_wnids.txt).
"""

import dataclasses
import importlib.resources
import json
import logging
import os
import re

from grain_jax.data import synthetic
from grain_jax.eval import descriptors as descriptor_files
from grain_jax.eval import sets


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """A tfds classification set: its tfds name, eval split and descriptor file."""

  tfds_name: str
  split: str
  descriptors_file: str  # the Menon & Vondrick release's name for it
  in_average: bool = True  # one of the paper's 11 datasets
  readable_labels: bool = True  # False: tfds labels are ids; class names come from the descriptors
  class_list: str = ""  # grain_jax/eval/class_lists/<this>: names in label order, for sets
  # whose tfds label names are only known once prepared
  drop_classes: tuple[str, ...] = ()  # tfds label names left out, with their images
  reader: str = "tfds"  # "places365_full": torchvision's download in config.eval.places365_dir
  # For id labels, where the classes' names are known, to check a descriptor file's order: the
  # feature of each example naming its class, or ImageNet's wnids in tfds's order.
  example_names: str = ""
  wnid_labels: bool = False


TFDS_DATASETS = {
  "cifar10": TfdsDataset("cifar10", "test", "descriptors_cifar10.json", class_list="cifar10.txt"),
  "cifar100": TfdsDataset("cifar100", "test", "descriptors_cifar100.json", class_list="cifar100.txt"),
  "sun397": TfdsDataset("sun397", "test", "descriptors_sun.json"),
  "cars": TfdsDataset("cars196", "test", "descriptors_cars.json"),
  "dtd": TfdsDataset("dtd", "test", "descriptors_dtd.json"),
  "pets": TfdsDataset("oxford_iiit_pet", "test", "descriptors_pets.json"),
  # The authors read Caltech-101 through torchvision: all 8,677 images of the 101 object classes.
  # tfds splits the same images into train and test and adds the 467 of "background_google".
  "caltech101": TfdsDataset(
    "caltech101", "train+test", "descriptors_caltech.json", drop_classes=("background_google",)
  ),
  "flowers102": TfdsDataset("oxford_flowers102", "test", "descriptors_flowers.json"),
  "cub": TfdsDataset(
    "caltech_birds2011", "test", "descriptors_cub.json", readable_labels=False, example_names="label_name"
  ),
  "places365": TfdsDataset("places365_small", "validation", "descriptors_places365.json"),
  "food101": TfdsDataset("food101", "validation", "descriptors_food101.json"),
  "imagenet": TfdsDataset(
    "imagenet2012", "validation", "descriptors_imagenet.json", in_average=False, readable_labels=False, wnid_labels=True
  ),
  "imagenet_v2": TfdsDataset(
    "imagenet_v2", "test", "descriptors_imagenet.json", in_average=False, readable_labels=False, wnid_labels=True
  ),
  "eurosat": TfdsDataset("eurosat/rgb", "train", "descriptors_eurosat.json", in_average=False),
}
PAPER_AVERAGE = tuple(name for name, d in TFDS_DATASETS.items() if d.in_average)
# Other protocols of a registry set, entries "NAME:VARIANT" evaluated in its place (and counted as it
# in the paper's mean).
VARIANTS = {
  # Every image, as torchvision's SUN397 (the authors'): tfds's three random splits joined, 108,752
  # images (torchvision's 108,754 less the two tfds's builder skips).
  "sun397:all": dataclasses.replace(TFDS_DATASETS["sun397"], split="train+validation+test"),
  # The full-size validation images (the authors'): tfds has only the 256x256 ones.
  "places365:full": dataclasses.replace(TFDS_DATASETS["places365"], reader="places365_full"),
}
# The paper's 11 as the authors evaluate them.
AUTHORS_PAPER_SETS = tuple({"sun397": "sun397:all", "places365": "places365:full"}.get(n, n) for n in PAPER_AVERAGE)


# The built-in synthetic classification splits (entries "synthetic/<split>").
SYNTHETIC_SPLITS = ("attributes", "novel")


def spec_of(entry: str) -> TfdsDataset | None:
  """The registry set (or variant) an entry names; None for other entries."""
  return TFDS_DATASETS.get(entry) or VARIANTS.get(entry)


def paper_set(name: str) -> str:
  """The registry set a result stands for: "sun397:all" -> "sun397"."""
  return name.partition(":")[0]


def readable(label: str) -> str:
  """A tfds label name as words: "/a/airport_terminal" -> "airport terminal", "apple_pie" -> "apple pie"."""
  label = descriptor_files.without_initial_folder(label)
  return re.sub(r"\s+", " ", re.sub(r"[_/]", " ", label)).strip()


def class_list(file_name: str) -> list[str]:
  """A class-name list shipped in grain_jax/eval/class_lists (one name a line, in label order)."""
  text = importlib.resources.files("grain_jax.eval").joinpath("class_lists", file_name).read_text()
  return [line.strip() for line in text.splitlines() if line.strip()]


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


@dataclasses.dataclass
class Classification:
  """A resolved classification entry."""

  name: str
  data: sets.ClassificationSet  # class_names / descriptors already paired
  alignment: str  # how descriptors met class names ("none" without any; see
  # descriptors.summary)
  in_average: bool = False
  descriptors: dict | None = None  # descriptors.record() of a tfds set's file, None without one


def registry_class_names(name: str, label_names=None) -> list[str]:
  """The class names registry set (or variant) `name` prompts with, in label order: its tfds label names
  (those given, else read from tfds's builder info, which needs no download) made readable, less
  `drop_classes`, or its shipped class list. Raises ValueError when the list does not fit."""
  spec = spec_of(name)
  if label_names is None:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    label_names = tfds.builder(spec.tfds_name).info.features["label"].names
  label_names = [n for n in label_names if n not in spec.drop_classes]
  if not spec.class_list:
    return [readable(n) for n in label_names]
  names = class_list(spec.class_list)
  if len(names) != len(label_names):
    raise ValueError(f"{name}: {spec.class_list} has {len(names)} classes, the tfds dataset {len(label_names)}")
  return names


def descriptors_path(name: str, descriptors_dir: str) -> str:
  """Where registry set `name` reads its descriptor file from ("" when no folder is set)."""
  return os.path.join(descriptors_dir, spec_of(name).descriptors_file) if descriptors_dir else ""


def wnid_class_names() -> list[list[str]]:
  """The WordNet names of ImageNet's 1000 classes in tfds's label order (its sorted wnids)."""
  return [line.split(" ", 1)[1].split(", ") for line in class_list("imagenet_wnids.txt")]


def id_class_names(spec: TfdsDataset, tfds_data_dir: str = "", source=None) -> list[list[str]] | None:
  """The known names of each class of an id-labelled set, in label order: ImageNet's from its wnids,
  CUB's from the `example_names` its examples carry (of `source`, else of the tfds data); None where
  they are unknown (another set, data not prepared, a source without that feature)."""
  if spec.wnid_labels:
    return wnid_class_names()
  if not spec.example_names:
    return None
  if source is None:
    names = sets.tfds_example_class_names(spec.tfds_name, spec.split, tfds_data_dir or None, spec.example_names)
  elif spec.example_names in source.dataset_info.features:
    names = sets.example_class_names(source, spec.example_names, len(source.dataset_info.features["label"].names))
  else:
    names = None
  return None if names is None else [[name] if name else [] for name in names]


def check_id_file(path: str, keys: list[str], num_classes: int, known: list[list[str]] | None) -> None:
  """An id-labelled set's file: one key per class (`descriptors.pair`), in label order where the
  classes' names are `known` (`descriptors.check_order`); errors name the file."""
  try:
    descriptor_files.pair(keys, [str(i) for i in range(num_classes)], labels_are_ids=True)
    if known is not None:
      descriptor_files.check_order(keys, known)
  except ValueError as error:
    raise type(error)(f"{path}: {error}") from None


def _with_descriptors(
  name: str,
  data: sets.ClassificationSet,
  path: str,
  labels_are_ids: bool = False,
  in_average: bool = False,
  known: list[list[str]] | None = None,
) -> Classification:
  """Set `name` with the descriptor file at `path` paired with its classes (descriptors.pair; with id
  labels in the order the classes' `known` names give, when known) and recorded (descriptors.record),
  or by class names only when there is no file there (logged)."""
  if not path or not os.path.exists(path):
    logging.warning("%s: no descriptor file %s, evaluated with class names only", name, path or "(no folder set)")
    return Classification(name, sets.ClassificationSet(data.class_names, {}, data.source), "none", in_average)
  raw, digest = descriptor_files.read(path)
  if labels_are_ids:
    check_id_file(path, list(raw), len(data.class_names), known)
  pairs = descriptor_files.pair(list(raw), data.class_names, labels_are_ids)
  names = descriptor_files.prompt_names(pairs)
  paired = {prompt: list(raw[p.key]) for prompt, p in zip(names, pairs) if p.key is not None}
  info = descriptor_files.record(path, digest, pairs, raw)
  return Classification(name, sets.ClassificationSet(names, paired, data.source), info["alignment"], in_average, info)


def tfds_classification(
  name: str, tfds_data_dir: str = "", descriptors_dir: str = "", source=None, places365_dir: str = ""
) -> Classification:
  """A registry dataset or variant, its descriptor file checked beforehand (grain_jax/config/eval_rules.py,
  `check_descriptors`); `source` replaces the `tfds.data_source` call (tests);
  `places365_dir` is torchvision's Places365 download (`places365:full`)."""
  spec = spec_of(name)
  if spec.reader == "places365_full":
    data = sets.places365_full(places365_dir)
  elif source is None:
    data = sets.tfds_classification(spec.tfds_name, spec.split, tfds_data_dir or None, drop_classes=spec.drop_classes)
  else:
    data = sets.from_tfds_source(source, drop_classes=spec.drop_classes)
  data.class_names = registry_class_names(name, data.class_names)
  known = None if spec.readable_labels else id_class_names(spec, tfds_data_dir, source)
  return _with_descriptors(
    name, data, descriptors_path(name, descriptors_dir), not spec.readable_labels, spec.in_average, known
  )


def folder_classification(root: str, name: str = "") -> Classification:
  """An image folder (sets.image_folder) with its optional root/descriptors.json; `name`
  defaults to the folder's."""
  return _with_descriptors(
    name or os.path.basename(os.path.normpath(root)), sets.image_folder(root), os.path.join(root, "descriptors.json")
  )


def probe(entry: str, config, workdir: str) -> tuple[str, str]:
  """Resolves one `config.eval.probes` entry to (name, path of its probe.json)."""
  if entry == "synthetic":
    return "synthetic", os.path.join(synthetic.for_config(config, workdir)["probe"], "probe.json")
  path = entry.partition(":")[2]
  return os.path.splitext(os.path.basename(path))[0], path


def classification(entry: str, config, workdir: str) -> Classification:
  """Resolves one `config.eval.classification` entry."""
  if entry.startswith("synthetic/"):
    return folder_classification(synthetic.for_config(config, workdir)[entry.split("/", 1)[1]], entry)
  if entry.startswith("folder:"):
    return folder_classification(entry.split(":", 1)[1])
  return tfds_classification(
    entry, config.eval.tfds_data_dir, config.eval.descriptors_dir, places365_dir=config.eval.places365_dir
  )


def retrieval(entry: str, config, workdir: str) -> tuple[str, sets.RetrievalSet]:
  """Resolves one `config.eval.retrieval` entry to (name, set)."""
  if entry == "synthetic":
    root = synthetic.for_config(config, workdir)["retrieval"]
    return "synthetic", sets.karpathy(os.path.join(root, "captions.json"), root)
  json_path, _, image_root = entry.partition(":")[2].partition(":")
  name = _read_json(json_path).get("dataset") or os.path.splitext(os.path.basename(json_path))[0]
  return name, sets.karpathy(json_path, image_root)


def grounding(entry: str, config, workdir: str) -> tuple[str, sets.GroundingSet]:
  """Resolves one `config.eval.grounding` entry to (name, set)."""
  if entry == "synthetic":
    return "synthetic", sets.grounding(
      os.path.join(synthetic.for_config(config, workdir)["grounding"], "grounding.json")
    )
  path = entry.partition(":")[2]
  return os.path.splitext(os.path.basename(path))[0], sets.grounding(path)
