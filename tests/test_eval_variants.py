"""The authors' protocols of SUN397 and Places365 as entries of config.eval.classification."""

import json
import os

import pytest
from PIL import Image

from grain_jax.config import ConfigError, eval_rules, load_config, recipe, validate
from grain_jax.eval import datasets, sets


def torchvision_places365(root, labels):
  """What torchvision.datasets.Places365(root, split="val", small=False) reads, with a few images."""
  os.makedirs(root / "val_large")
  (root / "categories_places365.txt").write_text("/a/airfield 0\n/b/bakery/shop 1\n/c/church/outdoor 2\n")
  lines = []
  for i, label in enumerate(labels):
    name = f"Places365_val_{i + 1:08d}.jpg"
    Image.new("RGB", (40, 30), (80 * label, 0, 0)).save(root / "val_large" / name)
    lines.append(f"{name} {label}\n")
  (root / "places365_val.txt").write_text("".join(lines))


def test_places365_full_reads_torchvision_download_and_pairs_its_descriptors(tmp_path):
  root = tmp_path / "places365"
  torchvision_places365(root, [2, 0, 1, 1])
  keys = ["airfield", "/b/bakery/shop", "church (outdoor)"]
  (tmp_path / "descriptors_places365.json").write_text(json.dumps({k: [f"a {k} part"] for k in keys}))
  places = datasets.tfds_classification("places365:full", descriptors_dir=str(tmp_path), places365_dir=str(root))
  assert places.name == "places365:full" and places.in_average and places.alignment == "name"
  assert places.data.class_names == ["airfield", "bakery shop", "church outdoor"]
  assert [places.data.source[i]["label"] for i in range(4)] == [2, 0, 1, 1]
  batch = next(iter(sets.image_batches(places.data.source, 16, 4, 0, 1)))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].tolist() == [2, 0, 1, 1]


def test_places365_full_needs_its_download_before_training(tmp_path):
  config = load_config("configs/base.py:tiny")
  config.eval.update(classification=("places365:full",), allow_missing_descriptors=True)
  validate(config)  # the schema alone reads nothing
  with pytest.raises(
    ConfigError,
    match=r"places365_dir='' lacks categories_places365.txt, places365_val.txt, "
    r"val_large: torchvision.datasets.Places365",
  ):
    validate(config, evaluation_files=True)
  torchvision_places365(tmp_path / "places365", [0])
  config.eval.places365_dir = str(tmp_path / "places365")
  validate(config, evaluation_files=True)


def test_sun397_all_joins_the_three_random_splits_into_every_image():
  tfds = pytest.importorskip("tensorflow_datasets")
  spec = datasets.spec_of("sun397:all")
  assert spec.tfds_name == "sun397" and sorted(spec.split.split("+")) == ["test", "train", "validation"]
  listed = set()
  for split in ("tr", "va", "te"):
    with open(tfds.core.tfds_path(f"image_classification/sun397_tfds_{split}.txt")) as f:
      listed |= {line.strip() for line in f if line.strip()}
  # torchvision's SUN397 has 108,754 images; tfds's builder lists 108,753 and skips one of them.
  assert len(listed) == 108_753


def test_variants_are_entries_and_count_as_their_set():
  section = load_config("configs/base.py:tiny").eval
  section.classification = ("sun397:all", "places365:full")
  eval_rules.check_entries(section)
  assert all(datasets.paper_set(entry) in datasets.PAPER_AVERAGE for entry in section.classification)
  section.classification = ("sun397:full",)
  with pytest.raises(ConfigError, match=r"'sun397:full' is not a dataset: .*sun397:all, places365:full"):
    eval_rules.check_entries(section)
  assert set(datasets.AUTHORS_PAPER_SETS) == set(datasets.PAPER_AVERAGE) - {"sun397", "places365"} | set(
    datasets.VARIANTS
  )


@pytest.mark.parametrize("kind", recipe.KINDS)
def test_the_paper_recipes_evaluate_the_authors_sets(kind):
  config = load_config(f"configs/cc12m_b16.py:{kind}")
  assert config.eval.classification == (*datasets.AUTHORS_PAPER_SETS, "imagenet")
