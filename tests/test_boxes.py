"""Box ops against a float64 numpy implementation written here, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grain_jax.ops import boxes


def np_xyxy(cxcywh):
  cx, cy, w, h = np.moveaxis(np.asarray(cxcywh, np.float64), -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def np_iou_giou(box1, box2):
  """IoU and GIoU of two single xyxy boxes, zero for a zero denominator."""
  width = max(0.0, min(box1[2], box2[2]) - max(box1[0], box2[0]))
  height = max(0.0, min(box1[3], box2[3]) - max(box1[1], box2[1]))
  inter = width * height
  area1 = max(0.0, box1[2] - box1[0]) * max(0.0, box1[3] - box1[1])
  area2 = max(0.0, box2[2] - box2[0]) * max(0.0, box2[3] - box2[1])
  union = area1 + area2 - inter
  hull = (max(box1[2], box2[2]) - min(box1[0], box2[0])) * (max(box1[3], box2[3]) - min(box1[1], box2[1]))
  iou = inter / union if union > 0 else 0.0
  return iou, iou - ((hull - union) / hull if hull > 0 else 0.0)


def np_all_pairs(boxes1, boxes2):
  """`[N, 4]` x `[M, 4]` xyxy -> (iou, giou), each `[N, M]`."""
  out = np.array([[np_iou_giou(a, b) for b in boxes2] for a in boxes1])
  return out[..., 0], out[..., 1]


def random_cxcywh(rng, shape, degenerate_fraction=0.3):
  """Boxes in [0, 1] with a fraction of zero widths, zero heights and repeated boxes."""
  center = rng.uniform(0.0, 1.0, shape + (2,))
  size = rng.uniform(0.0, 0.5, shape + (2,))
  size[rng.random(shape + (2,)) < degenerate_fraction] = 0.0
  return np.concatenate([center, size], -1)


iou_jit = jax.jit(boxes.iou, static_argnames="all_pairs")
giou_jit = jax.jit(boxes.generalized_iou, static_argnames="all_pairs")


@jax.jit
def giou_gradients(boxes1, boxes2):
  """Gradients of a weighted sum of all-pairs GIoU and IoU w.r.t. both cxcywh inputs."""

  def total(b1, b2):
    x1, x2 = boxes.cxcywh_to_xyxy(b1), boxes.cxcywh_to_xyxy(b2)
    weights = jnp.arange(b1.shape[-2] * b2.shape[-2]).reshape(b1.shape[-2], b2.shape[-2])
    return (weights * (boxes.generalized_iou(x1, x2, all_pairs=True) + boxes.iou(x1, x2, all_pairs=True))).sum()

  return jax.grad(total, argnums=(0, 1))(boxes1, boxes2)


def test_conversions_round_trip_and_match_numpy():
  rng = np.random.default_rng(0)
  cxcywh = random_cxcywh(rng, (3, 7))
  xyxy = boxes.cxcywh_to_xyxy(jnp.asarray(cxcywh, jnp.float32))
  np.testing.assert_allclose(xyxy, np_xyxy(cxcywh), atol=1e-6)
  np.testing.assert_allclose(boxes.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-6)


def test_area_and_hand_computed_values():
  a = jnp.array([0.0, 0.0, 2.0, 2.0])
  b = jnp.array([1.0, 1.0, 3.0, 3.0])
  assert boxes.area(a) == 4.0
  assert boxes.area(jnp.array([2.0, 0.0, 1.0, 5.0])) == 0.0  # inverted: no area
  # Overlap 1, union 7, enclosing box 9.
  np.testing.assert_allclose(iou_jit(a, b), 1 / 7, rtol=1e-6)
  np.testing.assert_allclose(giou_jit(a, b), 1 / 7 - 2 / 9, rtol=1e-6)
  np.testing.assert_allclose(giou_jit(a, a), 1.0, rtol=1e-6)
  # Far apart: GIoU tends to -1.
  far = jnp.array([100.0, 100.0, 100.1, 100.1])
  assert giou_jit(jnp.array([0.0, 0.0, 0.1, 0.1]), far) < -0.99


@pytest.mark.parametrize("degenerate_fraction", [0.0, 0.5])
def test_all_pairs_and_pairwise_match_numpy(degenerate_fraction):
  rng = np.random.default_rng(1)
  boxes1 = np_xyxy(random_cxcywh(rng, (4, 6), degenerate_fraction))
  boxes2 = np_xyxy(random_cxcywh(rng, (4, 5), degenerate_fraction))
  boxes2[:, 0] = boxes1[:, 0]  # identical boxes, possibly identical points
  iou = iou_jit(jnp.asarray(boxes1, jnp.float32), jnp.asarray(boxes2, jnp.float32), all_pairs=True)
  giou = giou_jit(jnp.asarray(boxes1, jnp.float32), jnp.asarray(boxes2, jnp.float32), all_pairs=True)
  assert iou.shape == giou.shape == (4, 6, 5)
  for image in range(4):
    expected_iou, expected_giou = np_all_pairs(boxes1[image], boxes2[image])
    np.testing.assert_allclose(iou[image], expected_iou, atol=2e-6)
    np.testing.assert_allclose(giou[image], expected_giou, atol=2e-6)
  # Pairwise is the diagonal of all-pairs, with broadcasting of leading shapes.
  pairwise = giou_jit(jnp.asarray(boxes1[:, :5], jnp.float32), jnp.asarray(boxes2, jnp.float32))
  np.testing.assert_allclose(pairwise, np.diagonal(giou, axis1=1, axis2=2), atol=1e-6)
  broadcast = giou_jit(jnp.asarray(boxes1[:, :1], jnp.float32), jnp.asarray(boxes2, jnp.float32))
  np.testing.assert_allclose(broadcast, giou[:, 0, :], atol=1e-6)


def test_degenerate_values_follow_the_zero_denominator_convention():
  point = jnp.array([0.5, 0.5, 0.5, 0.5])
  line = jnp.array([0.2, 0.1, 0.2, 0.9])
  square = jnp.array([0.0, 0.0, 1.0, 1.0])
  assert iou_jit(point, point) == 0.0 and giou_jit(point, point) == 0.0
  assert iou_jit(line, square) == 0.0
  assert giou_jit(line, square) == 0.0  # the square is its own enclosing box
  # A point outside the square: enclosing 1.5 x 1.5, union 1.
  np.testing.assert_allclose(giou_jit(jnp.array([1.5, 1.5, 1.5, 1.5]), square), -(2.25 - 1.0) / 2.25, rtol=1e-6)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(2)
  boxes1 = random_cxcywh(rng, (5,), 0.0) + np.array([0, 0, 0.05, 0.05])
  boxes2 = random_cxcywh(rng, (4,), 0.0) + np.array([0, 0, 0.05, 0.05])
  weights = np.arange(20).reshape(5, 4)

  def total(b1, b2):
    iou, giou = np_all_pairs(np_xyxy(b1), np_xyxy(b2))
    return (weights * (iou + giou)).sum()

  grad1, grad2 = giou_gradients(jnp.asarray(boxes1, jnp.float32), jnp.asarray(boxes2, jnp.float32))
  step = 1e-6
  for grad, argument in ((grad1, 0), (grad2, 1)):
    expected = np.zeros(grad.shape)
    for index in np.ndindex(grad.shape):
      plus, minus = [boxes1.copy(), boxes2.copy()], [boxes1.copy(), boxes2.copy()]
      plus[argument][index] += step
      minus[argument][index] -= step
      expected[index] = (total(*plus) - total(*minus)) / (2 * step)
    np.testing.assert_allclose(grad, expected, rtol=2e-3, atol=2e-3)


def test_gradients_are_finite_on_degenerate_boxes():
  rng = np.random.default_rng(3)
  boxes1 = random_cxcywh(rng, (8,), 0.6)
  boxes1[:3] = [0.5, 0.5, 0.0, 0.0]  # identical points: every denominator is zero
  boxes2 = np.concatenate([boxes1[:4], random_cxcywh(rng, (4,), 0.6)])
  boxes2[5, 2:] = -0.1  # inverted box
  grad1, grad2 = giou_gradients(jnp.asarray(boxes1, jnp.float32), jnp.asarray(boxes2, jnp.float32))
  assert np.isfinite(grad1).all() and np.isfinite(grad2).all()
  assert np.abs(grad1).sum() > 0  # not finite by being cut off everywhere
