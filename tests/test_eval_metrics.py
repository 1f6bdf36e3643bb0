"""Eval metrics, scoring and dataset resolution, without a model.

The tfds path runs on a tiny dataset that the test builds with tfds itself (array_record, no
network); the registry's real datasets cannot be downloaded here.
"""

import json
import types

import numpy as np
import pytest
from PIL import Image

from conftest import unit_rows
from grain_jax.eval import datasets, grounding, pictures, retrieval, sets, zeroshot
from grain_jax.ops import localization


def test_retrieval_ranks_equal_a_full_sort():
  rng = np.random.default_rng(0)
  images, texts = unit_rows(rng, 7, 8), unit_rows(rng, 17, 8)
  text_image = np.concatenate([np.arange(7), np.arange(7), [0, 3, 5]])
  image_ranks, text_ranks = retrieval.ranks(images, texts, text_image, chunk=3)
  similarity = images @ texts.T
  for i in range(7):
    order = list(np.argsort(-similarity[i]))
    assert image_ranks[i] == min(order.index(t) for t in np.flatnonzero(text_image == i))
  for t in range(17):
    assert text_ranks[t] == list(np.argsort(-similarity[:, t])).index(text_image[t])
  result = retrieval.recalls(image_ranks, text_ranks)
  assert result["image_to_text"]["R@1"] == pytest.approx(100 * np.mean(image_ranks == 0))
  assert result["text_to_image"]["R@5"] == pytest.approx(100 * np.mean(text_ranks < 5))
  assert result["num_images"] == 7 and result["num_texts"] == 17


def test_classification_metrics():
  top = np.array([[0, 1], [1, 0], [2, 0], [0, 2], [0, 1]])
  labels = np.array([0, 0, 2, 2, 1])
  m = zeroshot.metrics(top, labels, ["a", "b", "c"], num_confusions=2)
  assert m["top1"] == pytest.approx(40) and m["top5"] == pytest.approx(100)
  assert m["per_class"] == {"a": 50, "b": 0, "c": 50} and m["mean_per_class"] == pytest.approx(100 / 3)
  assert m["confusions"][0] in (
    {"true": "a", "predicted": "b", "count": 1},
    {"true": "c", "predicted": "a", "count": 1},
  )
  assert len(m["confusions"]) == 2 and m["num_examples"] == 5


def test_readable_tfds_labels():
  assert datasets.readable("/a/airport_terminal") == "airport terminal"
  assert datasets.readable("/c/church/indoor") == "church indoor"
  assert datasets.readable("apple_pie") == "apple pie"
  assert datasets.readable("AM General Hummer SUV 2000") == "AM General Hummer SUV 2000"


def test_shipped_class_lists_are_in_label_order():
  cifar10, cifar100 = datasets.class_list("cifar10.txt"), datasets.class_list("cifar100.txt")
  assert cifar10[:3] == ["airplane", "automobile", "bird"] and len(cifar10) == 10
  # CIFAR-100's fine labels are numbered alphabetically by their underscored names.
  assert len(set(cifar100)) == 100 and cifar100 == sorted(cifar100, key=lambda n: n.replace(" ", "_"))
  source = _fake_tfds_source([str(i) for i in range(10)])  # unprepared tfds: ids only
  assert datasets.tfds_classification("cifar10", source=source).data.class_names == cifar10
  with pytest.raises(ValueError, match="cifar100.txt has 100 classes"):
    datasets.tfds_classification("cifar100", source=source)


def test_registry_has_the_papers_eleven_and_imagenet():
  assert set(datasets.PAPER_AVERAGE) == {
    "cifar10",
    "cifar100",
    "sun397",
    "cars",
    "dtd",
    "pets",
    "caltech101",
    "flowers102",
    "cub",
    "places365",
    "food101",
  }
  assert datasets.TFDS_DATASETS["imagenet"].tfds_name == "imagenet2012"
  assert datasets.TFDS_DATASETS["imagenet"].split == "validation"


def _fake_tfds_source(names):
  info = types.SimpleNamespace(features={"label": types.SimpleNamespace(names=names)})

  class FakeSource(list):
    dataset_info = info

  pixels = np.zeros((6, 5, 3), np.uint8)
  return FakeSource({"image": pixels, "label": np.int64(i % len(names))} for i in range(4))


def test_tfds_classification_names_and_descriptors(tmp_path):
  source = _fake_tfds_source(["apple_pie", "baby_back_ribs"])
  plain = datasets.tfds_classification("food101", source=source)
  assert plain.data.class_names == ["apple pie", "baby back ribs"] and plain.alignment == "none"
  assert plain.data.source[1]["label"] == 1 and plain.in_average
  (tmp_path / "descriptors_food101.json").write_text(
    json.dumps({"baby back ribs": ["a glaze"], "apple pie": ["a crust"]})
  )
  described = datasets.tfds_classification("food101", descriptors_dir=str(tmp_path), source=source)
  assert described.alignment == "name" and described.data.descriptors["apple pie"] == ["a crust"]
  ids = _fake_tfds_source(["0", "1"])  # CUB's tfds labels are numbers
  (tmp_path / "descriptors_cub.json").write_text(json.dumps({"Laysan Albatross": ["a"], "Sooty Albatross": ["b"]}))
  cub = datasets.tfds_classification("cub", descriptors_dir=str(tmp_path), source=ids)
  assert cub.alignment == "position" and cub.data.class_names == ["Laysan Albatross", "Sooty Albatross"]


def test_a_prepared_tfds_dataset_reads_through_the_registry(tmp_path, monkeypatch, tiny_tfds):
  name, tfds_dir = tiny_tfds(["/t/tabby_cat", "golden_retriever"], [0, 100, 200])
  monkeypatch.setitem(datasets.TFDS_DATASETS, "tiny", datasets.TfdsDataset(name, "test", "descriptors_tiny.json"))
  (tmp_path / "descriptors_tiny.json").write_text(
    json.dumps({"tabby cat": ["stripes"], "golden retriever": ["golden fur"]})
  )
  tiny = datasets.tfds_classification("tiny", tfds_dir, str(tmp_path))
  assert tiny.data.class_names == ["tabby cat", "golden retriever"] and tiny.alignment == "name"
  batch = next(iter(sets.image_batches(tiny.data.source, 16, 4, 0, 1)))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["valid"].tolist() == [True] * 3 + [False]
  red = (batch["image"][:3, 0, 0, 0] * 0.229 + 0.485) * 255  # example i is red 100 * i, label i % 2
  assert sorted(np.round(red / 100).astype(int).tolist()) == [0, 1, 2]
  assert batch["label"][:3].tolist() == [int(i) % 2 for i in np.round(red / 100)]


def test_grounding_assignment_iou_and_picture(tmp_path):
  phrases = np.eye(3, 4, dtype=np.float32)
  regions = np.eye(4, dtype=np.float32)[[2, 0, 1, 3]]  # query 1 holds phrase 0's direction
  query, similarity = grounding.assign(phrases, regions)
  assert query.tolist() == [1, 2, 0] and np.allclose(similarity, phrases @ regions.T)
  per_phrase, _ = grounding.assign(phrases, np.stack([regions, regions[::-1], regions]))
  assert per_phrase.tolist() == [1, 1, 0]  # phrase 1 against the reversed queries
  boxes = np.array([[0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]], np.float32)
  np.testing.assert_allclose(grounding.box_iou(boxes, boxes[[0, 0]]), [1.0, 0.0], atol=1e-6)
  image = np.full((20, 30, 3), 90, np.uint8)
  path = pictures.draw(image, boxes, ["a red square", "a blue circle"], str(tmp_path / "p" / "g.png"), size=64)
  picture = np.asarray(Image.open(path))
  assert picture.shape == (64, 64, 3) and (picture != 90).any()
  # With the truth: two panels (true boxes, predicted), a title strip above them.
  path = pictures.draw(
    image,
    boxes,
    ["a red square", "a blue circle"],
    str(tmp_path / "p" / "g2.png"),
    true_boxes=boxes[::-1],
    other_boxes=boxes[:1],
    size=64,
  )
  picture = np.asarray(Image.open(path))
  assert picture.shape == (64 + 16, 2 * 64 + 8, 3)
  truth, predicted = picture[16:, :64], picture[16:, 72:]
  assert (truth != predicted).any()  # the boxes differ between the panels


def test_image_blind_boxes_score_exactly_the_fixed_box_baseline():
  """A decoder that ignores the image (the fitted fixed boxes on every image) has conditioning
  ratio 0 and the baseline's recalls; one whose boxes follow the objects has neither."""
  rng = np.random.default_rng(0)
  centres = rng.uniform(0.25, 0.75, (6, 2))

  def scenes(count):
    which = rng.integers(0, 6, count)
    sizes = rng.uniform(0.15, 0.4, (count, 2))
    return np.concatenate([centres[which] + rng.normal(0, 0.05, (count, 2)), sizes], -1).astype(np.float32)

  train, true = scenes(400), scenes(90)
  phrase_image = np.repeat(np.arange(30), 3)  # 30 images, 3 phrases each
  fitted = localization.fit_fixed_boxes(train, 5, 0.5)
  baseline = grounding.fixed_box_baseline(fitted, true, 0.5)
  fixed = np.broadcast_to(fitted, (30, 5, 4))
  # Greedy coverage picks the best single box first: query 0 is the one-box baseline.
  blind = grounding.box_metrics(fixed, phrase_image, np.zeros(90, int), true, 0.5, fitted)
  assert blind["conditioning_ratio"] == pytest.approx(0.0, abs=1e-5)
  assert blind["any_query_recall"] == pytest.approx(baseline["best_of_k_recall"])
  assert blind["recall"] == pytest.approx(baseline["single_box_recall"])
  assert blind["fixed_box_baseline"] == baseline
  assert 0 < baseline["single_box_recall"] < baseline["best_of_k_recall"] < 100

  following = rng.uniform(0.2, 0.8, (30, 5, 4)).astype(np.float32)
  following[:, :3] = true.reshape(30, 3, 4)  # each phrase's object under queries 0-2
  seeing = grounding.box_metrics(following, phrase_image, np.tile(np.arange(3), 30), true)
  assert seeing["recall"] == seeing["any_query_recall"] == seeing["query_choice_accuracy"] == 100
  assert seeing["mean_iou"] == pytest.approx(1.0) and seeing["conditioning_ratio"] > 0.5
