"""The built-in synthetic dataset: determinism, formats, and eval splits."""

import json
import os

import numpy as np
import pytest

from grain_jax.config import base
from grain_jax.data import records, synthetic, synthetic_scenes
from grain_jax.eval import datasets, sets

SMALL = dict(
  num_train=24,
  image_size=32,
  num_attribute_classes=4,
  num_novel_classes=3,
  images_per_class=2,
  num_retrieval=5,
  num_grounding=5,
)


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
  assert attributes.descriptors[attributes.class_names[0]] == [f"{color} color", f"{pattern} pattern", f"{shape} shape"]
  novel = datasets.folder_classification(paths["novel"]).data
  assert len(novel.class_names) == SMALL["num_novel_classes"]
  vocabulary = " ".join(
    synthetic_scenes.SHAPES + synthetic_scenes.PATTERNS + tuple(synthetic_scenes.COLORS) + tuple(synthetic_scenes.SIZES)
  )
  train_text = " ".join(
    f"{r.caption} {r.mllm_caption}" for r in synthetic.train_records(seed=0, count=200, image_size=8)
  )
  for name in novel.class_names:
    assert name not in vocabulary and name not in train_text  # known only by descriptors
    assert set(novel.descriptors[name]) <= {
      f"{word} {kind}" for word in vocabulary.split() for kind in ("color", "pattern", "shape")
    }


def test_retrieval_and_grounding_splits(generated):
  _, paths = generated
  retrieval = sets.karpathy(os.path.join(paths["retrieval"], "captions.json"), paths["retrieval"])
  assert len(retrieval.source) == SMALL["num_retrieval"]
  assert len(retrieval.captions) == 2 * SMALL["num_retrieval"]
  expected = np.repeat(np.arange(SMALL["num_retrieval"]), 2)
  np.testing.assert_array_equal(retrieval.caption_image, expected)
  assert all(os.path.exists(s["image"]) for s in retrieval.source)
  grounding = sets.grounding(os.path.join(paths["grounding"], "grounding.json"))
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


@pytest.mark.parametrize(
  "object_share, attribute_share", [(1.0, 1.0), (0.5, 0.25), (1.0, 0.5), (0.34, 0.75), (0.0, 1.0)]
)
def test_captions_name_the_stated_share_of_objects_and_attributes(object_share, attribute_share):
  rng = np.random.default_rng(5)
  for _ in range(40):
    things = synthetic_scenes.sample_scene(rng, int(rng.integers(1, 5)))
    caption = synthetic_scenes.rich_caption(things, rng, object_share, attribute_share)
    assert caption.endswith(" on a gray background")
    body = caption[: -len(" on a gray background")]
    mentions = [] if body == "some shapes" else body.replace(" and ", ", ").split(", ")
    assert len(mentions) == int(np.ceil(object_share * len(things)))
    expected_words = int(np.ceil(attribute_share * 4))
    for mention in mentions:
      words = mention.split()[1:]  # after the article
      # What it is (its shape) is named first of all; "shape" stands in when nothing is named.
      assert len(words) - (words[-1] == "shape") == expected_words, mention
      assert words[-1] in synthetic_scenes.SHAPES or (words[-1] == "shape" and expected_words == 0), mention
      named = {a for a in synthetic_scenes.ATTRIBUTES if any(getattr(t, a) in words for t in things)}
      assert any(synthetic_scenes.mention(t, named) == mention for t in things), mention


def test_default_captions_are_the_full_descriptions_and_regions_cover_every_found_object():
  for record in synthetic.train_records(seed=2, count=30, image_size=16, caption_objects=0.5, caption_attributes=0.25):
    described = [r.description for r in record.regions]
    assert all(len(d.split()) == 5 for d in described)  # "a <size> <pattern> <color> <shape>"
  rng = np.random.default_rng(6)
  things = synthetic_scenes.sample_scene(rng, 3)
  caption = synthetic_scenes.rich_caption(things, np.random.default_rng(1))
  assert sorted(caption[: -len(" on a gray background")].replace(" and ", ", ").split(", ")) == sorted(
    t.description for t in things
  )
  with pytest.raises(ValueError, match="caption_objects=1.5 must be a share"):
    synthetic.generate("/nonexistent", caption_objects=1.5)
