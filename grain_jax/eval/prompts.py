"""Zero-shot prompts: template sets and the descriptor connectives of "classify by description".

A class is described by texts `template.format(class_name) + connective(descriptor)`, e.g.
"a photo of a hooded oriole, which has a black throat". Templates end with "." or ","; before a
descriptor a final "." becomes "," so that the sentence goes on (the reference's bird templates
already end with ",", so their texts are exactly the reference's).
"""

from collections.abc import Sequence

# OpenAI CLIP's 80 ImageNet prompts: generic photo / rendering variations, no dataset words.
CLIP_TEMPLATES = (
  "a bad photo of a {}.",
  "a photo of many {}.",
  "a sculpture of a {}.",
  "a photo of the hard to see {}.",
  "a low resolution photo of the {}.",
  "a rendering of a {}.",
  "graffiti of a {}.",
  "a bad photo of the {}.",
  "a cropped photo of the {}.",
  "a tattoo of a {}.",
  "the embroidered {}.",
  "a photo of a hard to see {}.",
  "a bright photo of a {}.",
  "a photo of a clean {}.",
  "a photo of a dirty {}.",
  "a dark photo of the {}.",
  "a drawing of a {}.",
  "a photo of my {}.",
  "the plastic {}.",
  "a photo of the cool {}.",
  "a close-up photo of a {}.",
  "a black and white photo of the {}.",
  "a painting of the {}.",
  "a painting of a {}.",
  "a pixelated photo of the {}.",
  "a sculpture of the {}.",
  "a bright photo of the {}.",
  "a cropped photo of a {}.",
  "a plastic {}.",
  "a photo of the dirty {}.",
  "a jpeg corrupted photo of a {}.",
  "a blurry photo of the {}.",
  "a photo of the {}.",
  "a good photo of the {}.",
  "a rendering of the {}.",
  "a {} in a video game.",
  "a photo of one {}.",
  "a doodle of a {}.",
  "a close-up photo of the {}.",
  "a photo of a {}.",
  "the origami {}.",
  "the {} in a video game.",
  "a sketch of a {}.",
  "a doodle of the {}.",
  "a origami {}.",
  "a low resolution photo of a {}.",
  "the toy {}.",
  "a rendition of the {}.",
  "a photo of the clean {}.",
  "a photo of a large {}.",
  "a rendition of a {}.",
  "a photo of a nice {}.",
  "a photo of a weird {}.",
  "a blurry photo of a {}.",
  "a cartoon {}.",
  "art of a {}.",
  "a sketch of the {}.",
  "a embroidered {}.",
  "a pixelated photo of a {}.",
  "itap of the {}.",
  "a jpeg corrupted photo of the {}.",
  "a good photo of a {}.",
  "a plushie {}.",
  "a photo of the nice {}.",
  "a photo of the small {}.",
  "a photo of the weird {}.",
  "the cartoon {}.",
  "art of the {}.",
  "a drawing of the {}.",
  "a photo of the large {}.",
  "a black and white photo of a {}.",
  "the plushie {}.",
  "a dark photo of a {}.",
  "itap of a {}.",
  "graffiti of the {}.",
  "a toy {}.",
  "itap of my {}.",
  "a photo of a cool {}.",
  "a photo of a small {}.",
  "a tattoo of the {}.",
)

# The 46 templates the GRAIN reference evaluates with on every dataset (written for CUB: about
# half say "a type of bird"). For parity runs.
BIRD_TEMPLATES = (
  "a bad photo of a {},",
  "a photo of many {},",
  "a photo of the hard to see {},",
  "a low resolution photo of the {}, a type of bird,",
  "a rendering of a {},",
  "a bad photo of the {}, a type of bird,",
  "a cropped photo of the {}, a type of bird,",
  "a photo of a hard to see {},",
  "a bright photo of a {},",
  "a photo of a clean {},",
  "a photo of a dirty {},",
  "a drawing of a {},",
  "a photo of my {}, a type of bird,",
  "a photo of the cool {},",
  "a close-up photo of a {},",
  "a black and white photo of the {}, a type of bird,",
  "a painting of the {}, a type of bird,",
  "a painting of a {}, a type of bird,",
  "a bright photo of the {}, a type of bird,",
  "a cropped photo of a {},",
  "a plastic {}, a type of bird,",
  "a photo of the dirty {},",
  "a jpeg corrupted photo of a {}, a type of bird,",
  "a blurry photo of the {}, a type of bird,",
  "a photo of the {}, a type of bird,",
  "a good photo of the {}, a type of bird,",
  "a rendering of the {}, a type of bird,",
  "a {} in a video game, a type of bird,",
  "a photo of one {}, a type of bird,",
  "a close-up photo of the {}, a type of bird,",
  "a photo of a {}, a type of bird,",
  "a low resolution photo of a {}, a type of bird,",
  "a rendition of the {}, a type of bird,",
  "a photo of the clean {}, a type of bird,",
  "a rendition of a {},",
  "a photo of a nice {},",
  "a photo of a weird {},",
  "a blurry photo of a {},",
  "a good photo of a {},",
  "a plushie {}, a type of bird,",
  "a photo of the nice {},",
  "a photo of the weird {},",
  "a photo of the large {},",
  "a toy {}, a type of bird,",
  "itap of my {},",
  "a photo of a cool {},",
)

TEMPLATE_SETS = {
  "clip": CLIP_TEMPLATES,
  "birds": BIRD_TEMPLATES,
  "photo": ("a photo of a {}.",),  # one prompt: fast, for tests and quick looks
}

# Descriptor openings joined with " which d" ("which has a red beak"); "a"/"an"/"used" take
# " which is d"; anything else " which has d".
_VERB_OPENINGS = ("has", "often", "typically", "may", "can")
_IS_OPENINGS = ("a", "an", "used")


def templates(name: str) -> tuple[str, ...]:
  """The template set called `name` ("clip", "birds" or "photo")."""
  if name not in TEMPLATE_SETS:
    raise ValueError(f"unknown template set {name!r}; choose one of {sorted(TEMPLATE_SETS)}")
  return TEMPLATE_SETS[name]


def connective(descriptor: str, whole_words: bool = False) -> str:
  """ " which is d" / " which d" / " which has d" for descriptor d.

  The reference tests raw string prefixes, so "antennae" counts as starting with "a" and
  "canine teeth" with "can"; that is the default, for parity with its numbers. `whole_words`
  compares the first word instead.
  """
  head = descriptor.split(" ", 1)[0] if whole_words else descriptor
  matches = (lambda w: head == w) if whole_words else head.startswith
  if any(matches(w) for w in _IS_OPENINGS):
    return f" which is {descriptor}"
  if any(matches(w) for w in _VERB_OPENINGS):
    return f" which {descriptor}"
  return f" which has {descriptor}"


def class_texts(
  class_name: str, template_set: Sequence[str], descriptors: Sequence[str] | None = None, whole_words: bool = False
) -> list[str]:
  """Every prompt of one class: one per template, or one per (descriptor, template) pair."""
  names = [t.format(class_name) for t in template_set]
  if not descriptors:
    return names
  opened = [n[:-1] + "," if n.endswith(".") else n if n.endswith(",") else n + "," for n in names]
  return [text + connective(d, whole_words) for d in descriptors for text in opened]
