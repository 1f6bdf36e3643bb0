"""The GRAIN objective: L = L_ic + box_l1 * L1 + box_giou * (1 - GIoU) + region * L_rd
(+ description_to_query * L_dq, an option the reference lacks).

All functions take arrays of the global batch: under jit with sharded inputs GSPMD inserts whatever
gathering the contrastive logits need. The one exception is L_rd with per-device negatives, which
runs on each device's own rows (`sharding.per_batch_shard`) so that no description is gathered.
Everything is computed in float32 and stays finite (values and gradients) on batches without boxes
or descriptions. Padding slots (`box_valid` False) may hold any value, NaN included.

Per device (`num_groups`, the train step's batch shards), as the authors' code computes under DDP:
each device's loss is a mean over its own boxes or regions, and the gradient is the mean over
devices (docs/reference_behaviour.md, "Losses"). A device without any counts 0 (theirs: NaN).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from grain_jax import sharding
from grain_jax.ops import boxes as box_ops
from grain_jax.ops import localization, matching
from grain_jax.ops.normalize import l2_normalize

# Logit of an excluded negative: far below any real logit (|logit| <= 100), yet finite so that a
# row with nothing to compare against still has finite gradients.
_EXCLUDED = -1e9
# Metrics only a model with region queries has (0 for the plain-CLIP baseline).
REGION_METRICS = (
  "loss_l1",
  "loss_giou",
  "loss_rd",
  "loss_dq",
  "match_cost",
  "rd_accuracy",
  "dq_accuracy",
  "box_spread_ratio",
)


def image_caption_loss(image_embed: jnp.ndarray, text_embed: jnp.ndarray, logit_scale: jnp.ndarray) -> jnp.ndarray:
  """Symmetric InfoNCE between images and their captions (CLIP's loss).

  Args:
    image_embed: `[B, E]` global image embeddings (normalized here).
    text_embed: `[B, E]` caption embeddings; row i is the caption of image i.
    logit_scale: scalar, log of the inverse temperature.

  Returns:
    Scalar: mean of the image->text and text->image cross-entropies.
  """
  logits = jnp.exp(logit_scale) * l2_normalize(image_embed) @ l2_normalize(text_embed).T
  # Subtracting the positive logit first keeps log(1 + small) accurate in float32.
  diagonal = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits - diagonal[:, None], axis=1)
  text_to_image = jax.nn.logsumexp(logits - diagonal[None, :], axis=0)
  return (image_to_text.mean() + text_to_image.mean()) / 2


def _matched(target_valid: jnp.ndarray, query_of_target: jnp.ndarray) -> jnp.ndarray:
  return target_valid & (query_of_target >= 0)


def _per_target(per_query: jnp.ndarray, query_of_target: jnp.ndarray) -> jnp.ndarray:
  """`[B, Q, D]` rows of each target's query -> `[B, T, D]` (unmatched targets get query 0)."""
  index = jnp.maximum(query_of_target, 0)[..., None]
  return jnp.take_along_axis(per_query, index, axis=1)


def _mean_over(values: jnp.ndarray, counted: jnp.ndarray, num_groups: int | None) -> jnp.ndarray:
  """sum(values) / max(1, count of `counted`) over the batch (`num_groups` None), or that ratio in each
  of `num_groups` contiguous equal groups of the leading (batch) axis, averaged over the groups."""
  if num_groups is None:
    return values.sum() / jnp.maximum(counted.sum(), 1)
  values, counted = (x.reshape(num_groups, -1) for x in (values, counted))
  return (values.sum(1) / jnp.maximum(counted.sum(1), 1)).mean()


def box_loss(
  pred_boxes: jnp.ndarray,
  target_boxes: jnp.ndarray,
  target_valid: jnp.ndarray,
  query_of_target: jnp.ndarray,
  union_epsilon: float = 0.0,
  num_groups: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """L1 and GIoU losses of matched query boxes, normalized by the number of valid boxes.

  Args:
    pred_boxes: `[B, Q, 4]` predicted (cx, cy, w, h).
    target_boxes: `[B, T, 4]` target (cx, cy, w, h).
    target_valid: `[B, T]` bool.
    query_of_target: `[B, T]` int, from `matching.match` (-1 = unmatched).
    union_epsilon: added to the union in the GIoU's IoU (`box_ops.generalized_iou`).
    num_groups: None divides by the valid boxes of the whole batch; G splits the batch into G
      contiguous equal groups (devices), each divided by its own, and averages the groups.

  Returns:
    `(l1, giou_loss)` scalars: sums over matched pairs of the L1 distance (summed over the 4
    coordinates) and of 1 - GIoU, each divided by max(1, number of valid boxes).
  """
  matched = _matched(target_valid, query_of_target)
  # Replace padding before any arithmetic: a masked NaN would still poison the gradient.
  target_boxes = jnp.where(target_valid[..., None], target_boxes.astype(jnp.float32), 0.5)
  pred_boxes = _per_target(pred_boxes.astype(jnp.float32), query_of_target)
  l1 = jnp.abs(pred_boxes - target_boxes).sum(-1)
  giou = box_ops.generalized_iou(
    box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(target_boxes), union_epsilon=union_epsilon
  )
  return (
    _mean_over(jnp.where(matched, l1, 0.0), target_valid, num_groups),
    _mean_over(jnp.where(matched, 1.0 - giou, 0.0), target_valid, num_groups),
  )


def _region_description_sums(
  region_embed: jnp.ndarray,
  desc_embed: jnp.ndarray,
  target_valid: jnp.ndarray,
  query_of_target: jnp.ndarray,
  desc_text_id: jnp.ndarray,
  logit_scale: jnp.ndarray,
  mask_duplicates: bool,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Every matched region of these `[b, ...]` rows against every valid description of the same rows:
  float32 scalars (sum of cross-entropies, number right, number of matched regions)."""
  matched = _matched(target_valid, query_of_target).reshape(-1)
  regions = l2_normalize(_per_target(region_embed, query_of_target)).reshape(matched.size, -1)
  descriptions = l2_normalize(jnp.where(target_valid[..., None], desc_embed, 0.0)).reshape(matched.size, -1)
  valid, text_id = target_valid.reshape(-1), desc_text_id.reshape(-1)
  logits = jnp.exp(logit_scale) * regions @ descriptions.T
  own = jnp.eye(matched.size, dtype=bool)
  negative = valid[None, :] & ~own
  if mask_duplicates:
    negative &= text_id[:, None] != text_id[None, :]
  logits = jnp.where(negative | own, logits, _EXCLUDED)
  own_logit = jnp.diagonal(logits)
  cross_entropy = jax.nn.logsumexp(logits - own_logit[:, None], axis=-1)
  correct = logits.max(-1) <= own_logit
  return (
    jnp.where(matched, cross_entropy, 0.0).sum(),
    jnp.where(matched, correct, False).sum().astype(jnp.float32),
    matched.sum().astype(jnp.float32),
  )


def region_description_loss(
  region_embed: jnp.ndarray,
  desc_embed: jnp.ndarray,
  target_valid: jnp.ndarray,
  query_of_target: jnp.ndarray,
  desc_text_id: jnp.ndarray,
  logit_scale: jnp.ndarray,
  mask_duplicates: bool = True,
  num_groups: int | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Region -> description cross-entropy: each matched region picks its own description.

  Args:
    region_embed: `[B, Q, E]` region-query embeddings (normalized here).
    desc_embed: `[B, T, E]` description embeddings, one per target box.
    target_valid: `[B, T]` bool.
    query_of_target: `[B, T]` int, from `matching.match` (-1 = unmatched).
    desc_text_id: `[B, T]` int; equal ids mean identical description texts.
    logit_scale: scalar, log of the inverse temperature (shared with `image_caption_loss`).
    mask_duplicates: drop from the negatives the descriptions whose text equals the target's
      (the authors count them as negatives).
    num_groups: None scores every region against every valid description of the batch and averages
      over all matched regions. G splits the batch into G contiguous equal groups, the devices'
      shards (under a mesh, one group per batch shard, computed there: `sharding.per_batch_shard`):
      each region is scored against its own group's descriptions, each group averages over its
      regions, and the groups are averaged (the authors' per-device loss).

  Returns:
    `(loss, accuracy)` scalars: cross-entropy and top-1 accuracy, 0 where nothing is matched.
  """
  args = (region_embed, desc_embed, target_valid, query_of_target, desc_text_id)
  sums = functools.partial(_region_description_sums, mask_duplicates=mask_duplicates)
  if num_groups is None:
    cross_entropy, correct, count = sums(*args, logit_scale)
    return cross_entropy / jnp.maximum(count, 1), correct / jnp.maximum(count, 1)
  if target_valid.shape[0] % num_groups:
    raise ValueError(f"batch {target_valid.shape[0]} does not split into {num_groups} groups")
  cross_entropy, correct, count = sharding.per_batch_shard(sums, num_groups, args, (logit_scale,))
  return (cross_entropy / jnp.maximum(count, 1)).mean(), (correct / jnp.maximum(count, 1)).mean()


def description_query_loss(
  region_embed: jnp.ndarray,
  desc_embed: jnp.ndarray,
  target_valid: jnp.ndarray,
  query_of_target: jnp.ndarray,
  logit_scale: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Description -> query cross-entropy: each matched description picks its own region query among
  the Q queries of its image (the choice grounding makes at evaluation).

  Args:
    region_embed: `[B, Q, E]` region-query embeddings (normalized here).
    desc_embed: `[B, T, E]` description embeddings, one per target box.
    target_valid: `[B, T]` bool.
    query_of_target: `[B, T]` int, from `matching.match` (-1 = unmatched).
    logit_scale: scalar, log of the inverse temperature.

  Returns:
    `(loss, accuracy)` scalars over matched descriptions (0 when nothing is matched).
  """
  matched = _matched(target_valid, query_of_target)
  descriptions = l2_normalize(jnp.where(target_valid[..., None], desc_embed, 0.0))
  logits = jnp.exp(logit_scale) * jnp.einsum("bte,bqe->btq", descriptions, l2_normalize(region_embed))
  own_logit = jnp.take_along_axis(logits, jnp.maximum(query_of_target, 0)[..., None], axis=-1)[..., 0]
  cross_entropy = jax.nn.logsumexp(logits - own_logit[..., None], axis=-1)
  correct = logits.max(-1) <= own_logit
  num_matched = jnp.maximum(matched.sum(), 1)
  return (
    jnp.where(matched, cross_entropy, 0.0).sum() / num_matched,
    jnp.where(matched, correct, False).sum() / num_matched,
  )


def grain_loss(
  *,
  image_embed: jnp.ndarray,
  caption_embed: jnp.ndarray,
  logit_scale: jnp.ndarray,
  matching_config: ml_collections.ConfigDict,
  loss_config: ml_collections.ConfigDict,
  region_embed: jnp.ndarray | None = None,
  layer_boxes: jnp.ndarray | None = None,
  desc_embed: jnp.ndarray | None = None,
  target_boxes: jnp.ndarray | None = None,
  box_valid: jnp.ndarray | None = None,
  desc_text_id: jnp.ndarray | None = None,
  batch_shards: int = 1,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The full objective from model outputs and batch targets.

  Leave the region arguments None for the plain-CLIP baseline: only L_ic is computed and the
  region metrics read 0.

  Args:
    image_embed: `[B, E]` global image embeddings (GRAIN's image query).
    caption_embed: `[B, E]` caption embeddings.
    logit_scale: scalar, log of the inverse temperature.
    matching_config: `config.matching` (method, cost weights, Sinkhorn settings).
    loss_config: `config.loss` (weights, aux_layers, region_negatives,
      mask_duplicate_descriptions, box_normalization, iou_union_epsilon, description_to_query).
    region_embed: `[B, Q, E]` region-query embeddings of the last decoder layer.
    layer_boxes: `[L, B, Q, 4]` predicted (cx, cy, w, h) of every decoder layer, last one last.
    desc_embed: `[B, T, E]` embeddings of each target box's description.
    target_boxes: `[B, T, 4]` target (cx, cy, w, h).
    box_valid: `[B, T]` bool.
    desc_text_id: `[B, T]` int; equal ids mean identical description texts.
    batch_shards: number of devices the batch is split over (its batch shards); the groups of
      `loss_config.region_negatives` and `box_normalization` "per_device".

  Returns:
    `(total, metrics)`: the scalar loss and a dict of scalars `loss_ic`, `loss_l1`, `loss_giou`
    (summed over the supervised decoder layers), `loss_rd`, `loss_dq`, `match_cost` (mean cost of
    a matched pair, last layer), `rd_accuracy`, `dq_accuracy` and `box_spread_ratio` (the last
    layer's `localization.conditioning_ratio` over the batch), such that
    total = loss_ic + box_l1 * loss_l1 + box_giou * loss_giou + region * loss_rd
            + description_to_query * loss_dq.
  """
  loss_ic = image_caption_loss(image_embed, caption_embed, logit_scale)
  metrics = dict(loss_ic=loss_ic)
  zero = jnp.zeros((), jnp.float32)
  if region_embed is None:
    metrics.update({name: zero for name in REGION_METRICS})
    return loss_ic, metrics

  if not loss_config.aux_layers:
    layer_boxes = layer_boxes[-1:]
  options = {}
  if matching_config.method == "sinkhorn":
    options = dict(epsilon=matching_config.sinkhorn_epsilon, iterations=matching_config.sinkhorn_iterations)

  def match_layer(pred_boxes):
    cost = matching.matching_cost(
      pred_boxes, target_boxes, matching_config.cost_l1, matching_config.cost_giou, loss_config.iou_union_epsilon
    )
    return cost, matching.match(cost, box_valid, matching_config.method, **options)

  # Each supervised layer is matched on its own; vmap over layers rather than folding them into
  # the batch axis keeps that axis's sharding intact.
  cost, query_of_target = jax.vmap(match_layer)(layer_boxes)
  box_groups = batch_shards if loss_config.box_normalization == "per_device" else None
  loss_l1, loss_giou = jax.vmap(
    functools.partial(box_loss, union_epsilon=loss_config.iou_union_epsilon, num_groups=box_groups),
    in_axes=(0, None, None, 0),
  )(layer_boxes, target_boxes, box_valid, query_of_target)
  last_query_of_target = query_of_target[-1]
  matched = _matched(box_valid, last_query_of_target)
  matched_cost = jnp.take_along_axis(cost[-1], jnp.maximum(last_query_of_target, 0)[:, None], axis=1)[:, 0]
  match_cost = jnp.where(matched, matched_cost, 0.0).sum() / jnp.maximum(matched.sum(), 1)

  loss_rd, rd_accuracy = region_description_loss(
    region_embed,
    desc_embed,
    box_valid,
    last_query_of_target,
    desc_text_id,
    logit_scale,
    mask_duplicates=loss_config.mask_duplicate_descriptions,
    num_groups=batch_shards if loss_config.region_negatives == "per_device" else None,
  )
  loss_dq, dq_accuracy = description_query_loss(region_embed, desc_embed, box_valid, last_query_of_target, logit_scale)
  metrics.update(
    loss_l1=loss_l1.sum(),
    loss_giou=loss_giou.sum(),
    loss_rd=loss_rd,
    loss_dq=loss_dq,
    match_cost=match_cost,
    rd_accuracy=rd_accuracy,
    dq_accuracy=dq_accuracy,
    box_spread_ratio=localization.conditioning_ratio(layer_boxes[-1], target_boxes, box_valid),
  )
  total = (
    loss_ic
    + loss_config.box_l1 * metrics["loss_l1"]
    + loss_config.box_giou * metrics["loss_giou"]
    + loss_config.region * loss_rd
    + loss_config.description_to_query * loss_dq
  )
  return total, metrics
