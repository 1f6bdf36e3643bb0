"""Classification heads: how an image is scored against a class.

A head is a prompt set (which texts stand for a class), an embedding of the image and a rule that
turns their similarities into one score per class. Its name is `<prompts>/<rule>`:

  prompt sets   names         every template with the class name ("a photo of a zorblat.")
                descriptions  every template with the name and one descriptor ("a photo of a zorblat,
                              which has red color"): the paper's texts
                descriptors   the raw descriptors ("red color"), no name, no template
                joined        one text joining the descriptors ("red color, striped pattern, ...")
  rules         global        cosine of the global image embedding with the class vector, the mean
                              of the normalized prompt embeddings (renormalized or not: the protocol)
                region        for each region query the best of the class's prompts, averaged over
                              the queries (the authors' region score)
                best_region   the region query that fits the class's prompts best on average

`mixed/region` and `mixed/best_region` are `alpha * descriptions/global + (1 - alpha) * descriptors/
<rule>` (the authors mix with alpha; the paper reports alpha = 1, the global score alone). Region rules
need region queries, so the plain-CLIP baseline runs the global heads only; every model runs every
head it can, and a comparison pairs the same heads.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PROMPT_SETS = ("names", "descriptions", "descriptors", "joined")
RULES = ("global", "region", "best_region")
# Prompt sets whose single prompts are kept for the region rules (the templated sets are only averaged).
PER_PROMPT_SETS = ("descriptors", "joined")
HEADS = (
  "names/global",
  "descriptions/global",
  "descriptors/global",
  "joined/global",
  "descriptors/region",
  "descriptors/best_region",
  "joined/best_region",
  "mixed/region",
  "mixed/best_region",
)
# The number the paper reports: the global embedding, class names with descriptions.
PAPER_HEAD = "descriptions/global"
_MIXED_GLOBAL = "descriptions/global"


@dataclasses.dataclass
class ClassTexts:
  """The text side of one prompt set for C classes.

  class_vectors: `[C, E]` mean of each class's normalized prompt embeddings (renormalized or not).
  prompt_embeds: `[C, P, E]` each normalized prompt (zero padding), for the region rules; None for
    the templated sets.
  prompt_mask: `[C, P]` bool, True on real prompts; None with `prompt_embeds`.
  """

  class_vectors: np.ndarray
  prompt_embeds: np.ndarray | None = None
  prompt_mask: np.ndarray | None = None


# A pytree, so that jitted functions take it as an argument.
jax.tree_util.register_dataclass(
  ClassTexts, data_fields=["class_vectors", "prompt_embeds", "prompt_mask"], meta_fields=[]
)


def parts(head: str) -> tuple[str, str]:
  """(prompt set, rule) of a head that is not mixed."""
  prompts, _, rule = head.partition("/")
  return prompts, rule


def components(head: str) -> tuple[str, ...]:
  """The unmixed heads `head` is made of: itself, or the global and region heads it mixes."""
  check(head)
  prompts, rule = parts(head)
  return (_MIXED_GLOBAL, f"descriptors/{rule}") if prompts == "mixed" else (head,)


def prompt_sets(heads) -> tuple[str, ...]:
  """The prompt sets the `heads` read, each once, in PROMPT_SETS order."""
  needed = {parts(c)[0] for head in heads for c in components(head)}
  return tuple(p for p in PROMPT_SETS if p in needed)


def needs_regions(head: str) -> bool:
  """Whether `head` reads the region queries (so a model without them cannot run it)."""
  return any(parts(c)[1] != "global" for c in components(head))


def needs_descriptors(head: str) -> bool:
  """Whether `head` reads descriptors (so a set without a descriptor file cannot run it)."""
  return head != "names/global"


def check(head: str) -> None:
  """Raises ValueError unless `head` is one of HEADS."""
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")


def scores(
  head: str, global_embed: jax.Array, region_embed: jax.Array | None, texts: dict[str, ClassTexts], alpha: float
) -> jax.Array:
  """Class scores `[B, C]` of `head`.

  Args:
    head: one of HEADS.
    global_embed: `[B, E]` normalized global image embeddings.
    region_embed: `[B, Q, E]` normalized region-query embeddings, or None (plain CLIP).
    texts: prompt set -> its ClassTexts (at least those `head` reads).
    alpha: weight of the global score in a mixed head.
  """
  if parts(head)[0] == "mixed":
    global_head, region_head = components(head)
    return alpha * scores(global_head, global_embed, region_embed, texts, alpha) + (1 - alpha) * scores(
      region_head, global_embed, region_embed, texts, alpha
    )
  check(head)
  prompts, rule = parts(head)
  text = texts[prompts]
  if rule == "global":
    return global_embed @ jnp.asarray(text.class_vectors).T
  if region_embed is None:
    raise ValueError(f"head {head!r} reads region queries; the plain-CLIP baseline has none")
  similarity = jnp.einsum("bqe,cpe->bqcp", region_embed, jnp.asarray(text.prompt_embeds))
  mask = jnp.asarray(text.prompt_mask)[None, None]
  if rule == "region":
    return jnp.where(mask, similarity, -jnp.inf).max(axis=-1).mean(axis=1)
  per_query = jnp.where(mask, similarity, 0.0).sum(-1) / jnp.maximum(mask.sum(-1), 1)
  return per_query.max(axis=1)
