"""Eval sets: image folders (with their descriptor files), tfds sources, and padded per-host image batches."""

import hashlib
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

from grain_jax.data import examples
from grain_jax.errors import BadFileError
from grain_jax.eval import datasets, sets


def _folder(root, classes=("red thing", "blue thing"), per_class=3):
  for label, name in enumerate(classes):
    os.makedirs(root / name)
    for i in range(per_class):
      Image.new("RGB", (12, 8), (label * 200, i * 50, 0)).save(root / name / f"{i}.png")
  return root


def test_image_folder(tmp_path):
  root = _folder(tmp_path)
  unlisted = sets.image_folder(str(root))  # no class list: sorted folders
  assert unlisted.class_names == ["blue thing", "red thing"] and unlisted.descriptors == {}
  (root / "classes.txt").write_text("red thing\nblue thing\n")
  listed = sets.image_folder(str(root))
  assert listed.class_names == ["red thing", "blue thing"]
  assert [s["label"] for s in listed.source] == [0, 0, 0, 1, 1, 1]
  (root / "classes.txt").write_text("red thing\ngreen thing\n")
  with pytest.raises(FileNotFoundError, match="green thing"):
    sets.image_folder(str(root))


def test_a_folder_s_descriptors_are_read_paired_and_recorded_as_a_registry_set_s(tmp_path):
  root = _folder(tmp_path / "things")
  (root / "classes.txt").write_text("red thing\nblue thing\n")
  plain = datasets.folder_classification(str(root))
  assert plain.name == "things" and plain.alignment == "none" and plain.descriptors is None
  path = root / "descriptors.json"
  path.write_text(json.dumps({"Blue_Thing": ["blue color", "a round shape"], "red thing": []}))
  things = datasets.folder_classification(str(root))
  assert things.data.class_names == ["red thing", "blue thing"] and things.alignment == "name"
  assert things.data.descriptors == {"red thing": [], "blue thing": ["blue color", "a round shape"]}
  assert things.descriptors["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert things.descriptors["empty"] == ["red thing"]
  path.write_text(json.dumps({"blue thing": ["blue color"]}))  # a class without its key: described by its name
  partial = datasets.folder_classification(str(root))
  assert partial.alignment == "partial" and partial.data.descriptors == {"blue thing": ["blue color"]}
  path.write_text("[1, 2]")
  with pytest.raises(BadFileError, match="descriptors.json must be a JSON object"):
    datasets.folder_classification(str(root))


def test_image_batches_pad_and_shard_over_hosts(tmp_path):
  source = sets.image_folder(str(_folder(tmp_path, per_class=5))).source  # 10 images
  seen = []
  for host in range(2):
    batches = list(sets.image_batches(source, 16, batch_size=2, process_index=host, process_count=2))
    assert len(batches) == 3  # 5 images per host, padded to 6
    batch = batches[-1]
    assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["valid"].tolist() == [True, False] and (batch["image"][1] == 0).all()
    seen += [int(i) for b in batches for i, v in zip(b["index"], b["valid"]) if v]
    labels = [int(label) for b in batches for label, v in zip(b["label"], b["valid"]) if v]
    assert labels == [source[i]["label"] for i in seen[-5:]]
  assert sorted(seen) == list(range(10))
  first = next(iter(sets.image_batches(source, 16, 2, 0, 1)))
  np.testing.assert_allclose(first["image"][0], examples.load_image(source[0]["image"], 16))


def test_tfds_classification(tmp_path, tiny_tfds):
  name, tfds_dir = tiny_tfds(["red_square", "blue_circle"], [40 * i for i in range(5)])
  dataset = sets.tfds_classification(name, "test", tfds_dir)
  assert dataset.class_names == ["red square", "blue circle"] and dataset.descriptors == {}
  batch = next(iter(sets.image_batches(dataset.source, 8, 8, 0, 1)))
  assert batch["valid"].tolist() == [True] * 5 + [False] * 3
  # tfds stores examples in its own order: image i (red = 40 i) has label i % 2.
  red = batch["image"][:5, 0, 0, 0] * examples.IMAGENET_STD[0] + examples.IMAGENET_MEAN[0]
  originals = np.round(red * 255 / 40).astype(int)
  assert sorted(originals.tolist()) == [0, 1, 2, 3, 4]
  assert batch["label"][:5].tolist() == (originals % 2).tolist()


def test_tfds_source_adapter():
  label = types.SimpleNamespace(names=["golden_retriever", "tabby_cat"])
  info = types.SimpleNamespace(features={"label": label})

  class FakeSource(list):
    dataset_info = info

  images = np.random.default_rng(0).integers(0, 255, (3, 10, 14, 3), dtype=np.uint8)
  source = FakeSource({"image": images[i], "label": np.int64(i % 2), "id": "x"} for i in range(3))
  dataset = sets.from_tfds_source(source)
  assert dataset.class_names == ["golden retriever", "tabby cat"]
  assert len(dataset.source) == 3 and dataset.source[1]["label"] == 1
  batch = next(iter(sets.image_batches(dataset.source, 8, 4, 0, 1)))
  assert batch["label"].tolist() == [0, 1, 0, 0] and batch["valid"].tolist() == [True] * 3 + [False]
  np.testing.assert_allclose(batch["image"][2], examples.load_image(images[2], 8))
