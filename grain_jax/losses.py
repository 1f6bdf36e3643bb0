"""The GRAIN objective: L = L_ic + box_l1 * L1 + box_giou * (1 - GIoU) + region * L_rd
(+ description_to_query * L_dq, an option the reference lacks).

All functions take arrays of the global batch: under jit with sharded inputs GSPMD inserts whatever
gathering the contrastive logits need, so there are no hand-written collectives. Everything is
computed in float32 and stays finite (values and gradients) on batches without boxes or
descriptions. Padding slots (`box_valid` False) may hold any value, NaN included.
"""

import jax
import jax.numpy as jnp
import ml_collections

from grain_jax.ops import boxes as box_ops
from grain_jax.ops import localization
from grain_jax.ops import matching

# Logit of an excluded negative: far below any real logit (|logit| <= 100), yet finite so that a
# row with nothing to compare against still has finite gradients.
_EXCLUDED = -1e9
# Metrics only a model with region queries has (0 for the plain-CLIP baseline).
REGION_METRICS = ("loss_l1", "loss_giou", "loss_rd", "loss_dq", "match_cost", "rd_accuracy", "dq_accuracy",
                  "box_spread_ratio")


def _normalize(x: jnp.ndarray) -> jnp.ndarray:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def image_caption_loss(image_embed: jnp.ndarray, text_embed: jnp.ndarray,
                       logit_scale: jnp.ndarray) -> jnp.ndarray:
  """Symmetric InfoNCE between images and their captions (CLIP's loss).

  Args:
    image_embed: `[B, E]` global image embeddings (normalized here).
    text_embed: `[B, E]` caption embeddings; row i is the caption of image i.
    logit_scale: scalar, log of the inverse temperature.

  Returns:
    Scalar: mean of the image->text and text->image cross-entropies.
  """
  logits = jnp.exp(logit_scale) * _normalize(image_embed) @ _normalize(text_embed).T
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


def box_loss(pred_boxes: jnp.ndarray, target_boxes: jnp.ndarray, target_valid: jnp.ndarray,
             query_of_target: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """L1 and GIoU losses of matched query boxes, normalized by the global number of valid boxes.

  Args:
    pred_boxes: `[B, Q, 4]` predicted (cx, cy, w, h).
    target_boxes: `[B, T, 4]` target (cx, cy, w, h).
    target_valid: `[B, T]` bool.
    query_of_target: `[B, T]` int, from `matching.match` (-1 = unmatched).

  Returns:
    `(l1, giou_loss)` scalars: sums over matched pairs of the L1 distance (summed over the 4
    coordinates) and of 1 - GIoU, each divided by max(1, number of valid boxes in the batch).
  """
  matched = _matched(target_valid, query_of_target)
  # Replace padding before any arithmetic: a masked NaN would still poison the gradient.
  target_boxes = jnp.where(target_valid[..., None], target_boxes.astype(jnp.float32), 0.5)
  pred_boxes = _per_target(pred_boxes.astype(jnp.float32), query_of_target)
  l1 = jnp.abs(pred_boxes - target_boxes).sum(-1)
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred_boxes),
                                 box_ops.cxcywh_to_xyxy(target_boxes))
  num_boxes = jnp.maximum(target_valid.sum(), 1)
  return (jnp.where(matched, l1, 0.0).sum() / num_boxes,
          jnp.where(matched, 1.0 - giou, 0.0).sum() / num_boxes)


def region_description_loss(region_embed: jnp.ndarray, desc_embed: jnp.ndarray,
                            target_valid: jnp.ndarray, query_of_target: jnp.ndarray,
                            desc_text_id: jnp.ndarray, logit_scale: jnp.ndarray,
                            mask_duplicates: bool = True,
                            num_groups: int = 1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Region -> description cross-entropy: each matched region picks its own description.

  Every matched region is scored against every valid description of its group (the whole batch
  when `num_groups` is 1) and trained towards the description of its target.

  Args:
    region_embed: `[B, Q, E]` region-query embeddings (normalized here).
    desc_embed: `[B, T, E]` description embeddings, one per target box.
    target_valid: `[B, T]` bool.
    query_of_target: `[B, T]` int, from `matching.match` (-1 = unmatched).
    desc_text_id: `[B, T]` int; equal ids mean identical description texts.
    logit_scale: scalar, log of the inverse temperature (shared with `image_caption_loss`).
    mask_duplicates: drop from the negatives the descriptions whose text equals the target's
      (the reference counts them as negatives).
    num_groups: split the batch into this many contiguous equal groups that draw negatives only
      from themselves, like the reference's per-device loss when set to the number of devices.

  Returns:
    `(loss, accuracy)` scalars: mean cross-entropy and top-1 accuracy over matched regions, 0
    when nothing is matched.
  """
  batch, num_targets = target_valid.shape
  if batch % num_groups:
    raise ValueError(f"batch {batch} does not split into {num_groups} groups")
  matched = _matched(target_valid, query_of_target)
  regions = _normalize(_per_target(region_embed, query_of_target))
  descriptions = _normalize(jnp.where(target_valid[..., None], desc_embed, 0.0))

  def grouped(x):
    return x.reshape(num_groups, batch // num_groups * num_targets, *x.shape[2:])

  regions, descriptions = grouped(regions), grouped(descriptions)
  valid, text_id = grouped(target_valid), grouped(desc_text_id)
  logits = jnp.exp(logit_scale) * jnp.einsum("gre,gde->grd", regions, descriptions)
  own = jnp.eye(logits.shape[-1], dtype=bool)
  negative = valid[:, None, :] & ~own
  if mask_duplicates:
    negative &= text_id[:, :, None] != text_id[:, None, :]
  logits = jnp.where(negative | own, logits, _EXCLUDED)
  own_logit = jnp.diagonal(logits, axis1=1, axis2=2)
  cross_entropy = jax.nn.logsumexp(logits - own_logit[..., None], axis=-1)
  correct = logits.max(-1) <= own_logit
  matched = grouped(matched)
  num_matched = jnp.maximum(matched.sum(), 1)
  return (jnp.where(matched, cross_entropy, 0.0).sum() / num_matched,
          jnp.where(matched, correct, False).sum() / num_matched)


def description_query_loss(region_embed: jnp.ndarray, desc_embed: jnp.ndarray, target_valid: jnp.ndarray,
                           query_of_target: jnp.ndarray,
                           logit_scale: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
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
  descriptions = _normalize(jnp.where(target_valid[..., None], desc_embed, 0.0))
  logits = jnp.exp(logit_scale) * jnp.einsum("bte,bqe->btq", descriptions, _normalize(region_embed))
  own_logit = jnp.take_along_axis(logits, jnp.maximum(query_of_target, 0)[..., None], axis=-1)[..., 0]
  cross_entropy = jax.nn.logsumexp(logits - own_logit[..., None], axis=-1)
  correct = logits.max(-1) <= own_logit
  num_matched = jnp.maximum(matched.sum(), 1)
  return (jnp.where(matched, cross_entropy, 0.0).sum() / num_matched,
          jnp.where(matched, correct, False).sum() / num_matched)


def grain_loss(*, image_embed: jnp.ndarray, caption_embed: jnp.ndarray,
               logit_scale: jnp.ndarray, matching_config: ml_collections.ConfigDict,
               loss_config: ml_collections.ConfigDict, region_embed: jnp.ndarray | None = None,
               layer_boxes: jnp.ndarray | None = None, desc_embed: jnp.ndarray | None = None,
               target_boxes: jnp.ndarray | None = None, box_valid: jnp.ndarray | None = None,
               desc_text_id: jnp.ndarray | None = None,
               batch_shards: int = 1) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The full objective from model outputs and batch targets.

  Leave the region arguments None for the plain-CLIP baseline: only L_ic is computed and the
  region metrics read 0.

  Args:
    image_embed: `[B, E]` global image embeddings (GRAIN's image query).
    caption_embed: `[B, E]` caption embeddings.
    logit_scale: scalar, log of the inverse temperature.
    matching_config: `config.matching` (method, cost weights, Sinkhorn settings).
    loss_config: `config.loss` (weights, aux_layers, region_negatives,
      mask_duplicate_descriptions, description_to_query).
    region_embed: `[B, Q, E]` region-query embeddings of the last decoder layer.
    layer_boxes: `[L, B, Q, 4]` predicted (cx, cy, w, h) of every decoder layer, last one last.
    desc_embed: `[B, T, E]` embeddings of each target box's description.
    target_boxes: `[B, T, 4]` target (cx, cy, w, h).
    box_valid: `[B, T]` bool.
    desc_text_id: `[B, T]` int; equal ids mean identical description texts.
    batch_shards: number of devices the batch is split over; used when
      `loss_config.region_negatives` is "per_device".

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
    options = dict(epsilon=matching_config.sinkhorn_epsilon,
                   iterations=matching_config.sinkhorn_iterations)

  def match_layer(pred_boxes):
    cost = matching.matching_cost(pred_boxes, target_boxes, matching_config.cost_l1,
                                  matching_config.cost_giou)
    return cost, matching.match(cost, box_valid, matching_config.method, **options)

  # Each supervised layer is matched on its own; vmap over layers rather than folding them into
  # the batch axis keeps that axis's sharding intact.
  cost, query_of_target = jax.vmap(match_layer)(layer_boxes)
  loss_l1, loss_giou = jax.vmap(box_loss, in_axes=(0, None, None, 0))(
      layer_boxes, target_boxes, box_valid, query_of_target)
  last_query_of_target = query_of_target[-1]
  matched = _matched(box_valid, last_query_of_target)
  matched_cost = jnp.take_along_axis(cost[-1], jnp.maximum(last_query_of_target, 0)[:, None],
                                     axis=1)[:, 0]
  match_cost = jnp.where(matched, matched_cost, 0.0).sum() / jnp.maximum(matched.sum(), 1)

  num_groups = batch_shards if loss_config.region_negatives == "per_device" else 1
  loss_rd, rd_accuracy = region_description_loss(
      region_embed, desc_embed, box_valid, last_query_of_target, desc_text_id, logit_scale,
      mask_duplicates=loss_config.mask_duplicate_descriptions, num_groups=num_groups)
  loss_dq, dq_accuracy = description_query_loss(region_embed, desc_embed, box_valid, last_query_of_target,
                                                logit_scale)
  metrics.update(loss_l1=loss_l1.sum(), loss_giou=loss_giou.sum(), loss_rd=loss_rd, loss_dq=loss_dq,
                 match_cost=match_cost, rd_accuracy=rd_accuracy, dq_accuracy=dq_accuracy,
                 box_spread_ratio=localization.conditioning_ratio(layer_boxes[-1], target_boxes, box_valid))
  total = (loss_ic + loss_config.box_l1 * metrics["loss_l1"] + loss_config.box_giou * metrics["loss_giou"]
           + loss_config.region * loss_rd + loss_config.description_to_query * loss_dq)
  return total, metrics
