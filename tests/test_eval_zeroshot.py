"""The Python API on a tiny model: class embeddings, classify() and ground()."""

import numpy as np
import pytest
from flax import nnx

from grain_jax.config import load_config
from grain_jax.data import examples
from grain_jax.eval import grounding, heads, prompts, zeroshot
from grain_jax.eval.runner import Runner
from grain_jax.models.grain import build_model
from grain_jax.ops.normalize import l2_normalize

CLASSES = ["red circle", "blue square", "striped triangle"]
DESCRIPTORS = {
  "red circle": ["red color", "a round shape"],
  "blue square": ["has four corners"],
  "striped triangle": ["stripes", "three corners", "a pointed top"],
}
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


@pytest.fixture(scope="module")
def model():
  config = load_config("configs/base.py:tiny")
  model = build_model(config.model, seed=0)
  model.eval()
  return model


@pytest.fixture(scope="module")
def runner():
  return Runner(batch_size=4, text_batch_size=8, context_buckets=(16,))


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 255, (24, 40, 3), dtype=np.uint8) for _ in range(5)]


@nnx.jit
def _encode_text(model, ids):
  return l2_normalize(model.encode_text(ids))


@pytest.fixture(scope="module")
def image_outputs(model, images):
  """The model's own outputs on `images`, computed directly (normalized embeddings)."""
  outputs = nnx.jit(lambda m, x: m.encode_image(x))(model, np.stack([examples.load_image(i, 32) for i in images]))
  return l2_normalize(outputs.global_embed), l2_normalize(outputs.region_embed), outputs.boxes[-1]


def _text(model, texts):
  """Reference text embeddings, one compile: always 16 rows of 16 tokens."""
  ids = np.zeros((16, 16), np.int32)
  ids[: len(texts)] = examples.tokenize(texts)[:, :16]
  return np.asarray(_encode_text(model, ids))[: len(texts)]


def test_class_vectors_are_means_of_prompt_embeddings_per_prompt_set(model, runner):
  text = zeroshot.class_texts(model, runner, "descriptions", CLASSES, DESCRIPTORS, TEMPLATES)
  raw = zeroshot.class_texts(model, runner, "descriptions", CLASSES, DESCRIPTORS, TEMPLATES, renormalize=False)
  descriptors = zeroshot.class_texts(model, runner, "descriptors", CLASSES, DESCRIPTORS, TEMPLATES, renormalize=False)
  joined = zeroshot.class_texts(model, runner, "joined", CLASSES, DESCRIPTORS, TEMPLATES)
  for label, name in enumerate(CLASSES):
    mean = _text(model, prompts.class_texts(name, TEMPLATES, DESCRIPTORS[name])).mean(axis=0)
    np.testing.assert_allclose(raw.class_vectors[label], mean, atol=1e-5)
    np.testing.assert_allclose(text.class_vectors[label], mean / np.linalg.norm(mean), atol=1e-5)
    described = len(DESCRIPTORS[name])
    np.testing.assert_allclose(descriptors.prompt_embeds[label, :described], _text(model, DESCRIPTORS[name]), atol=1e-5)
    np.testing.assert_allclose(
      descriptors.class_vectors[label], _text(model, DESCRIPTORS[name]).mean(axis=0), atol=1e-5
    )
    assert descriptors.prompt_mask[label].tolist() == [i < described for i in range(3)]
    np.testing.assert_allclose(
      joined.prompt_embeds[label, 0], _text(model, [", ".join(DESCRIPTORS[name])])[0], atol=1e-5
    )
  assert text.prompt_embeds is None and joined.prompt_mask.all()
  assert (np.linalg.norm(raw.class_vectors, axis=1) < 1 - 1e-3).all()
  names_only = zeroshot.class_texts(model, runner, "names", CLASSES, None, TEMPLATES)
  np.testing.assert_allclose(
    names_only.class_vectors[0],
    l2_normalize(_text(model, [t.format(CLASSES[0]) for t in TEMPLATES]).mean(axis=0)),
    atol=1e-5,
  )


def test_classify_equals_scoring_by_hand(model, runner, images, image_outputs):
  global_embed, region_embed, _ = image_outputs
  scores = zeroshot.classify(
    model, images, CLASSES, DESCRIPTORS, template_set="photo", head="mixed/region", alpha=0.3, runner=runner
  )
  texts = zeroshot.texts_for_heads(model, runner, ("mixed/region",), CLASSES, DESCRIPTORS, prompts.templates("photo"))
  assert scores.shape == (5, 3)
  np.testing.assert_allclose(scores, heads.scores("mixed/region", global_embed, region_embed, texts, 0.3), atol=1e-5)
  batch = np.stack([examples.load_image(image, 32) for image in images])
  names_only = zeroshot.classify(model, batch, CLASSES, template_set="photo", runner=runner)
  names = {"names": zeroshot.class_texts(model, runner, "names", CLASSES, None, prompts.templates("photo"))}
  np.testing.assert_allclose(names_only, heads.scores("names/global", global_embed, None, names, 0.5), atol=1e-5)
  with pytest.raises(ValueError, match="reads descriptors"):
    zeroshot.classify(model, batch, CLASSES, head="joined/global", runner=runner)


def test_ground_picks_the_most_similar_query(model, runner, images, image_outputs, tmp_path):
  phrases = ["a red circle", "a blue square on the left"]
  placed = grounding.ground(model, images[0], phrases, runner=runner, picture=str(tmp_path / "ground.png"))
  assert (tmp_path / "ground.png").exists()
  _, region_embed, boxes = image_outputs
  similarity = _text(model, phrases) @ np.asarray(region_embed[0]).T
  for result, phrase, row in zip(placed, phrases, similarity):
    assert result["phrase"] == phrase and result["query"] == int(row.argmax())
    assert result["score"] == pytest.approx(float(row.max()), abs=1e-5)
    np.testing.assert_allclose(result["box"], np.asarray(boxes[0, result["query"]]), atol=1e-5)


def test_ground_refuses_the_clip_baseline(images):
  config = load_config("configs/base.py:tiny")
  config.model.kind = "clip"
  clip = nnx.eval_shape(lambda: build_model(config.model, seed=0))
  with pytest.raises(ValueError, match="plain-CLIP baseline"):
    grounding.ground(clip, images[0], ["a red circle"])
