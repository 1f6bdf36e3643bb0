"""Localization diagnostics against numpy written here; the fixed-box fit against brute force."""

import itertools

import jax
import numpy as np
import pytest

from grain_jax.ops import localization


def random_boxes(rng, *shape):
  """cxcywh boxes inside the unit square."""
  size = rng.uniform(0.1, 0.5, shape + (2,))
  centre = rng.uniform(size / 2, 1 - size / 2)
  return np.concatenate([centre, size], -1).astype(np.float32)


def np_iou(a, b):
  ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
  bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
  inter = max(0, min(ax2, bx2) - max(ax1, bx1)) * max(0, min(ay2, by2) - max(ay1, by1))
  return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def np_covered(fixed, truth, threshold):
  return np.array([any(np_iou(f, t) >= threshold for f in fixed) for t in truth])


def test_conditioning_ratio_matches_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  pred, true = random_boxes(rng, 6, 5), random_boxes(rng, 6, 4)
  valid = rng.random((6, 4)) < 0.7
  expected = pred.std(axis=0).mean() / true[valid].std(axis=0).mean()
  padded = np.where(valid[..., None], true, np.nan)
  ratio = jax.jit(localization.conditioning_ratio)(pred, padded, valid)
  np.testing.assert_allclose(ratio, expected, rtol=1e-5)
  np.testing.assert_allclose(localization.conditioning_ratio(pred, true[valid]), expected, rtol=1e-5)


def test_constant_boxes_have_ratio_zero_and_moving_boxes_one():
  rng = np.random.default_rng(1)
  true = random_boxes(rng, 50)
  constant = np.broadcast_to(random_boxes(rng, 1, 5), (50, 5, 4))
  assert float(localization.conditioning_ratio(constant, true)) == pytest.approx(0.0, abs=1e-5)
  following = np.repeat(true[:, None], 5, axis=1)  # every query on the object
  np.testing.assert_allclose(localization.conditioning_ratio(following, true), 1.0, rtol=1e-5)
  assert float(localization.conditioning_ratio(following, np.ones((3, 4)))) == 0.0  # no spread: 0, not NaN


def test_best_of_k_recall_matches_numpy():
  rng = np.random.default_rng(2)
  fixed, truth = random_boxes(rng, 4), random_boxes(rng, 300)
  for threshold in (0.3, 0.5):
    expected = 100 * np_covered(fixed, truth, threshold).mean()
    assert localization.best_of_k_recall(fixed, truth, threshold) == pytest.approx(expected)
  assert localization.best_of_k_recall(fixed, truth[:0]) == 0.0


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_fixed_boxes_cover_like_the_best_candidates(seed):
  """K=1 is the best single candidate exactly; K=3 is within greedy's 1 - 1/e of the best triple."""
  rng = np.random.default_rng(seed)
  # Clustered targets, as detection boxes are: the fit must find the clusters.
  clusters = random_boxes(rng, 4)
  targets = (clusters[rng.integers(0, 4, 60)] + rng.normal(0, 0.03, (60, 4))).clip(0.05, 0.95).astype(np.float32)
  coverage = lambda boxes: np_covered(boxes, targets, 0.5).sum()
  covers = np.array([np_covered(t[None], targets, 0.5) for t in targets])  # [candidate, target]
  best_single = covers.sum(axis=1).max()
  assert coverage(localization.fit_fixed_boxes(targets, 1)) == best_single
  best_triple = max((covers[a] | covers[b] | covers[c]).sum() for a, b, c in itertools.combinations(range(60), 3))
  fitted = localization.fit_fixed_boxes(targets, 3)
  assert fitted.shape == (3, 4)
  assert coverage(fitted) >= (1 - 1 / np.e) * best_triple
  assert coverage(fitted) > best_single


def test_fixed_boxes_need_targets():
  with pytest.raises(ValueError, match="at least one target"):
    localization.fit_fixed_boxes(np.zeros((0, 4)), 5)
