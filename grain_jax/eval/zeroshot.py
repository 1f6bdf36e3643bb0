"""Zero-shot classification with descriptions ("classify by description", as GRAIN evaluates).

Each prompt set of the heads asked for (grain_jax/eval/heads.py) is encoded once per class list,
the images once per set, and every head scores them (see `heads` for the prompt sets and rules).
Without descriptors only "names/global" runs: classic CLIP zero-shot.
"""

import collections
import functools
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from grain_jax.eval import heads as heads_lib
from grain_jax.eval import prompts
from grain_jax.eval.heads import ClassTexts
from grain_jax.eval.runner import Runner, eval_copy, image_embeddings, load_images
from grain_jax.eval.text_cache import TextCache
from grain_jax.ops.normalize import l2_normalize


def _prompts_of(
  prompt_set: str, name: str, described: Sequence[str] | None, template_set: Sequence[str], whole_words: bool
) -> list[str]:
  """The texts of class `name` in `prompt_set`; a class without descriptors is described by its name."""
  if prompt_set == "names":
    return prompts.class_texts(name, template_set)
  if prompt_set == "descriptions":
    return prompts.class_texts(name, template_set, described, whole_words)
  descriptors = list(described or [name])
  return descriptors if prompt_set == "descriptors" else [", ".join(descriptors)]


def class_texts(
  model,
  runner: Runner,
  prompt_set: str,
  class_names: Sequence[str],
  descriptors: Mapping[str, Sequence[str]] | None = None,
  template_set: Sequence[str] = prompts.CLIP_TEMPLATES,
  *,
  renormalize: bool = True,
  whole_words: bool = False,
  cache: TextCache | None = None,
) -> ClassTexts:
  """The ClassTexts of one prompt set (heads.PROMPT_SETS) for `class_names`.

  Args:
    model, runner: the model and where it runs.
    prompt_set: "names", "descriptions", "descriptors" or "joined".
    class_names: the C classes.
    descriptors: {class name: [descriptor, ...]}; needed by every set but "names".
    template_set: the templates of "names" and "descriptions".
    renormalize: re-normalize each class vector (the mean of its normalized prompt embeddings).
    whole_words: pick each descriptor's connective by its first word (see prompts.connective).
    cache: where class texts of the same weights are kept.
  """
  descriptors = dict(descriptors or {})
  templated = prompt_set in ("names", "descriptions")
  key = (
    cache.key(
      prompt_set, list(class_names), descriptors, list(template_set) if templated else [], renormalize, whole_words
    )
    if cache
    else ""
  )
  cached = cache.get(key) if cache else None
  if cached is not None:
    return cached
  per_class = [_prompts_of(prompt_set, name, descriptors.get(name), template_set, whole_words) for name in class_names]
  owner = np.repeat(np.arange(len(class_names)), [len(texts) for texts in per_class])
  texts = [text for class_prompts in per_class for text in class_prompts]
  if prompt_set in heads_lib.PER_PROMPT_SETS:
    flat = runner.encode_texts(model, texts)
    width = max(len(class_prompts) for class_prompts in per_class)
    embeds = np.zeros((len(class_names), width, flat.shape[1]), np.float32)
    mask = np.arange(width)[None] < np.bincount(owner, minlength=len(class_names))[:, None]
    embeds[mask] = flat
    sums, result = embeds.sum(axis=1), ClassTexts(np.empty(0), embeds, mask)
  else:
    sums, result = runner.encode_texts(model, texts, owner, len(class_names)), ClassTexts(np.empty(0))
  vectors = sums / np.bincount(owner, minlength=len(class_names))[:, None]
  if renormalize:
    vectors = np.asarray(l2_normalize(vectors))
  result.class_vectors = vectors.astype(np.float32)
  if cache:
    cache.put(key, result)
  return result


@functools.partial(nnx.jit, static_argnames=("heads", "alpha", "top_k"))
def _top_classes(
  model, images, texts: dict[str, ClassTexts], heads: tuple[str, ...], alpha: float, top_k: int
) -> dict[str, jax.Array]:
  """The `top_k` classes `[b, top_k]` of each head."""
  embeds = image_embeddings(model, images)
  return {
    head: jax.lax.top_k(heads_lib.scores(head, embeds["global"], embeds.get("region"), texts, alpha), top_k)[1]
    for head in heads
  }


@functools.partial(nnx.jit, static_argnames=("head", "alpha"))
def _all_scores(model, images, texts: dict[str, ClassTexts], head: str, alpha: float) -> dict[str, jax.Array]:
  embeds = image_embeddings(model, images)
  return {"scores": heads_lib.scores(head, embeds["global"], embeds.get("region"), texts, alpha)}


def texts_for_heads(
  model,
  runner: Runner,
  heads: Sequence[str],
  class_names: Sequence[str],
  descriptors: Mapping[str, Sequence[str]] | None,
  template_set: Sequence[str],
  **options,
) -> dict[str, ClassTexts]:
  """Prompt set -> ClassTexts for every prompt set the `heads` read (`options`: see class_texts)."""
  return {
    prompt_set: class_texts(model, runner, prompt_set, class_names, descriptors, template_set, **options)
    for prompt_set in heads_lib.prompt_sets(heads)
  }


def classify(
  model,
  images,
  class_names: Sequence[str],
  descriptors: Mapping[str, Sequence[str]] | None = None,
  *,
  template_set: str = "clip",
  head: str = "names/global",
  alpha: float = 0.5,
  renormalize: bool = True,
  runner: Runner | None = None,
) -> np.ndarray:
  """Zero-shot class scores of a few images.

  Args:
    model: a GrainModel (run with dropout off).
    images: preprocessed `[n, H, W, 3]` float32 (ImageNet-normalized, as `examples.load_image`
      makes), or a list of image files / encoded bytes / uint8 arrays.
    class_names: the C classes.
    descriptors: {class name: [descriptor, ...]} (Menon & Vondrick format); every head but
      "names/global" reads them.
    template_set: "clip", "birds" or "photo" (grain_jax/eval/prompts.py).
    head: one of grain_jax.eval.heads.HEADS, e.g. "descriptions/global" (the paper's); region heads
      need a GRAIN model.
    alpha: weight of the global score in a mixed head.
    renormalize: re-normalize each class vector.
    runner: where to run (default: the default device).

  Returns:
    `[n, C]` scores; the predicted class of image i is `class_names[argmax(scores[i])]`.
  """
  heads_lib.check(head)
  if heads_lib.needs_descriptors(head) and not descriptors:
    raise ValueError(f"head {head!r} reads descriptors: pass descriptors")
  runner, model = runner or Runner(), eval_copy(model)
  texts = texts_for_heads(
    model, runner, (head,), class_names, descriptors, prompts.templates(template_set), renormalize=renormalize
  )
  return runner.map_image_array(_all_scores, model, load_images(model, images), texts, head, alpha)["scores"]


def metrics(top: np.ndarray, labels: np.ndarray, class_names: Sequence[str], num_confusions: int = 10) -> dict:
  """Top-1 / top-5 accuracy (in %), per-class accuracy and the most frequent confusions.

  Args:
    top: `[N, k]` predicted classes, best first.
    labels: `[N]` true classes.
    class_names: the C classes, for naming.
    num_confusions: how many (true, predicted) pairs to list.
  """
  correct = top[:, 0] == labels
  counts = np.bincount(labels, minlength=len(class_names))
  hits = np.bincount(labels, weights=correct, minlength=len(class_names))
  seen = counts > 0
  accuracy = 100 * hits[seen] / counts[seen]
  pairs = collections.Counter((int(t), int(p)) for t, p in zip(labels, top[:, 0]) if t != p)
  return {
    "top1": 100 * float(correct.mean()),
    "top5": 100 * float((top[:, :5] == labels[:, None]).any(axis=1).mean()),
    "mean_per_class": float(accuracy.mean()),
    "num_examples": int(len(labels)),
    "per_class": dict(zip(np.asarray(class_names)[seen].tolist(), accuracy.tolist())),
    "confusions": [
      {"true": class_names[t], "predicted": class_names[p], "count": n}
      for (t, p), n in pairs.most_common(num_confusions)
    ],
  }


def evaluate(
  model,
  runner: Runner,
  source,
  image_size: int,
  texts: dict[str, ClassTexts],
  heads: Sequence[str],
  class_names: Sequence[str],
  alpha: float = 0.5,
  num_confusions: int = 10,
) -> dict[str, dict]:
  """Metrics of every head over a labelled source (`{"image", "label"}` elements); the images are
  encoded once. `texts` holds the prompt sets the heads read (`texts_for_heads`)."""
  top_k = min(5, len(class_names))
  outputs = runner.map_images(_top_classes, model, source, image_size, texts, tuple(heads), alpha, top_k)
  labels = outputs["label"]
  return {head: metrics(outputs[head], labels, class_names, num_confusions) for head in heads}
