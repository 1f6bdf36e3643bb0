"""Diagnostics that a decoder predicting the same boxes for every image cannot pass.

- `conditioning_ratio`: how much each region query's box moves from image to image, relative to
  how much the true boxes move. Constant boxes score 0; boxes that follow the objects score
  around 1.
- `fit_fixed_boxes` / `best_of_k_recall`: the best K boxes that ignore the image, fitted on
  training targets; the recall a decoder reaches without looking at the image.

All boxes are normalized (cx, cy, w, h).
"""

import jax.numpy as jnp
import numpy as np

from grain_jax.ops import boxes as box_ops


def _masked_std(values: jnp.ndarray, weights: jnp.ndarray, axis) -> jnp.ndarray:
  total = jnp.maximum(weights.sum(axis=axis, keepdims=True), 1.0)
  mean = (values * weights).sum(axis=axis, keepdims=True) / total
  return jnp.sqrt(((values - mean) ** 2 * weights).sum(axis=axis, keepdims=True) / total)


def conditioning_ratio(
  pred_boxes: jnp.ndarray, true_boxes: jnp.ndarray, true_valid: jnp.ndarray | None = None
) -> jnp.ndarray:
  """Spread of predicted boxes across images over the spread of the true boxes (jnp or numpy).

  Args:
    pred_boxes: `[N, Q, 4]` the region queries' boxes on N images.
    true_boxes: `[..., 4]` true boxes (any leading shape, e.g. `[B, T, 4]` or `[P, 4]`).
    true_valid: `[...]` bool, which true boxes count; None = all.

  Returns:
    Scalar float32: mean over queries and coordinates of the standard deviation over images of
    the predicted coordinate, divided by the mean over coordinates of the standard deviation of
    the true coordinate (0 when the true boxes do not vary).
  """
  pred = jnp.asarray(pred_boxes, jnp.float32)
  true = jnp.asarray(true_boxes, jnp.float32).reshape(-1, 4)
  valid = (
    jnp.ones(true.shape[:1], jnp.float32) if true_valid is None else jnp.asarray(true_valid, jnp.float32).reshape(-1)
  )
  # Padding may hold anything (NaN included): replace it before any arithmetic.
  true = jnp.where(valid[:, None] > 0, true, 0.0)
  pred_spread = _masked_std(pred, jnp.ones(pred.shape[:1] + (1, 1)), axis=0).mean()
  true_spread = _masked_std(true, valid[:, None], axis=0).mean()
  return jnp.where(true_spread > 0, pred_spread / jnp.where(true_spread > 0, true_spread, 1.0), 0.0)


def _covers(boxes: np.ndarray, targets: np.ndarray, iou_threshold: float, chunk: int = 2048) -> np.ndarray:
  """`[N, M]` bool: box n overlaps target m with IoU >= threshold (cxcywh), computed over chunks of
  targets so that memory stays at `N x chunk` whatever M."""
  boxes = box_ops.cxcywh_to_xyxy(np.asarray(boxes, np.float32))
  return np.concatenate(
    [
      np.asarray(
        box_ops.iou(
          boxes, box_ops.cxcywh_to_xyxy(np.asarray(targets[start : start + chunk], np.float32)), all_pairs=True
        )
      )
      >= iou_threshold
      for start in range(0, len(targets), chunk)
    ]
    or [np.zeros((len(boxes), 0), bool)],
    axis=1,
  )


def best_of_k_recall(fixed_boxes: np.ndarray, true_boxes: np.ndarray, iou_threshold: float = 0.5) -> float:
  """% of `true_boxes [M, 4]` that at least one of `fixed_boxes [K, 4]` overlaps with IoU >= threshold."""
  if not len(true_boxes):
    return 0.0
  return 100 * float(_covers(fixed_boxes, true_boxes, iou_threshold).any(axis=0).mean())


def fit_fixed_boxes(
  targets: np.ndarray, k: int, iou_threshold: float = 0.5, max_candidates: int = 2000, seed: int = 0
) -> np.ndarray:
  """The K boxes `[k, 4]` that cover most of `targets [M, 4]` at IoU >= threshold.

  Greedy maximum coverage over candidate boxes drawn from the targets themselves (at most
  `max_candidates`, a fixed random subset): each pick adds the candidate covering the most targets
  not yet covered, so the first box is the best single candidate and the K together are within a
  factor 1 - 1/e of the best K candidates. On the box distributions of detection data it is a
  strong image-blind baseline.
  """
  targets = np.asarray(targets, np.float32).reshape(-1, 4)
  if not len(targets):
    raise ValueError("fit_fixed_boxes needs at least one target box")
  rng = np.random.default_rng(seed)
  candidates = (
    targets if len(targets) <= max_candidates else targets[rng.choice(len(targets), max_candidates, replace=False)]
  )
  covers = _covers(candidates, targets, iou_threshold)  # [C, M]
  uncovered = np.ones(len(targets), bool)
  picked = []
  for _ in range(k):
    gains = (covers & uncovered).sum(axis=1)
    best = int(gains.argmax())
    picked.append(best)
    uncovered &= ~covers[best]
  return candidates[picked]
