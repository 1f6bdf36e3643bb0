"""Zero-shot classification with descriptions ("classify by description", as GRAIN evaluates).

A class vector is the mean of the normalized embeddings of its prompts (templates x descriptors,
see grain_jax/data/prompts.py), re-normalized (the reference skips that: `renormalize=False`).
An image is scored against every class by

  global:      cosine(global image embedding, class vector);
  region:      for each region query the best of the class's descriptors (raw descriptor texts, no
               template), averaged over the queries (the reference's region score);
  mixed:       alpha * global + (1 - alpha) * region;
  best_region: the region query that best fits all of the class's descriptors (mean over them),
               i.e. the one object that has every described attribute;
  best_mixed:  alpha * global + (1 - alpha) * best_region.

Without descriptors ("names" prompts) this is classic CLIP zero-shot.
"""

import collections
import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from grain_jax.data import prompts
from grain_jax.eval.runner import Runner, eval_copy, image_embeddings, load_images
from grain_jax.train import workdir_files

SCORES = ("global", "region", "mixed", "best_region", "best_mixed")


@dataclasses.dataclass
class ClassEmbeddings:
  """The text side of a classifier.

  class_vectors: `[C, E]` one vector per class.
  descriptor_embeds: `[C, D, E]` normalized raw descriptors (zero padding), or None (names only).
  descriptor_mask: `[C, D]` bool, True on real descriptors, or None.
  """
  class_vectors: np.ndarray
  descriptor_embeds: np.ndarray | None = None
  descriptor_mask: np.ndarray | None = None


# A pytree, so that jitted functions take it as an argument.
jax.tree_util.register_dataclass(ClassEmbeddings, data_fields=["class_vectors", "descriptor_embeds",
                                                               "descriptor_mask"], meta_fields=[])


class TextCache:
  """Class embeddings of one checkpoint, kept per (class list, descriptors, prompts).

  In memory always; also as .npz files under `directory` when one is given, so evaluating the
  same checkpoint again skips the text tower. `checkpoint_id` must change whenever the weights do.
  """

  def __init__(self, checkpoint_id: str, directory: str = ""):
    self._checkpoint_id, self._directory = checkpoint_id, directory
    self._memory: dict[str, ClassEmbeddings] = {}

  def key(self, *parts) -> str:
    text = json.dumps([self._checkpoint_id, *parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]

  def _path(self, key: str) -> str:
    return os.path.join(self._directory, f"{key}.npz")

  def get(self, key: str) -> ClassEmbeddings | None:
    if key not in self._memory and self._directory and self._on_every_host(workdir_files.exists(self._path(key))):
      with np.load(io.BytesIO(workdir_files.read_bytes(self._path(key)))) as stored:
        self._memory[key] = ClassEmbeddings(**{k: stored[k] for k in stored.files})
    return self._memory.get(key)

  @staticmethod
  def _on_every_host(found: bool) -> bool:
    # Hosts must agree: one that skipped the text tower would leave the others' collectives hanging.
    if jax.process_count() == 1:
      return found
    return bool(multihost_utils.process_allgather(np.array(found)).all())

  def put(self, key: str, value: ClassEmbeddings) -> None:
    self._memory[key] = value
    if self._directory and jax.process_index() == 0:
      arrays = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None}
      stored = io.BytesIO()
      np.savez(stored, **arrays)
      workdir_files.replace_durably(self._path(key), stored.getvalue())


def class_embeddings(model, runner: Runner, class_names: Sequence[str],
                     descriptors: Mapping[str, Sequence[str]] | None = None,
                     template_set: Sequence[str] = prompts.CLIP_TEMPLATES, *, renormalize: bool = True,
                     whole_words: bool = False, cache: TextCache | None = None) -> ClassEmbeddings:
  """Class vectors from prompts; with `descriptors`, also the per-class descriptor embeddings.

  A class missing from `descriptors` is prompted by name only and described by its name.
  """
  descriptors = dict(descriptors or {})
  key = cache.key(list(class_names), descriptors, list(template_set), renormalize, whole_words) if cache else ""
  cached = cache.get(key) if cache else None
  if cached is not None:
    return cached
  texts, owner = [], []
  for label, name in enumerate(class_names):
    prompts_of_class = prompts.class_texts(name, template_set, descriptors.get(name), whole_words)
    texts += prompts_of_class
    owner += [label] * len(prompts_of_class)
  sums = runner.encode_texts(model, texts, np.array(owner), len(class_names))
  vectors = sums / np.bincount(owner, minlength=len(class_names))[:, None]
  if renormalize:
    vectors /= np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
  result = ClassEmbeddings(vectors.astype(np.float32))
  if descriptors:
    described = [list(descriptors.get(name) or [name]) for name in class_names]
    width = max(len(d) for d in described)
    flat = runner.encode_texts(model, [d for ds in described for d in ds])
    embeds = np.zeros((len(class_names), width, flat.shape[1]), np.float32)
    mask = np.zeros((len(class_names), width), bool)
    offsets = np.cumsum([0] + [len(d) for d in described])
    for label, ds in enumerate(described):
      embeds[label, :len(ds)] = flat[offsets[label]:offsets[label + 1]]
      mask[label, :len(ds)] = True
    result = ClassEmbeddings(result.class_vectors, embeds, mask)
  if cache:
    cache.put(key, result)
  return result


def scores(global_embed: jax.Array, region_embed: jax.Array | None, text: ClassEmbeddings,
           score: str = "global", alpha: float = 0.5) -> jax.Array:
  """Class scores `[B, C]` from normalized `global_embed [B, E]` and `region_embed [B, Q, E]`."""
  if score not in SCORES:
    raise ValueError(f"score={score!r} must be one of {SCORES}")
  global_scores = global_embed @ jnp.asarray(text.class_vectors).T
  if score == "global":
    return global_scores
  if region_embed is None or text.descriptor_embeds is None:
    raise ValueError(f"score={score!r} needs region embeddings (a GRAIN model) and descriptors")
  similarity = jnp.einsum("bqe,cde->bqcd", region_embed, jnp.asarray(text.descriptor_embeds))
  mask = jnp.asarray(text.descriptor_mask)[None, None]
  if score.startswith("best"):
    per_query = jnp.where(mask, similarity, 0.0).sum(-1) / jnp.maximum(mask.sum(-1), 1)
    region_scores = per_query.max(axis=1)
  else:
    region_scores = jnp.where(mask, similarity, -jnp.inf).max(axis=-1).mean(axis=1)
  if score in ("region", "best_region"):
    return region_scores
  return alpha * global_scores + (1 - alpha) * region_scores


@functools.partial(nnx.jit, static_argnames=("heads", "alpha", "top_k"))
def _top_classes(model, images, texts: tuple[ClassEmbeddings, ...], heads: tuple[str, ...],
                 alpha: float, top_k: int) -> dict[str, jax.Array]:
  """The `top_k` classes `[b, top_k]` of each head (a score mode over one ClassEmbeddings)."""
  embeds = image_embeddings(model, images)
  return {head: jax.lax.top_k(scores(embeds["global"], embeds.get("region"), text, head.split("/")[-1], alpha),
                              top_k)[1]
          for head, text in zip(heads, texts)}


@functools.partial(nnx.jit, static_argnames=("score", "alpha"))
def _all_scores(model, images, text: ClassEmbeddings, score: str, alpha: float) -> dict[str, jax.Array]:
  embeds = image_embeddings(model, images)
  return {"scores": scores(embeds["global"], embeds.get("region"), text, score, alpha)}


def classify(model, images, class_names: Sequence[str],
             descriptors: Mapping[str, Sequence[str]] | None = None, *, template_set: str = "clip",
             score: str = "global", alpha: float = 0.5, renormalize: bool = True,
             runner: Runner | None = None) -> np.ndarray:
  """Zero-shot class scores of a few images.

  Args:
    model: a GrainModel (run with dropout off).
    images: preprocessed `[n, H, W, 3]` float32 (ImageNet-normalized, as `examples.load_image`
      makes), or a list of image files / encoded bytes / uint8 arrays.
    class_names: the C classes.
    descriptors: {class name: [descriptor, ...]} (Menon & Vondrick format); None = names only.
    template_set: "clip", "birds" or "photo" (grain_jax/data/prompts.py).
    score: "global", "region" or "mixed" (region and mixed need descriptors and a GRAIN model).
    alpha: weight of the global score in "mixed".
    renormalize: re-normalize the mean of each class's prompt embeddings.
    runner: where to run (default: the default device).

  Returns:
    `[n, C]` scores; the predicted class of image i is `class_names[argmax(scores[i])]`.
  """
  runner, model = runner or Runner(), eval_copy(model)
  text = class_embeddings(model, runner, class_names, descriptors, prompts.templates(template_set),
                          renormalize=renormalize)
  return runner.map_image_array(_all_scores, model, load_images(model, images), text, score, alpha)["scores"]


def metrics(top: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            num_confusions: int = 10) -> dict:
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
      "confusions": [{"true": class_names[t], "predicted": class_names[p], "count": n}
                     for (t, p), n in pairs.most_common(num_confusions)],
  }


def evaluate(model, runner: Runner, source, image_size: int, heads: Mapping[str, ClassEmbeddings],
             class_names: Sequence[str], alpha: float = 0.5, num_confusions: int = 10) -> dict[str, dict]:
  """Metrics of every head over a labelled source (`{"image", "label"}` elements).

  `heads` maps a name ending in "/global", "/region" or "/mixed" (the score mode), e.g.
  "names/global" or "descriptions/mixed", to its class embeddings; the images are encoded once.
  """
  names = tuple(heads)
  top_k = min(5, len(class_names))
  outputs = runner.map_images(_top_classes, model, source, image_size,
                              tuple(heads[n] for n in names), names, alpha, top_k)
  labels = outputs["label"]
  return {name: metrics(outputs[name], labels, class_names, num_confusions) for name in names}
