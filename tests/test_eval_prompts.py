"""Prompt templates and the reference's descriptor connectives."""

import pytest

from grain_jax.eval import prompts


@pytest.mark.parametrize(
  "descriptor, expected",
  [
    ("a red beak", " which is a red beak"),
    ("an orange tail", " which is an orange tail"),
    ("used for cutting", " which is used for cutting"),
    ("has webbed feet", " which has webbed feet"),
    ("often found near water", " which often found near water"),
    ("typically brown", " which typically brown"),
    ("may have spots", " which may have spots"),
    ("can fly", " which can fly"),
    ("black feathers", " which has black feathers"),
    # The reference compares raw prefixes: these are its quirks, kept for parity.
    ("antennae", " which is antennae"),
    ("canine teeth", " which canine teeth"),
  ],
)
def test_connectives_are_the_reference_s(descriptor, expected):
  assert prompts.connective(descriptor) == expected


def test_whole_word_connectives_fix_the_prefix_quirks():
  assert prompts.connective("antennae", whole_words=True) == " which has antennae"
  assert prompts.connective("canine teeth", whole_words=True) == " which has canine teeth"
  assert prompts.connective("an orange tail", whole_words=True) == " which is an orange tail"
  assert prompts.connective("can fly", whole_words=True) == " which can fly"


def test_class_texts_pair_every_descriptor_with_every_template():
  templates = ("a photo of a {}.", "itap of my {},", "art of {}")
  assert prompts.class_texts("cat", templates) == ["a photo of a cat.", "itap of my cat,", "art of cat"]
  texts = prompts.class_texts("cat", templates, ["whiskers", "a tail"])
  assert texts == [
    "a photo of a cat, which has whiskers",
    "itap of my cat, which has whiskers",
    "art of cat, which has whiskers",
    "a photo of a cat, which is a tail",
    "itap of my cat, which is a tail",
    "art of cat, which is a tail",
  ]


def test_bird_templates_give_the_reference_texts_exactly():
  for template in prompts.BIRD_TEMPLATES:
    (text,) = prompts.class_texts("hooded oriole", (template,), ["has a black throat"])
    assert text == template.format("hooded oriole") + " which has a black throat"


def test_template_sets():
  assert len(set(prompts.CLIP_TEMPLATES)) == 80 and len(set(prompts.BIRD_TEMPLATES)) == 46
  for template in prompts.CLIP_TEMPLATES + prompts.BIRD_TEMPLATES:
    assert template.count("{}") == 1 and template.endswith((".", ","))
  assert not any("bird" in t for t in prompts.CLIP_TEMPLATES)  # dataset-neutral
  assert prompts.templates("photo") == ("a photo of a {}.",)
  with pytest.raises(ValueError, match="unknown template set 'cars'"):
    prompts.templates("cars")
