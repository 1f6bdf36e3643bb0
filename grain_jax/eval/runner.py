"""Running the model over eval data on any mesh: host batches in, host numpy arrays out.

Every evaluation goes through `Runner`: images are sharded over the mesh's batch axes (each host
feeds its own slice), texts are split over the same axes (every host holds all of them), and
results are gathered back to every host in source order. The last batch is padded and the padded
rows are dropped before any metric sees them, so a mesh gives the numbers of one device.
"""

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from grain_jax import sharding
from grain_jax.data import examples
from grain_jax.eval import sets
from grain_jax.models.text import truncate_to_bucket
from grain_jax.ops.normalize import l2_normalize


def model_image_size(model) -> int:
  """The side of the square images `model` reads (patch size x patches per side)."""
  return model.visual.patch_size * math.isqrt(model.visual.pos_embed.shape[1] - 1)


def eval_copy(model):
  """`model` in eval mode (dropout off), sharing its parameter arrays; `model` itself is unchanged."""
  copy = nnx.merge(*nnx.split(model))
  copy.eval()
  return copy


def load_images(model, images) -> np.ndarray:
  """Preprocessed `[n, H, W, 3]` float32 for `model`, from such an array or a list of images.

  List elements are image files, encoded bytes or uint8 arrays (see `examples.load_image`).
  """
  if isinstance(images, np.ndarray) and images.dtype == np.float32 and images.ndim == 4:
    return images
  return np.stack([examples.load_image(image, model_image_size(model)) for image in images])


@nnx.jit
def _encode_text(model, ids: jax.Array) -> jax.Array:
  return l2_normalize(model.encode_text(ids))


def image_embeddings(model, images: jax.Array) -> dict[str, jax.Array]:
  """Normalized embeddings of a batch of images, and boxes (`embed_images` is it jitted).

  `images [b, H, W, 3]` -> "global" `[b, E]`; for a GRAIN model also "region" `[b, Q, E]` and the
  last decoder layer's "boxes" `[b, Q, 4]` (cxcywh).
  """
  outputs = model.encode_image(images)
  embeddings = {"global": l2_normalize(outputs.global_embed)}
  if outputs.region_embed is not None:
    embeddings.update(region=l2_normalize(outputs.region_embed), boxes=outputs.boxes[-1])
  return embeddings


embed_images = nnx.jit(image_embeddings)


def spread(total: int, count: int) -> np.ndarray:
  """`min(count, total)` indices spread evenly over `range(total)`; all of them when count <= 0.

  Evenly rather than the first ones, so a subset of an image folder keeps every class.
  """
  if count <= 0 or count >= total:
    return np.arange(total)
  return np.unique(np.linspace(0, total - 1, count).round().astype(int))


class Subset(Sequence):
  """The elements `indices` of `source`."""

  def __init__(self, source: Sequence[dict[str, Any]], indices: Sequence[int]):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._indices[index])]


@dataclasses.dataclass
class Runner:
  """Where and how eval runs the model.

  Attributes:
    mesh: the device mesh the model lives on; None = the default device, nothing sharded.
    rules: logical axis rules (`config.sharding_rules`); the logical `batch` axis is split.
    batch_size: images per global batch (rounded up to a multiple of the batch shards).
    text_batch_size: texts per global batch (rounded up likewise).
    context_buckets: token lengths texts are cut to (see `truncate_to_bucket`).
    num_threads: image decoding threads per host.
  """

  mesh: jax.sharding.Mesh | None = None
  rules: sharding.Rules = ()
  batch_size: int = 64
  text_batch_size: int = 256
  context_buckets: tuple[int, ...] = (77,)
  num_threads: int = 4

  @property
  def batch_shards(self) -> int:
    """How many ways the batch axis is split."""
    return 1 if self.mesh is None else sharding.batch_shards(self.mesh, self.rules)

  def _round(self, size: int) -> int:
    multiple = math.lcm(self.batch_shards, jax.process_count())
    return math.ceil(size / multiple) * multiple

  @contextlib.contextmanager
  def context(self):
    """The mesh and axis rules that the model's sharding constraints read."""
    if self.mesh is None:
      yield
      return
    with jax.set_mesh(self.mesh), sharding.axis_rules(self.rules):
      yield

  def _sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, sharding.logical_to_spec(("batch",) + (None,) * (ndim - 1), self.rules))

  def _from_host_slices(self, local: np.ndarray) -> jax.Array:
    """This host's rows of a global batch -> the global array, split over the batch axes."""
    if self.mesh is None:
      return jnp.asarray(local)
    return jax.make_array_from_process_local_data(self._sharding(local.ndim), local)

  def _from_full(self, full: np.ndarray) -> jax.Array:
    """A batch every host holds entirely -> the global array, split over the batch axes."""
    if self.mesh is None:
      return jnp.asarray(full)
    return jax.make_array_from_callback(full.shape, self._sharding(full.ndim), lambda index: full[index])

  def _to_host(self, tree):
    if self.mesh is None:
      return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)

  def map_images(
    self, fn: Callable[..., dict[str, jax.Array]], model, source: Sequence[dict[str, Any]], image_size: int, *args
  ) -> dict[str, np.ndarray]:
    """Runs `fn(model, images [b, H, H, 3], *args) -> {key: [b, ...]}` over an eval source.

    `fn` must be jitted (each batch has the same shape, so it compiles once). Returns
    `{key: [len(source), ...]}` in source order, with the source's integer fields (`label`, ...)
    under their own keys.
    """
    if not len(source):
      raise ValueError("an eval set without examples")
    per_host = self._round(self.batch_size) // jax.process_count()
    parts, pending = [], None
    for batch in sets.image_batches(source, image_size, per_host, num_threads=self.num_threads):
      images = self._from_host_slices(batch.pop("image"))
      with self.context():
        outputs = fn(model, images, *args)
      # Fetch the previous batch only now, so the device works while the host gathers.
      if pending is not None:
        parts.append(self._to_host(pending))
      pending = {**outputs, **{k: self._from_host_slices(np.asarray(v)) for k, v in batch.items()}}
    parts.append(self._to_host(pending))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    valid = merged.pop("valid").astype(bool)
    order = np.argsort(merged.pop("index")[valid], kind="stable")
    return {k: v[valid][order] for k, v in merged.items()}

  def map_image_array(
    self, fn: Callable[..., dict[str, jax.Array]], model, images: np.ndarray, *args
  ) -> dict[str, np.ndarray]:
    """`map_images` over an in-memory batch of preprocessed images `[n, H, W, 3]` (every host the same)."""
    size = self._round(len(images))
    padded = np.zeros((size,) + images.shape[1:], np.float32)
    padded[: len(images)] = images
    with self.context():
      outputs = fn(model, self._from_full(padded), *args)
    return {k: v[: len(images)] for k, v in self._to_host(outputs).items()}

  def encode_texts(
    self, model, texts: Sequence[str], groups: np.ndarray | None = None, num_groups: int = 0
  ) -> np.ndarray:
    """L2-normalized text embeddings, `[len(texts), E]`, or their sum per group.

    Args:
      model: a GrainModel.
      texts: the strings to encode.
      groups: `[len(texts)]` int group of each text; when given, returns `[num_groups, E]` sums of
        the normalized embeddings of each group (a class's prompts, say) instead of every row,
        so memory does not grow with the number of prompts.
      num_groups: number of groups, with `groups`.
    """
    size = self._round(self.text_batch_size)
    embed_dim = model.text.text_projection.shape[1]
    out = np.zeros((len(texts) if groups is None else num_groups, embed_dim), np.float32)
    for start in range(0, len(texts), size):
      chunk = examples.tokenize(texts[start : start + size])
      ids = np.zeros((size, chunk.shape[1]), np.int32)
      ids[: len(chunk)] = chunk
      with self.context():
        embeds = _encode_text(model, self._from_full(truncate_to_bucket(ids, self.context_buckets)))
      embeds = self._to_host(embeds)[: len(chunk)]
      if groups is None:
        out[start : start + len(chunk)] = embeds
      else:
        np.add.at(out, groups[start : start + len(chunk)], embeds)
    return out


def runner_from_config(config, mesh: jax.sharding.Mesh | None = None) -> Runner:
  """A Runner with the batch sizes of `config.eval` and the text buckets of `config.model`."""
  return Runner(
    mesh=mesh,
    rules=tuple(config.sharding_rules),
    batch_size=config.eval.batch_size,
    text_batch_size=config.eval.text_batch_size,
    context_buckets=tuple(config.model.text.context_buckets),
    num_threads=config.eval.num_threads,
  )
