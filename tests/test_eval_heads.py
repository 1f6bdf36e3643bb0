"""Every classification head against a plain numpy rewrite, loop by loop; the protocols' settings."""

import ml_collections
import numpy as np
import pytest

from conftest import unit_rows
from grain_jax.config import ConfigError, eval_rules
from grain_jax.eval import heads, protocol
from grain_jax.eval.heads import ClassTexts


def _per_prompt(rng, classes, width, counts):
  embeds = np.zeros((classes, width, 6), np.float32)
  mask = np.arange(width)[None] < np.array(counts)[:, None]
  embeds[mask] = unit_rows(rng, int(mask.sum()), 6)
  return ClassTexts(embeds.sum(1) / mask.sum(1, keepdims=True), embeds, mask)


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(3)
  texts = {
    "names": ClassTexts(unit_rows(rng, 4, 6)),
    "descriptions": ClassTexts(unit_rows(rng, 4, 6)),
    "descriptors": _per_prompt(rng, 4, 3, [3, 1, 2, 3]),
    "joined": _per_prompt(rng, 4, 1, [1] * 4),
  }
  return unit_rows(rng, 5, 6), unit_rows(rng, 5, 4, 6), texts


def _reference(head, global_embed, region_embed, texts, alpha):
  """One image and one class at a time, the definitions of heads.py written out."""
  prompts, rule = head.split("/")
  if prompts == "mixed":
    return alpha * _reference("descriptions/global", global_embed, region_embed, texts, alpha) + (
      1 - alpha
    ) * _reference(f"descriptors/{rule}", global_embed, region_embed, texts, alpha)
  text = texts[prompts]
  out = np.zeros((len(global_embed), len(text.class_vectors)))
  for b in range(len(global_embed)):
    for c in range(len(text.class_vectors)):
      if rule == "global":
        out[b, c] = global_embed[b] @ text.class_vectors[c]
        continue
      own = text.prompt_embeds[c][text.prompt_mask[c]]  # [P_c, E]
      per_query = region_embed[b] @ own.T  # [Q, P_c]
      out[b, c] = per_query.max(1).mean() if rule == "region" else per_query.mean(1).max()
  return out


@pytest.mark.parametrize("head", heads.HEADS)
def test_every_head_equals_its_numpy_definition(case, head):
  global_embed, region_embed, texts = case
  np.testing.assert_allclose(
    heads.scores(head, global_embed, region_embed, texts, 0.3),
    _reference(head, global_embed, region_embed, texts, 0.3),
    atol=1e-5,
  )


def test_region_heads_need_region_queries_and_heads_are_classified(case):
  global_embed, _, texts = case
  with pytest.raises(ValueError, match="plain-CLIP baseline has none"):
    heads.scores("descriptors/region", global_embed, None, texts, 0.5)
  assert [h for h in heads.HEADS if not heads.needs_regions(h)] == [
    "names/global",
    "descriptions/global",
    "descriptors/global",
    "joined/global",
  ]
  assert heads.prompt_sets(["mixed/best_region"]) == ("descriptions", "descriptors")
  assert heads.components("mixed/region") == ("descriptions/global", "descriptors/region")
  with pytest.raises(ValueError, match="unknown head 'descriptions/region'"):
    heads.check("descriptions/region")


def _eval_section(**fields):
  section = ml_collections.ConfigDict(dict(protocol="ours", templates=None, renormalize=None, heads=None, alpha=None))
  section.update(fields)
  return section


def test_a_protocol_fills_what_the_config_leaves_open_and_names_departures():
  authors = protocol.settings(_eval_section(protocol="authors"))
  assert authors["templates"] == "birds" and authors["renormalize"] is False and authors["alpha"] == 1.0
  assert heads.PAPER_HEAD in authors["heads"] and authors["departures"] == {}
  changed = protocol.settings(_eval_section(protocol="authors", templates="clip", renormalize=False))
  assert changed["templates"] == "clip" and changed["departures"] == {"templates": "clip"}
  assert protocol.settings(_eval_section())["heads"] == heads.HEADS
  with pytest.raises(ConfigError, match="config.eval.protocol='paper' must be one of"):
    eval_rules.check_settings(_eval_section(protocol="paper"))
  with pytest.raises(ConfigError, match="config.eval.heads: unknown head 'names/region'"):
    eval_rules.check_settings(_eval_section(heads=("names/region",)))
  with pytest.raises(ConfigError, match=r"config.eval.alpha=1.5 must be in \[0, 1\]"):
    eval_rules.check_settings(_eval_section(alpha=1.5))
