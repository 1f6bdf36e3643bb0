"""The built-in synthetic dataset: determinism, formats, and eval splits."""

import json
import os

import numpy as np
import pytest

from grain_jax.data import eval_sets
from grain_jax.data import records
from grain_jax.data import synthetic
from grain_jax.data import synthetic_scenes
from grain_jax.defaults import base
from grain_jax.eval import datasets

SMALL = dict(num_train=24, image_size=32, num_attribute_classes=4, num_novel_classes=3,
             images_per_class=2, num_retrieval=5, num_grounding=5)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  return out, synthetic.generate(out, **SMALL)


def test_config_defaults_match_the_module():
  assert base.get_config("tiny").data.synthetic.to_dict() == synthetic.default_params()


def test_deterministic_from_seed():
  first = list(synthetic.train_records(seed=3, count=6, image_size=32))
  assert first == list(synthetic.train_records(seed=3, count=6, image_size=32))
  assert first[:4] == list(synthetic.train_records(seed=3, count=4, image_size=32))
  assert first != list(synthetic.train_records(seed=4, count=6, image_size=32))


def test_train_records(generated):
  _, paths = generated
  train = list(records.read_records(paths["train"]))
  assert len(train) == SMALL["num_train"]
  for record in train:
    assert record.caption and record.mllm_caption and 0 <= len(record.regions) <= 4
    for region in record.regions:
      assert region.description in record.mllm_caption  # one description per object
      x1, y1, x2, y2 = region.box
      assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and 0.3 <= region.score < 1


def test_image_folder_splits(generated):
  _, paths = generated
  attributes = datasets.folder_classification(paths["attributes"]).data
  assert len(attributes.class_names) == SMALL["num_attribute_classes"]
  assert len(attributes.source) == SMALL["num_attribute_classes"] * SMALL["images_per_class"]
  pattern, color, shape = attributes.class_names[0].split()
  assert attributes.descriptors[attributes.class_names[0]] == [
      f"{color} color", f"{pattern} pattern", f"{shape} shape"]
  novel = datasets.folder_classification(paths["novel"]).data
  assert len(novel.class_names) == SMALL["num_novel_classes"]
  vocabulary = " ".join(synthetic_scenes.SHAPES + synthetic_scenes.PATTERNS
                        + tuple(synthetic_scenes.COLORS) + tuple(synthetic_scenes.SIZES))
  train_text = " ".join(f"{r.caption} {r.mllm_caption}" for r in
                        synthetic.train_records(seed=0, count=200, image_size=8))
  for name in novel.class_names:
    assert name not in vocabulary and name not in train_text  # known only by descriptors
    assert set(novel.descriptors[name]) <= {
        f"{word} {kind}" for word in vocabulary.split() for kind in ("color", "pattern", "shape")}


def test_retrieval_and_grounding_splits(generated):
  _, paths = generated
  retrieval = eval_sets.karpathy(os.path.join(paths["retrieval"], "captions.json"),
                                 paths["retrieval"])
  assert len(retrieval.source) == SMALL["num_retrieval"]
  assert len(retrieval.captions) == 2 * SMALL["num_retrieval"]
  expected = np.repeat(np.arange(SMALL["num_retrieval"]), 2)
  np.testing.assert_array_equal(retrieval.caption_image, expected)
  assert all(os.path.exists(s["image"]) for s in retrieval.source)
  grounding = eval_sets.grounding(os.path.join(paths["grounding"], "grounding.json"))
  assert len(grounding.source) == SMALL["num_grounding"]
  for phrases, boxes in zip(grounding.phrases, grounding.boxes):
    assert boxes.shape == (len(phrases), 4) and len(set(phrases)) == len(phrases)
    assert ((boxes[:, 2:] > 0) & (boxes[:, :2] < 1)).all()


def test_ensure_reuses_matching_data(generated):
  out, paths = generated
  stamp = os.path.getmtime(os.path.join(paths["train"], records.MANIFEST))
  assert synthetic.ensure(out, **SMALL) == paths
  assert os.path.getmtime(os.path.join(paths["train"], records.MANIFEST)) == stamp
  with open(os.path.join(out, synthetic.PARAMS)) as f:
    assert json.load(f)["num_train"] == SMALL["num_train"]
  with pytest.raises(ValueError, match="unknown synthetic dataset parameters"):
    synthetic.generate(out, num_trian=3)
