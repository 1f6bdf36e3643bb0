"""Box conversions, IoU and generalized IoU (GIoU), safe on degenerate boxes.

Boxes are `[..., 4]` arrays in one of two formats: (cx, cy, w, h), the project's convention for
model outputs and targets, or (x1, y1, x2, y2), which IoU and GIoU take. With `all_pairs=False` the box at
each index of `boxes1` is scored against the box at the same index of `boxes2` (leading shapes
broadcast); with `all_pairs=True`, `[..., N, 4]` against `[..., M, 4]` gives `[..., N, M]`.

Zero-area boxes are legal (a sigmoid can output w = 0): every division is guarded so that values and
gradients stay finite. By convention a ratio whose denominator is zero is zero, so two identical
point boxes have IoU 0 and GIoU 0.

`union_epsilon` is added to the union where IoU divides by it (not in GIoU's enclosing-box term):
the authors' matcher and GIoU loss add 1e-4 (docs/reference_behaviour.md, "Losses"); 0 gives the
exact ratio.
"""

import jax.numpy as jnp


def cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """(cx, cy, w, h) `[..., 4]` -> (x1, y1, x2, y2) `[..., 4]`."""
  center, size = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([center - size / 2, center + size / 2], axis=-1)


def xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """(x1, y1, x2, y2) `[..., 4]` -> (cx, cy, w, h) `[..., 4]`."""
  low, high = boxes[..., :2], boxes[..., 2:]
  return jnp.concatenate([(low + high) / 2, high - low], axis=-1)


def area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area of (x1, y1, x2, y2) boxes `[..., 4]` -> `[...]`; inverted extents count as zero."""
  extent = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
  return extent[..., 0] * extent[..., 1]


def _safe_divide(numerator: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
  # The inner where keeps the untaken branch finite: a plain where(d > 0, n / d, 0) still
  # back-propagates 0 * inf = NaN through n / 0.
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _paired(boxes1: jnp.ndarray, boxes2: jnp.ndarray, all_pairs: bool):
  if all_pairs:
    return boxes1[..., :, None, :], boxes2[..., None, :, :]
  return boxes1, boxes2


def _iou_and_union(boxes1: jnp.ndarray, boxes2: jnp.ndarray, union_epsilon: float = 0.0):
  """IoU and union area of already paired (broadcastable) xyxy boxes."""
  overlap_low = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  overlap_high = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  intersection = area(jnp.concatenate([overlap_low, overlap_high], axis=-1))
  union = area(boxes1) + area(boxes2) - intersection
  return _safe_divide(intersection, union + union_epsilon), union


def iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, all_pairs: bool = False, union_epsilon: float = 0.0) -> jnp.ndarray:
  """Intersection over union of (x1, y1, x2, y2) boxes.

  Args:
    boxes1: `[..., 4]`, or `[..., N, 4]` with `all_pairs`.
    boxes2: `[..., 4]`, or `[..., M, 4]` with `all_pairs`.
    all_pairs: score every box of `boxes1` against every box of `boxes2`.
    union_epsilon: added to the union before dividing by it.

  Returns:
    `[...]` (broadcast leading shape), or `[..., N, M]` with `all_pairs`; values in [0, 1].
  """
  return _iou_and_union(*_paired(boxes1, boxes2, all_pairs), union_epsilon)[0]


def generalized_iou(
  boxes1: jnp.ndarray, boxes2: jnp.ndarray, all_pairs: bool = False, union_epsilon: float = 0.0
) -> jnp.ndarray:
  """Generalized IoU (Rezatofighi et al. 2019) of (x1, y1, x2, y2) boxes, in [-1, 1].

  IoU minus the fraction of the smallest enclosing box that the union leaves empty, so that disjoint
  boxes still get a signal that pulls them together. Shapes and `union_epsilon` as in `iou`.
  """
  boxes1, boxes2 = _paired(boxes1, boxes2, all_pairs)
  overlap, union = _iou_and_union(boxes1, boxes2, union_epsilon)
  enclosing_low = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  enclosing_high = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  enclosing = area(jnp.concatenate([enclosing_low, enclosing_high], axis=-1))
  return overlap - _safe_divide(enclosing - union, enclosing)
