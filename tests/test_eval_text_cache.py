"""The evaluation's text-embedding cache: keyed by the text tower's weights, written atomically, a
damaged entry computed again."""

import logging
import os

import jax
import numpy as np
import pytest
from flax import nnx

from grain_jax.config import load_config
from grain_jax.eval import text_cache, zeroshot
from grain_jax.eval.heads import ClassTexts
from grain_jax.eval.runner import Runner
from grain_jax.models.grain import build_model

CLASSES = ["red circle", "blue square"]
DESCRIPTORS = {"red circle": ["red color"], "blue square": ["has four corners"]}
TEMPLATES = ("a photo of a {}.",)


def tiny_model(seed: int = 0):
  model = build_model(load_config("configs/base.py:tiny").model, seed=seed)
  model.eval()
  return model


@pytest.fixture(scope="module")
def runner():
  return Runner(batch_size=4, text_batch_size=8, context_buckets=(16,))


def embed(model, runner, directory, prompt_set="descriptors", **kwargs):
  cache = text_cache.TextCache(model, ClassTexts, str(directory))
  return zeroshot.class_texts(model, runner, prompt_set, CLASSES, DESCRIPTORS, TEMPLATES, cache=cache, **kwargs)


def forbid_the_text_tower(monkeypatch, runner):
  def fail(*args, **kwargs):
    raise AssertionError("the text tower ran although the embeddings were cached")

  monkeypatch.setattr(runner, "encode_texts", fail)


def test_the_same_weights_read_the_cache_and_other_settings_do_not(runner, tmp_path, monkeypatch):
  model = tiny_model()
  first = embed(model, runner, tmp_path)
  assert [path.suffix for path in tmp_path.iterdir()] == [".npz"]  # no temporary file left
  forbid_the_text_tower(monkeypatch, runner)
  again = embed(tiny_model(), runner, tmp_path)  # the same weights in another model object, from disk
  for field in ("class_vectors", "prompt_embeds", "prompt_mask"):
    np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
  with pytest.raises(AssertionError, match="text tower ran"):
    embed(model, runner, tmp_path, renormalize=False)
  with pytest.raises(AssertionError, match="text tower ran"):
    embed(model, runner, tmp_path, prompt_set="joined")


def test_other_text_weights_at_the_same_step_are_not_served_the_cache(runner, tmp_path):
  """The issue's case: the same checkpoint name (a run started again from step 0), other weights."""
  first = embed(tiny_model(), runner, tmp_path)
  changed = tiny_model()
  noise = np.random.default_rng(0).normal(scale=0.1, size=changed.text.text_projection.shape)
  changed.text.text_projection[...] = changed.text.text_projection[...] + noise
  served = embed(changed, runner, tmp_path)
  fresh = zeroshot.class_texts(changed, runner, "descriptors", CLASSES, DESCRIPTORS, TEMPLATES)
  np.testing.assert_allclose(served.class_vectors, fresh.class_vectors, atol=1e-6)
  assert np.abs(served.class_vectors - first.class_vectors).max() > 1e-3
  assert len(list(tmp_path.glob("*.npz"))) == 2


def test_only_the_text_tower_is_in_the_fingerprint():
  model, other_images = tiny_model(), tiny_model()
  visual = nnx.state(other_images.visual, nnx.Param)
  nnx.update(other_images.visual, jax.tree.map(lambda x: x + 1, visual))
  assert text_cache.fingerprint(model) == text_cache.fingerprint(other_images)
  assert text_cache.fingerprint(model) != text_cache.fingerprint(tiny_model(seed=1))


def test_a_damaged_entry_is_computed_again_with_a_warning(runner, tmp_path, caplog, monkeypatch):
  model = tiny_model()
  first = embed(model, runner, tmp_path)
  [entry] = tmp_path.glob("*.npz")
  entry.write_bytes(entry.read_bytes()[:100])  # truncated, as a full disk or a kill might leave it
  with caplog.at_level(logging.WARNING):
    again = embed(model, runner, tmp_path)
  assert f"the text cache entry {entry} does not read" in caplog.text and "computing it again" in caplog.text
  np.testing.assert_array_equal(again.class_vectors, first.class_vectors)
  forbid_the_text_tower(monkeypatch, runner)
  np.testing.assert_array_equal(embed(model, runner, tmp_path).class_vectors, first.class_vectors)  # rewritten


def test_a_write_cut_short_leaves_no_entry(runner, tmp_path, monkeypatch):
  def crash(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", crash)
  with pytest.raises(OSError, match="No space left"):
    embed(tiny_model(), runner, tmp_path)
  assert not list(tmp_path.glob("*.npz"))
