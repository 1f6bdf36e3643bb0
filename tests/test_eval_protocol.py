"""The authors' protocol: zero-shot predictions on a folder set equal, image by image, a numpy rewrite
of the authors' evaluation (their 46 templates, each class the plain mean of its normalized prompt
embeddings, not renormalized, the global score alone)."""

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from grain_jax.config import load_config, validate
from grain_jax.data import examples
from grain_jax.eval import prompts, protocol, run, zeroshot
from grain_jax.eval.runner import Runner
from grain_jax.models.grain import build_model

DESCRIPTORS = {
  "red circle": ["red color", "a round shape", "used as a sign"],
  "blue square": ["has four corners", "blue color"],
  "green cross": ["often green", "two crossing bars"],
}


def _authors_text(template: str, name: str, descriptor: str) -> str:
  """The authors' prompt: their template (ending in ",") with the class name, then the descriptor
  joined by raw-prefix rules."""
  if descriptor.startswith(("a", "an", "used")):
    joint = " which is "
  elif descriptor.startswith(("has", "often", "typically", "may", "can")):
    joint = " which "
  else:
    joint = " which has "
  return template.format(name) + joint + descriptor


@nnx.jit
def _embed_image(model, images):
  return model.encode_image(images).global_embed


@nnx.jit
def _embed_text(model, ids):
  return model.encode_text(ids)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for name in DESCRIPTORS:
    (root / name).mkdir()
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
  (root / "descriptors.json").write_text(json.dumps(DESCRIPTORS))
  return root


def test_authors_protocol_predictions_equal_a_numpy_rewrite_of_their_evaluation(folder, tmp_path):
  config = load_config("configs/base.py:tiny")
  config.eval.update(
    protocol="authors",
    classification=(f"folder:{folder}",),
    retrieval=(),
    grounding=(),
    probes=(),
    batch_size=4,
    text_batch_size=64,
  )
  validate(config)
  model = build_model(config.model, seed=3)
  model.eval()
  settings = protocol.settings(config.eval)
  assert (settings["templates"], settings["renormalize"], settings["alpha"]) == ("birds", False, 1.0)
  assert len(prompts.BIRD_TEMPLATES) == 46

  classes = sorted(DESCRIPTORS)  # the folder's classes, in its sorted order
  files = [folder / name / f"{i}.png" for name in classes for i in range(3)]
  labels = np.repeat(np.arange(3), 3)
  images = np.stack([examples.load_image(str(f), 32) for f in files])
  image_embeds = np.asarray(_embed_image(model, images), np.float64)
  image_embeds /= np.linalg.norm(image_embeds, axis=1, keepdims=True)
  class_vectors = []
  for name in classes:
    texts = [_authors_text(t, name, d) for d in DESCRIPTORS[name] for t in prompts.BIRD_TEMPLATES]
    embeds = np.asarray(_embed_text(model, examples.tokenize(texts)), np.float64)
    class_vectors.append((embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).mean(axis=0))  # no renorm
  expected = (image_embeds @ np.array(class_vectors).T).argmax(axis=1)

  scores = zeroshot.classify(
    model,
    [str(f) for f in files],
    classes,
    DESCRIPTORS,
    template_set=settings["templates"],
    head="descriptions/global",
    renormalize=settings["renormalize"],
    runner=Runner(batch_size=4, text_batch_size=64),
  )
  np.testing.assert_array_equal(scores.argmax(axis=1), expected)
  np.testing.assert_allclose(scores, image_embeds @ np.array(class_vectors).T, atol=1e-4)  # not renormalized

  results = run.run_evaluation(config, model, str(tmp_path))
  paper = results["classification"][folder.name]["heads"]["descriptions/global"]
  assert paper["top1"] == pytest.approx(100 * np.mean(expected == labels))
  assert paper["per_class"] == pytest.approx(
    {name: 100 * np.mean(expected[labels == c] == c) for c, name in enumerate(classes)}
  )
  assert list(results["classification"][folder.name]["heads"]) == list(settings["heads"])
  assert results["settings"]["protocol"] == "authors" and results["settings"]["departures"] == {}
