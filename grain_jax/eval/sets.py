"""Evaluation data: classification sets, retrieval sets, grounding sets, and their image batches.

Every set holds a random-access `source` of dicts with an `"image"` (file path, encoded bytes or
uint8 array) and integer fields (`"label"`, ...); `image_batches()` turns any of them into padded,
per-host batches with the training pipeline's image preprocessing.

Formats read:
  image folder  root/<class>/<image>, root/classes.txt (one class name per line, in label order)
                (its root/descriptors.json is read and paired by grain_jax/eval/datasets.py)
  tfds          tfds.data_source(name) over array_record files (no tensorflow needed)
  Places365     torchvision's download of the full-size validation images (places365_full)
  Karpathy      {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}
  grounding     {"images": [{"file", "regions": [{"phrase", "box": [x1, y1, x2, y2]}]}]}
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from grain_jax.data import examples

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class ClassificationSet:
  class_names: list[str]
  descriptors: dict[str, list[str]]  # {} when the set has none
  source: Sequence[dict[str, Any]]  # {"image", "label"}


@dataclasses.dataclass
class RetrievalSet:
  source: Sequence[dict[str, Any]]  # {"image"}: one entry per image
  captions: list[str]  # all captions, image after image
  caption_image: np.ndarray  # [num_captions] int32: index of each caption's image


@dataclasses.dataclass
class GroundingSet:
  source: Sequence[dict[str, Any]]  # {"image"}: one entry per image
  phrases: list[list[str]]  # per image, its phrases
  boxes: list[np.ndarray]  # per image, [num_phrases, 4] float32 cxcywh, normalized


def image_folder(root: str, classes_file: str = "classes.txt") -> ClassificationSet:
  """root/<class>/<image> with an optional class list (its descriptors left to the caller: {})."""
  classes_path = os.path.join(root, classes_file)
  if os.path.exists(classes_path):
    with open(classes_path) as f:
      class_names = [line.strip() for line in f if line.strip()]
  else:  # no class list: the sorted folder names are the classes
    class_names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  source = []
  for label, name in enumerate(class_names):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{classes_path} lists class {name!r} but {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_SUFFIXES))
    source += [{"image": os.path.join(folder, f), "label": label} for f in files]
  return ClassificationSet(class_names, {}, source)


class _Relabeled(Sequence):
  """A tfds data source seen as {"image", "label"} dicts: the elements `indices` (all when None),
  with labels renumbered by `new_label` (kept when None)."""

  def __init__(
    self,
    source: Sequence[dict[str, Any]],
    image_key: str,
    label_key: str,
    indices: np.ndarray | None = None,
    new_label: np.ndarray | None = None,
  ):
    self._source, self._image_key, self._label_key = source, image_key, label_key
    self._indices, self._new_label = indices, new_label

  def __len__(self) -> int:
    return len(self._source) if self._indices is None else len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    element = self._source[index if self._indices is None else int(self._indices[index])]
    label = int(element[self._label_key])
    return {
      "image": element[self._image_key],
      "label": label if self._new_label is None else int(self._new_label[label]),
    }


def from_tfds_source(
  source: Sequence[dict[str, Any]],
  image_key: str = "image",
  label_key: str = "label",
  drop_classes: Sequence[str] = (),
  labels: np.ndarray | None = None,
) -> ClassificationSet:
  """A ClassificationSet over a tfds data source; class names come from its label feature.

  `drop_classes` (tfds label names) are left out with their images, the other labels renumbered in
  order; `labels` `[len(source)]` are the source's labels when known (else read from `source`).
  """
  names = source.dataset_info.features[label_key].names
  unknown = sorted(set(drop_classes) - set(names))
  if unknown:
    raise ValueError(f"classes {unknown} to drop are not labels of the tfds source")
  kept = np.array([n not in drop_classes for n in names])
  class_names = [n.replace("_", " ") for n, keep in zip(names, kept) if keep]
  if kept.all():
    return ClassificationSet(class_names, {}, _Relabeled(source, image_key, label_key))
  if labels is None:
    labels = np.array([int(element[label_key]) for element in source])
  new_label = np.cumsum(kept) - 1
  return ClassificationSet(
    class_names, {}, _Relabeled(source, image_key, label_key, np.flatnonzero(kept[labels]), new_label)
  )


def tfds_classification(
  name: str, split: str = "test", data_dir: str | None = None, drop_classes: Sequence[str] = (), **keys: str
) -> ClassificationSet:
  """A prepared tfds dataset (array_record format) read with `tfds.data_source`; `split` may join
  splits ("train+test"), `drop_classes` leaves classes out (see `from_tfds_source`)."""
  import tensorflow_datasets as tfds  # only eval on tfds datasets needs it, and it imports slowly

  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  labels = None
  if drop_classes:  # every label is read once to find the kept images; the images need no decoding
    image_key, label_key = keys.get("image_key", "image"), keys.get("label_key", "label")
    undecoded = tfds.data_source(
      name, split=split, data_dir=data_dir, download=False, decoders={image_key: tfds.decode.SkipDecoding()}
    )
    labels = np.array([int(element[label_key]) for element in undecoded])
  return from_tfds_source(source, drop_classes=drop_classes, labels=labels, **keys)


def example_class_names(
  source: Sequence[dict[str, Any]], name_key: str, num_classes: int, label_key: str = "label"
) -> list[str | None]:
  """Per label, the `name_key` text its examples carry (CUB's `label_name`), read from the examples of
  `source` until every label is named; None for a label no example has."""
  names: list[str | None] = [None] * num_classes
  for element in source:
    name = element[name_key]
    names[int(element[label_key])] = name.decode() if isinstance(name, bytes) else str(name)
    if None not in names:
      break
  return names


def tfds_example_class_names(name: str, split: str, data_dir: str | None, name_key: str) -> list[str | None] | None:
  """`example_class_names` of a prepared tfds dataset, its images left undecoded; None when it is not
  prepared in `data_dir`."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    return None
  features = builder.info.features
  undecoded = {
    key: tfds.decode.SkipDecoding() for key, feature in features.items() if isinstance(feature, tfds.features.Image)
  }
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False, decoders=undecoded)
  return example_class_names(source, name_key, features["label"].num_classes)


def places365_full(root: str) -> ClassificationSet:
  """The full-size Places365 validation images as torchvision downloads them
  (`torchvision.datasets.Places365(root, split="val", small=False, download=True)`): `root` holds
  categories_places365.txt ("/a/airfield 0", a class a line in label order), places365_val.txt
  ("Places365_val_00000001.jpg 165", an image a line) and val_large/ (the 36,500 images)."""

  def rows(file_name):
    with open(os.path.join(root, file_name)) as f:
      return [line.split() for line in f if line.strip()]

  class_names = [name for name, _ in rows("categories_places365.txt")]
  source = [
    {"image": os.path.join(root, "val_large", file.lstrip("/")), "label": int(label)}
    for file, label in rows("places365_val.txt")
  ]
  return ClassificationSet(class_names, {}, source)


def karpathy(json_path: str, image_root: str, split: str = "test") -> RetrievalSet:
  """The `split` images of a Karpathy-style JSON (Flickr30k, MSCOCO) and all their captions."""
  with open(json_path) as f:
    entries = [e for e in json.load(f)["images"] if e.get("split") == split]
  if not entries:
    raise ValueError(f"{json_path} has no images in split {split!r}")
  source, captions, caption_image = [], [], []
  for index, entry in enumerate(entries):
    path = os.path.join(image_root, entry.get("filepath", ""), entry["filename"])
    source.append({"image": path})
    for sentence in entry["sentences"]:
      captions.append(sentence["raw"])
      caption_image.append(index)
  return RetrievalSet(source, captions, np.array(caption_image, np.int32))


def grounding(json_path: str, image_root: str | None = None) -> GroundingSet:
  """Phrase -> box pairs; image files are relative to `image_root` (default: the JSON's folder)."""
  root = os.path.dirname(json_path) if image_root is None else image_root
  with open(json_path) as f:
    entries = json.load(f)["images"]
  source = [{"image": os.path.join(root, e["file"])} for e in entries]
  phrases = [[r["phrase"] for r in e["regions"]] for e in entries]
  boxes = [
    examples.xyxy_to_cxcywh(np.array([r["box"] for r in e["regions"]], np.float32).reshape(-1, 4)) for e in entries
  ]
  return GroundingSet(source, phrases, boxes)


class _HostShard(Sequence):
  """This host's elements of `source`, padded so that every host has `length` of them."""

  def __init__(
    self, source: Sequence[dict[str, Any]], image_size: int, process_index: int, process_count: int, length: int
  ):
    self._source, self._image_size = source, image_size
    self._process_index, self._process_count, self._length = process_index, process_count, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, local_index: int) -> dict[str, Any]:
    index = self._process_index + local_index * self._process_count
    if index >= len(self._source):
      # Padding: a blank image whose `valid` is False, with the fields of a real element.
      element = {k: 0 for k in self._source[0] if k != "image"}
      image = np.zeros((self._image_size, self._image_size, 3), np.float32)
    else:
      element = dict(self._source[index])
      image = examples.load_image(element.pop("image"), self._image_size)
    return {
      "image": image,
      "index": np.int32(index),
      "valid": index < len(self._source),
      **{k: np.asarray(v, np.int32) for k, v in element.items()},
    }


def image_batches(
  source: Sequence[dict[str, Any]],
  image_size: int,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  num_threads: int = 4,
) -> grain.IterDataset:
  """This host's batches of an eval set, in order, every host with the same number.

  Each batch: `image [b, H, H, 3] float32` (as in training), `index [b] int32` (position in
  `source`), `valid [b] bool` (False on padding), plus the source's integer fields (`label [b]`).
  `batch_size` is per host. A missing or corrupt image raises: eval sets must be complete.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  per_host = math.ceil(len(source) / process_count)
  length = math.ceil(per_host / batch_size) * batch_size
  dataset = grain.MapDataset.source(_HostShard(source, image_size, process_index, process_count, length))
  dataset = dataset.batch(batch_size)
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
