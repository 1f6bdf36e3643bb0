"""Image-text retrieval: Recall@K both ways, with several captions per image (Karpathy splits).

image -> text: an image counts as found at K when any of its captions ranks in the top K.
text -> image: a caption counts when its image ranks in the top K. Ranks count the candidates
scoring strictly higher, so ties are resolved in the query's favour. `Retrieval` is the evaluation
kind: one set per `config.eval.retrieval` entry.
"""

from collections.abc import Sequence

import numpy as np

from grain_jax.eval import datasets, sets
from grain_jax.eval.evaluator import Compared, Context, Evaluator, Row
from grain_jax.eval.runner import Runner, Subset, embed_images, model_image_size, spread

RECALL_AT = (1, 5, 10)


def ranks(
  image_embeds: np.ndarray, text_embeds: np.ndarray, text_image: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
  """Rank (0 = best) of the right answer for every query, both ways.

  Args:
    image_embeds: `[I, E]` normalized.
    text_embeds: `[T, E]` normalized.
    text_image: `[T]` int, the image of each text.
    chunk: queries scored at once (bounds memory at chunk x max(I, T) floats).

  Returns:
    image_ranks `[I]` (best rank among each image's texts; images without texts get T) and
    text_ranks `[T]`.
  """
  image_ranks = np.full(len(image_embeds), len(text_embeds), np.int64)
  for start in range(0, len(image_embeds), chunk):
    similarity = image_embeds[start : start + chunk] @ text_embeds.T  # [i, T]
    rows = text_image - start
    own = np.flatnonzero((rows >= 0) & (rows < len(similarity)))
    # An image's best rank is the rank of its best-scoring own text.
    best_own = np.full(len(similarity), -np.inf, np.float32)
    np.maximum.at(best_own, rows[own], similarity[rows[own], own])
    has_text = np.isfinite(best_own)
    image_ranks[start : start + len(similarity)][has_text] = (similarity[has_text] > best_own[has_text, None]).sum(
      axis=1
    )
  text_ranks = np.empty(len(text_embeds), np.int64)
  for start in range(0, len(text_embeds), chunk):
    similarity = text_embeds[start : start + chunk] @ image_embeds.T  # [t, I]
    own_scores = similarity[np.arange(len(similarity)), text_image[start : start + chunk]]
    text_ranks[start : start + chunk] = (similarity > own_scores[:, None]).sum(axis=1)
  return image_ranks, text_ranks


def recalls(image_ranks: np.ndarray, text_ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict:
  """{"image_to_text": {"R@1": %, ...}, "text_to_image": {...}, "mean_recall": %}."""
  result = {
    "image_to_text": {f"R@{k}": 100 * float((image_ranks < k).mean()) for k in ks},
    "text_to_image": {f"R@{k}": 100 * float((text_ranks < k).mean()) for k in ks},
  }
  result["mean_recall"] = float(np.mean([v for d in result.values() for v in d.values()]))
  result["num_images"], result["num_texts"] = int(len(image_ranks)), int(len(text_ranks))
  return result


def subset(data: sets.RetrievalSet, keep: np.ndarray) -> sets.RetrievalSet:
  """The images `keep` of a retrieval set with their captions (images renumbered)."""
  new_index = np.full(len(data.source), -1, np.int32)
  new_index[keep] = np.arange(len(keep))
  captions = [(c, new_index[i]) for c, i in zip(data.captions, data.caption_image) if new_index[i] >= 0]
  return sets.RetrievalSet(
    Subset(data.source, keep), [c for c, _ in captions], np.array([i for _, i in captions], np.int32)
  )


class Retrieval(Evaluator):
  """Recall@1/5/10 both ways over one retrieval set."""

  section = "retrieval"

  @staticmethod
  def entries(eval_config) -> tuple[str, ...]:
    return tuple(eval_config.retrieval)

  def __init__(self, entry: str, context: Context):
    self.name, data = datasets.retrieval(entry, context.config, context.workdir)
    self.data = subset(data, spread(len(data.source), context.config.eval.max_examples))

  def run(self, model, runner: Runner) -> dict:
    """`recalls` of the set's images and captions."""
    image_embeds = runner.map_images(embed_images, model, self.data.source, model_image_size(model))["global"]
    text_embeds = runner.encode_texts(model, self.data.captions)
    return recalls(*ranks(image_embeds, text_embeds, np.asarray(self.data.caption_image)))

  @staticmethod
  def table_rows(results: dict) -> list[Row]:
    return [
      Row(name, f"{short} R@1/5/10", "/".join(f"{v:.1f}" for v in r[direction].values()))
      for name, r in results["retrieval"].items()
      for direction, short in (("image_to_text", "i->t"), ("text_to_image", "t->i"))
    ]

  @staticmethod
  def compared(results: dict) -> list[Compared]:
    """R@1 both ways (no skill: one image in N)."""
    return [
      Compared(f"{name} {label} R@1", r[direction]["R@1"], 100 / r["num_images"])
      for name, r in results["retrieval"].items()
      for direction, label in (("image_to_text", "image->text"), ("text_to_image", "text->image"))
    ]
