"""Matching against scipy's linear_sum_assignment on thousands of random cases per shape."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from grain_jax.ops import matching


@functools.partial(jax.jit, static_argnames=("method", "augmenting_paths"))
def solve(cost, target_valid, method="hungarian", augmenting_paths=False, **options):
  """`match`, or its augmenting-path solver directly, also on shapes `match` enumerates."""
  if not augmenting_paths:
    return matching.match(cost, target_valid, method, **options)
  found = matching._augmenting_paths(jnp.where(target_valid[:, None, :], cost, 0.0), target_valid)
  return jnp.where(target_valid, found, -1)


def random_valid(rng, batch, num_targets):
  """`[batch, T]` masks with 0..T valid targets in random slots (not only a prefix)."""
  num_valid = rng.integers(0, num_targets + 1, batch)
  ranks = rng.random((batch, num_targets)).argsort(1).argsort(1)
  return ranks < num_valid[:, None]


def random_costs(rng, batch, num_queries, num_targets):
  """Six families, one per sixth of the batch: float costs, small integers (many ties), all
  equal, tiny, huge mixed with tiny, and box costs as in training (the last sixth)."""
  shape = (batch, num_queries, num_targets)
  cost = rng.normal(size=shape)
  part = batch // 6
  cost[part : 2 * part] = rng.integers(0, 3, (part,) + shape[1:])
  cost[2 * part : 3 * part] = 1.0
  cost[3 * part : 4 * part] *= 1e-6
  scale = 10.0 ** rng.choice([-6, 0, 6], size=(part,) + shape[1:])
  cost[4 * part : 5 * part] = rng.uniform(-1, 1, scale.shape) * scale
  rest = batch - 5 * part

  def box(count):
    return np.concatenate([rng.uniform(0.1, 0.9, (rest, count, 2)), rng.uniform(0.0, 0.5, (rest, count, 2))], -1)

  cost[5 * part :] = matching.matching_cost(box(num_queries), box(num_targets), 5.0, 2.0)
  return cost.astype(np.float32)


def optimal_cost(cost, target_valid):
  """`[B]` minimum total cost of a rectangular assignment of the valid targets (float64)."""
  totals = np.zeros(len(cost))
  for image, (image_cost, valid) in enumerate(zip(cost.astype(np.float64), target_valid)):
    sub = image_cost[:, valid]
    rows, columns = linear_sum_assignment(sub)
    totals[image] = sub[rows, columns].sum()
  return totals


def check_valid_assignment(query_of_target, target_valid, num_queries):
  """Invalid targets -1, min(Q, valid) matched targets with distinct queries; `[B]` bools."""
  ok = []
  for assigned, valid in zip(query_of_target, target_valid):
    matched = assigned[valid][assigned[valid] >= 0]
    ok.append(
      (assigned[~valid] == -1).all()
      and len(matched) == min(num_queries, valid.sum())
      and len(set(matched.tolist())) == len(matched)
      and (matched < num_queries).all()
    )
  return np.array(ok)


def assignment_cost(cost, query_of_target):
  picked = np.take_along_axis(cost.astype(np.float64), np.maximum(query_of_target, 0)[:, None], axis=1)[:, 0]
  return np.where(query_of_target >= 0, picked, 0.0).sum(1)


def tolerance(cost, target_valid):
  """Float32 rounding of a sum of up to min(Q, T) costs, per image."""
  magnitude = np.where(target_valid[:, None, :], np.abs(cost), 0).max((1, 2))
  return 1e-5 * magnitude * cost.shape[2] + 1e-30


METHODS = [("hungarian", {}), ("sinkhorn", dict(epsilon=0.05)), ("greedy", {})]

# (Q, T) shapes: square, more queries, more targets; `match` enumerates the first three.
SHAPES = [(5, 5), (5, 3), (6, 6), (3, 5), (4, 9), (7, 7), (16, 16)]


@pytest.mark.parametrize("shape", SHAPES)
def test_hungarian_is_optimal(shape):
  num_queries, num_targets = shape
  rng = np.random.default_rng(num_queries * 100 + num_targets)
  batch = 300 if num_queries == 16 else 1500
  cost, valid = random_costs(rng, batch, *shape), random_valid(rng, batch, num_targets)
  optimum = optimal_cost(cost, valid)
  enumerated = num_targets <= num_queries and math.perm(num_queries, num_targets) <= matching.MAX_ENUMERATED_MAPS
  assert enumerated == (shape in SHAPES[:3])
  for augmenting_paths in {False, enumerated}:
    query_of_target = np.asarray(solve(cost, valid, augmenting_paths=augmenting_paths))
    assert check_valid_assignment(query_of_target, valid, num_queries).all(), augmenting_paths
    gap = assignment_cost(cost, query_of_target) - optimum
    assert (np.abs(gap) <= tolerance(cost, valid)).all(), (augmenting_paths, np.abs(gap).max())


def test_more_valid_targets_than_queries_keeps_the_cheapest():
  cost = np.full((1, 2, 4), 10.0, np.float32)
  cost[0, 0, 3] = cost[0, 1, 1] = 0.0
  cost[0, :, 2] = -50.0  # cheapest target, but invalid
  valid = np.array([[True, True, False, True]])
  for method, options in METHODS:
    np.testing.assert_array_equal(solve(cost, valid, method, **options), [[-1, 1, -1, 0]], err_msg=method)


@pytest.mark.parametrize("method, options", METHODS)
def test_invalid_targets_never_change_the_assignment(method, options):
  rng = np.random.default_rng(7)
  cost, valid = random_costs(rng, 500, 5, 5), random_valid(rng, 500, 5)
  garbage = np.where(valid[:, None, :], cost, rng.choice([np.nan, np.inf, -1e30, 1e30], cost.shape)).astype(np.float32)
  reference = np.asarray(solve(cost, valid, method, **options))
  np.testing.assert_array_equal(solve(garbage, valid, method, **options), reference)
  # Appending padding slots leaves the real targets' queries unchanged (continuous costs, no ties).
  continuous = rng.normal(size=(500, 5, 4)).astype(np.float32)
  padded = np.concatenate([continuous, rng.normal(size=(500, 5, 3)).astype(np.float32)], 2)
  padded_valid = np.concatenate([valid[:, :4], np.zeros((500, 3), bool)], 1)
  np.testing.assert_array_equal(
    solve(padded, padded_valid, method, **options)[:, :4], solve(continuous, valid[:, :4], method, **options)
  )


@pytest.mark.parametrize("shape", [(5, 5), (3, 5), (5, 3)])
def test_sinkhorn_is_one_to_one_and_close_to_optimal(shape):
  rng = np.random.default_rng(8)
  cost, valid = random_costs(rng, 1200, *shape), random_valid(rng, 1200, shape[1])
  box_costs = slice(1000, None)  # the last sixth: costs of boxes, as in training
  optimum = optimal_cost(cost, valid)
  gaps = {}
  for epsilon in (2.0, 0.02):
    query_of_target = np.asarray(solve(cost, valid, "sinkhorn", epsilon=epsilon))
    assert check_valid_assignment(query_of_target, valid, shape[0]).all()
    gaps[epsilon] = (assignment_cost(cost, query_of_target) - optimum)[box_costs]
    assert (gaps[epsilon] >= -tolerance(cost, valid)[box_costs]).all()
  # A small epsilon is (nearly) exact; a large one blurs the plan.
  assert gaps[0.02].mean() < 0.01 and gaps[0.02].mean() < gaps[2.0].mean()
  assert np.mean(gaps[0.02] <= tolerance(cost, valid)[box_costs]) > 0.95


@pytest.mark.parametrize("shape", [(5, 5), (3, 5), (5, 3)])
def test_greedy_is_one_to_one(shape):
  rng = np.random.default_rng(9)
  cost, valid = random_costs(rng, 600, *shape), random_valid(rng, 600, shape[1])
  query_of_target = np.asarray(solve(cost, valid, "greedy"))
  assert check_valid_assignment(query_of_target, valid, shape[0]).all()
  gap = assignment_cost(cost, query_of_target) - optimal_cost(cost, valid)
  assert (gap >= -tolerance(cost, valid)).all()


def test_match_works_under_vmap():
  rng = np.random.default_rng(10)
  cost, valid = random_costs(rng, 60, 5, 5), random_valid(rng, 60, 5)
  batched = jax.jit(jax.vmap(matching.match))(cost.reshape(3, 20, 5, 5), valid.reshape(3, 20, 5))
  np.testing.assert_array_equal(np.asarray(batched).reshape(60, 5), solve(cost, valid))


def test_unknown_method_is_an_error():
  with pytest.raises(ValueError, match="unknown matching method"):
    matching.match(jnp.zeros((1, 2, 2)), jnp.ones((1, 2), bool), "auction")


def test_matching_cost_matches_numpy_and_has_no_gradient():
  rng = np.random.default_rng(11)
  pred = np.concatenate([rng.uniform(0, 1, (2, 4, 2)), rng.uniform(0, 0.5, (2, 4, 2))], -1)
  target = np.concatenate([rng.uniform(0, 1, (2, 3, 2)), rng.uniform(0, 0.5, (2, 3, 2))], -1)
  pred[0, 0, 2] = 0.0  # degenerate prediction

  def np_xyxy(b):
    return np.concatenate([b[:2] - b[2:] / 2, b[:2] + b[2:] / 2])

  expected = np.zeros((2, 4, 3))
  for b, q, t in np.ndindex(expected.shape):
    p, g = np_xyxy(pred[b, q]), np_xyxy(target[b, t])
    inter = max(0, min(p[2], g[2]) - max(p[0], g[0])) * max(0, min(p[3], g[3]) - max(p[1], g[1]))
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    giou = inter / union - (hull - union) / hull
    expected[b, q, t] = 5.0 * np.abs(pred[b, q] - target[b, t]).sum() - 2.0 * giou
  cost_fn = jax.jit(functools.partial(matching.matching_cost, l1_weight=5.0, giou_weight=2.0))
  np.testing.assert_allclose(cost_fn(pred, target), expected, atol=1e-5)
  assert not np.asarray(jax.grad(lambda p: cost_fn(p, target).sum())(pred)).any()
