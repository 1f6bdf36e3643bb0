"""Record -> example: image preprocessing, caption choice, top-k regions, text ids."""

import numpy as np
import pytest

from conftest import png_bytes
from grain_jax.data import examples, quality, records, tokenizer


def _record(regions=(), caption="alt text", mllm="rich caption") -> records.Record:
  return records.Record("k", png_bytes(), caption, mllm, tuple(regions))


def test_load_image_squashes_and_normalizes(tmp_path):
  image = examples.load_image(png_bytes(40, 20, (255, 0, 0)), 16)
  assert image.shape == (16, 16, 3) and image.dtype == np.float32
  expected = (np.array([1.0, 0.0, 0.0]) - examples.IMAGENET_MEAN) / examples.IMAGENET_STD
  np.testing.assert_allclose(image[8, 8], expected, atol=1e-5)
  path = tmp_path / "a.png"
  path.write_bytes(png_bytes())
  np.testing.assert_allclose(examples.load_image(str(path), 16), examples.load_image(png_bytes(), 16))
  gray = examples.load_image(np.full((5, 7), 255, np.uint8), 16)
  np.testing.assert_allclose(gray[0, 0], (1 - examples.IMAGENET_MEAN) / examples.IMAGENET_STD, atol=1e-5)


@pytest.mark.parametrize(
  "image, reason",
  [
    (b"not an image", quality.CORRUPT_IMAGE),
    (png_bytes()[:40], quality.CORRUPT_IMAGE),
    ("/nonexistent/image.png", quality.MISSING_IMAGE),
  ],
)
def test_load_image_bad(image, reason):
  with pytest.raises(quality.BadRecordError) as error:
    examples.load_image(image, 16)
  assert error.value.reason == reason


def test_xyxy_to_cxcywh():
  np.testing.assert_allclose(
    examples.xyxy_to_cxcywh(np.array([[0.1, 0.2, 0.5, 0.8]])), [[0.3, 0.5, 0.4, 0.6]], atol=1e-7
  )


def test_text_ids_equal_iff_normalized_text_equal():
  ids = examples.text_ids(examples.tokenize(["a Red  square", "a red square", "a red square.", "a blue square"]))
  assert ids.dtype == np.int32 and (ids >= 0).all()
  assert ids[0] == ids[1] and len({ids[1], ids[2], ids[3]}) == 3
  # Stable across runs and hosts: a fixed digest, not Python's salted hash().
  assert examples.text_ids(examples.tokenize(["a red square"]))[0] == ids[1]


def test_make_example_top_k_padding_and_boxes():
  regions = [records.Region(f"thing {i}", (0.1, 0.1, 0.2 + 0.1 * i, 0.5), 0.1 * i) for i in range(7)]
  regions.append(records.Region("thing 6", (0.0, 0.0, 1.0, 1.0), 0.65))  # duplicate text
  example, fixes = examples.make_example(_record(regions), np.random.default_rng(0), 32, 5)
  assert fixes == []
  assert example["image"].shape == (32, 32, 3)
  assert example["box_valid"].tolist() == [True] * 5
  # Top-5 by score: the duplicate-text region (0.65), then regions 6, 5, 4, 3.
  np.testing.assert_allclose(example["boxes"][0], [0.5, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(example["boxes"][1], examples.xyxy_to_cxcywh(regions[6].box))
  assert example["desc_text_id"][0] == example["desc_text_id"][1]
  assert len(set(example["desc_text_id"][1:].tolist())) == 4
  np.testing.assert_array_equal(example["desc_ids"][2], tokenizer.tokenize("thing 5")[0])

  example, fixes = examples.make_example(_record(regions[:2]), np.random.default_rng(0), 32, 5)
  assert example["box_valid"].tolist() == [True, True, False, False, False]
  assert (example["boxes"][2:] == 0).all() and (example["desc_ids"][2:] == 0).all()
  assert (example["desc_text_id"][2:] == examples.NO_TEXT_ID).all()
  assert {k: (v.shape, v.dtype) for k, v in example.items()} == {
    "image": ((32, 32, 3), np.float32),
    "caption_ids": ((77,), np.int32),
    "boxes": ((5, 4), np.float32),
    "box_valid": ((5,), np.bool_),
    "desc_ids": ((5, 77), np.int32),
    "desc_text_id": ((5,), np.int32),
  }


def test_no_regions_is_kept():
  example, fixes = examples.make_example(_record(), np.random.default_rng(0), 16, 3)
  assert fixes == [quality.NO_REGIONS] and not example["box_valid"].any()


def test_caption_choice():
  def caption(record, seed, prob):
    return examples.choose_caption(record, np.random.default_rng(seed), prob)

  assert caption(_record(), 0, 0.0) == ("alt text", [])
  assert caption(_record(), 0, 1.0) == ("rich caption", [])
  assert caption(_record(mllm=""), 0, 1.0) == ("alt text", [])
  assert caption(_record(caption=" "), 0, 0.0) == ("rich caption", [quality.CAPTION_FROM_MLLM])
  with pytest.raises(quality.BadRecordError, match=quality.EMPTY_CAPTION):
    caption(_record(caption="", mllm=""), 0, 0.5)
  picks = [caption(_record(), seed, 0.5)[0] for seed in range(200)]
  assert 60 < picks.count("rich caption") < 140


def test_prepare_reports_skips():
  assert examples.prepare(b"garbage", np.random.default_rng(0), image_size=16, num_regions=2) == (
    None,
    [quality.UNREADABLE_RECORD],
  )
  bad_image = records.serialize(records.Record("k", b"xx", "c"))
  assert examples.prepare(bad_image, np.random.default_rng(0), image_size=16, num_regions=2) == (
    None,
    [quality.CORRUPT_IMAGE],
  )
