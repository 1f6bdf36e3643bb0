"""The built-in synthetic dataset: training shards and eval splits, deterministic from a seed.

Written in the same formats as real data, so training and evaluation have one code path:

  out/train/        record shards + manifest.json (as written by grain_jax.data.convert)
  out/attributes/   image folder: <class>/<i>.png, classes.txt, descriptors.json
  out/novel/        image folder of classes with invented names, known only by their descriptors
  out/retrieval/    images/<i>.png + captions.json (Karpathy format, split "test")
  out/grounding/    images/<i>.png + grounding.json (phrase -> normalized x1, y1, x2, y2 box)
  out/probe/        images/<i>.png + probe.json: one object per image, its box and attributes
  out/synthetic.json  the parameters; `ensure()` regenerates only when they change

Item i of a split is drawn from its own generator seeded by (seed, split, i), so changing a count
keeps the other items as they were.
"""

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from PIL import Image

from grain_jax import errors
from grain_jax.data import records
from grain_jax.data import synthetic_scenes as scenes

PARAMS = "synthetic.json"
_SPLIT_CODES = {"train": 0, "attributes": 1, "novel": 2, "retrieval": 3, "grounding": 4, "probe": 5}
_SYLLABLES = (
  "zor",
  "blat",
  "quen",
  "fid",
  "mok",
  "trel",
  "vash",
  "pim",
  "gru",
  "lox",
  "dree",
  "snib",
  "yuk",
  "tav",
  "wem",
  "crun",
)


def default_params() -> dict[str, Any]:
  """Sizes of the demo's dataset (the `config.data.synthetic` fields)."""
  return dict(
    seed=0,
    num_train=2048,
    image_size=64,
    image_format="png",
    caption_objects=1.0,
    caption_attributes=1.0,
    num_attribute_classes=12,
    num_novel_classes=8,
    images_per_class=10,
    num_retrieval=100,
    num_grounding=100,
    num_probe=200,
  )


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def descriptors(attributes: tuple[str, str, str]) -> list[str]:
  """Menon & Vondrick-style descriptors of (pattern, color, shape), in training vocabulary."""
  pattern, color, shape = attributes
  return [f"{color} color", f"{pattern} pattern", f"{shape} shape"]


def _attribute_classes(seed: int, count: int, exclude=()) -> list[tuple[str, str, str]]:
  """`count` distinct (pattern, color, shape) combinations, not in `exclude`."""
  combos = [c for c in itertools.product(scenes.PATTERNS, scenes.COLORS, scenes.SHAPES) if c not in exclude]
  order = np.random.default_rng([seed, 99]).permutation(len(combos))
  return [combos[i] for i in order[:count]]


def invented_names(seed: int, count: int) -> list[str]:
  """`count` distinct made-up two- or three-syllable names ("zorblat") no training text uses."""
  rng = np.random.default_rng([seed, 98])
  names = []
  while len(names) < count:
    name = "".join(rng.choice(_SYLLABLES, size=rng.integers(2, 4)))
    if name not in names:
      names.append(name)
  return names


def train_records(
  seed: int,
  count: int,
  image_size: int,
  image_format: str = "png",
  caption_objects: float = 1.0,
  caption_attributes: float = 1.0,
) -> Iterator[records.Record]:
  """Scenes of 1-4 objects with a weak alt-text, an MLLM caption and detector-like regions.

  The MLLM caption names `caption_objects` of the objects by `caption_attributes` of their
  attributes (shares, see `synthetic_scenes.rich_caption`); the regions describe every object the
  detector finds with all its attributes, whatever the caption says.
  """
  encode = scenes.encode_png if image_format == "png" else scenes.encode_jpeg
  for index in range(count):
    rng = _rng(seed, "train", index)
    things = scenes.sample_scene(rng, int(rng.integers(1, 5)))
    pixels = scenes.render(rng, things, image_size)
    regions = tuple(records.Region(*d) for d in scenes.detections(things, rng))
    captions = (scenes.weak_caption(things, rng), scenes.rich_caption(things, rng, caption_objects, caption_attributes))
    yield records.Record(f"synthetic/train/{index}", encode(pixels), *captions, regions)


def _save(pixels: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels).save(path, compress_level=1)


def write_image_folder(
  out_dir: str, split: str, classes: dict[str, tuple[str, str, str]], seed: int, images_per_class: int, image_size: int
) -> None:
  """`out_dir/<class>/<i>.png` (the class's object, maybe a distractor), class list, descriptors."""
  os.makedirs(out_dir, exist_ok=True)
  for label, (name, attributes) in enumerate(classes.items()):
    for i in range(images_per_class):
      rng = _rng(seed, split, label * images_per_class + i)
      things = scenes.sample_scene(rng, 1 + int(rng.random() < 0.3), attributes=attributes)
      # The distractor is drawn first so that it never hides the class's object.
      _save(scenes.render(rng, things[::-1], image_size), os.path.join(out_dir, name, f"{i}.png"))
  with open(os.path.join(out_dir, "classes.txt"), "w") as f:
    f.write("\n".join(classes) + "\n")
  with open(os.path.join(out_dir, "descriptors.json"), "w") as f:
    json.dump({name: descriptors(a) for name, a in classes.items()}, f, indent=1)


def _scenes(seed: int, split: str, count: int, image_size: int, out_dir: str, num_things: int = 0):
  """Yields (index, file name, objects, rng) for `count` scenes of `num_things` objects (0: 1-4 at
  random) saved under images/."""
  for index in range(count):
    rng = _rng(seed, split, index)
    things = scenes.sample_scene(rng, num_things or int(rng.integers(1, 5)))
    name = f"{index}.png"
    _save(scenes.render(rng, things, image_size), os.path.join(out_dir, "images", name))
    yield index, name, things, rng


def write_retrieval(out_dir: str, seed: int, count: int, image_size: int) -> None:
  """Karpathy-format captions.json: two captions per image (objects in two random orders)."""
  images = []
  for index, name, things, rng in _scenes(seed, "retrieval", count, image_size, out_dir):
    sentences = [scenes.rich_caption(things, rng) for _ in range(2)]
    images.append(
      {
        "filepath": "images",
        "filename": name,
        "imgid": index,
        "split": "test",
        "sentences": [{"raw": s, "tokens": s.split()} for s in sentences],
      }
    )
  with open(os.path.join(out_dir, "captions.json"), "w") as f:
    json.dump({"dataset": "synthetic", "images": images}, f)


def write_grounding(out_dir: str, seed: int, count: int, image_size: int) -> None:
  """grounding.json: {"images": [{"file", "regions": [{"phrase", "box"}]}]} with exact boxes."""
  images = []
  for _, name, things, _ in _scenes(seed, "grounding", count, image_size, out_dir):
    regions = [{"phrase": t.description, "box": list(t.box)} for t in things]
    images.append({"file": os.path.join("images", name), "regions": regions})
  with open(os.path.join(out_dir, "grounding.json"), "w") as f:
    json.dump({"images": images}, f)


def write_probe(out_dir: str, seed: int, count: int, image_size: int) -> None:
  """probe.json: {"images": [{"file", "box": normalized [x1, y1, x2, y2], "attributes": {"size",
  "pattern", "color", "shape"}}]}, one object per image with attributes drawn at random (linear probes
  of what the embeddings keep of each attribute)."""
  os.makedirs(out_dir, exist_ok=True)
  images = []
  for _, name, (thing,), _ in _scenes(seed, "probe", count, image_size, out_dir, num_things=1):
    images.append(
      {
        "file": os.path.join("images", name),
        "box": list(thing.box),
        "attributes": {a: getattr(thing, a) for a in scenes.ATTRIBUTES},
      }
    )
  with open(os.path.join(out_dir, "probe.json"), "w") as f:
    json.dump({"images": images}, f)


def generate(out_dir: str, **params: Any) -> dict[str, str]:
  """Writes every split into `out_dir` (replacing what is there); returns split -> directory."""
  p = default_params()
  unknown = set(params) - set(p)
  if unknown:
    raise ValueError(f"unknown synthetic dataset parameters {sorted(unknown)}; known: {sorted(p)}")
  p.update(params)
  for share in ("caption_objects", "caption_attributes"):
    if not 0 <= p[share] <= 1:
      raise ValueError(f"synthetic dataset parameter {share}={p[share]} must be a share in [0, 1]")
  seed, size = p["seed"], p["image_size"]
  paths = {split: os.path.join(out_dir, split) for split in _SPLIT_CODES}
  for path in paths.values():
    shutil.rmtree(path, ignore_errors=True)
  train = train_records(seed, p["num_train"], size, p["image_format"], p["caption_objects"], p["caption_attributes"])
  records.write_dataset(paths["train"], train, source=f"synthetic seed={seed}")
  attributes = _attribute_classes(seed, p["num_attribute_classes"])
  write_image_folder(
    paths["attributes"], "attributes", {" ".join(a): a for a in attributes}, seed, p["images_per_class"], size
  )
  novel = _attribute_classes(seed + 1, p["num_novel_classes"])
  write_image_folder(
    paths["novel"], "novel", dict(zip(invented_names(seed, len(novel)), novel)), seed, p["images_per_class"], size
  )
  write_retrieval(paths["retrieval"], seed, p["num_retrieval"], size)
  write_grounding(paths["grounding"], seed, p["num_grounding"], size)
  write_probe(paths["probe"], seed, p["num_probe"], size)
  with open(os.path.join(out_dir, PARAMS), "w") as f:
    json.dump(p, f, indent=1)
  return paths


def for_config(config, workdir: str) -> dict[str, str]:
  """The splits for `config.data.synthetic` in `config.data.synthetic_dir` (default
  `workdir/synthetic`), generated on first use; split -> directory.

  With several processes each writes its own identical copy (`.../process<i>`): hosts of a pod
  need not share a filesystem, and none waits on another.
  """
  out_dir = config.data.synthetic_dir or os.path.join(workdir, "synthetic")
  if errors.is_url(out_dir):
    raise errors.RemotePathError(
      f"the built-in synthetic data would be written to {out_dir}, but its ArrayRecord shards are read by Grain "
      "from local paths only: with a gs:// --workdir, set config.data.synthetic_dir to a local folder"
    )
  if jax.process_count() > 1:
    out_dir = os.path.join(out_dir, f"process{jax.process_index()}")
  return ensure(out_dir, **config.data.synthetic)


def ensure(out_dir: str, **params: Any) -> dict[str, str]:
  """generate() unless `out_dir` already holds the dataset with these parameters."""
  p = default_params()
  p.update(params)
  try:
    with open(os.path.join(out_dir, PARAMS)) as f:
      if json.load(f) == p:
        return {split: os.path.join(out_dir, split) for split in _SPLIT_CODES}
  except FileNotFoundError:
    pass
  return generate(out_dir, **params)
