"""Assignment of region queries to target boxes, batched and inside jit.

The reference solves one scipy `linear_sum_assignment` per image on the host, 12 times per step.
Here the whole batch is matched on device with static shapes:

- "hungarian": the exact minimum-cost assignment. Tiny problems (the paper's 5 queries x 5 boxes)
  are solved by scoring every injective target -> query map at once, which is exact by
  construction and a single matrix product; larger ones by shortest augmenting paths with dual
  variables (the Jonker-Volgenant form of the Hungarian method), one target at a time.
- "sinkhorn": log-domain entropic optimal transport for a fixed number of iterations, rounded to a
  one-to-one assignment greedily on the plan. Approximate; see `python -m grain_jax.bench match`.
- "greedy": repeatedly takes the cheapest remaining pair. Approximate and cheap.

Contract of `match`: `query_of_target[b, t]` is the query matched to target t, -1 for invalid
targets; valid targets get distinct queries; when an image has more valid targets than queries, the
set of targets (and their queries) of minimum total cost is matched and the others get -1. Invalid
targets' costs are ignored, so garbage in padding slots cannot change the assignment.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from grain_jax.ops import boxes as box_ops

# Largest number of injective maps that "hungarian" scores exhaustively (6 x 6 has 720); beyond
# that the augmenting-path solver is cheaper.
MAX_ENUMERATED_MAPS = 720


def matching_cost(
  pred_boxes: jnp.ndarray, target_boxes: jnp.ndarray, l1_weight: float, giou_weight: float, union_epsilon: float = 0.0
) -> jnp.ndarray:
  """Cost of assigning each query to each target: l1 * L1 - giou * GIoU (no class term).

  Args:
    pred_boxes: `[B, Q, 4]` predicted (cx, cy, w, h).
    target_boxes: `[B, T, 4]` target (cx, cy, w, h); padding slots may hold anything
      (`match` ignores their costs).
    l1_weight: weight of the L1 distance summed over the 4 coordinates.
    giou_weight: weight of the generalized IoU.
    union_epsilon: added to the union in the GIoU's IoU (`box_ops.generalized_iou`).

  Returns:
    `[B, Q, T]` cost, not differentiable (the assignment is a constant for the losses).
  """
  pred_boxes = jax.lax.stop_gradient(pred_boxes).astype(jnp.float32)
  target_boxes = jax.lax.stop_gradient(target_boxes).astype(jnp.float32)
  l1 = jnp.abs(pred_boxes[:, :, None, :] - target_boxes[:, None, :, :]).sum(-1)
  giou = box_ops.generalized_iou(
    box_ops.cxcywh_to_xyxy(pred_boxes),
    box_ops.cxcywh_to_xyxy(target_boxes),
    all_pairs=True,
    union_epsilon=union_epsilon,
  )
  return l1_weight * l1 - giou_weight * giou


def match(cost: jnp.ndarray, target_valid: jnp.ndarray, method: str = "hungarian", **options) -> jnp.ndarray:
  """Matches queries to the valid targets of each image.

  Args:
    cost: `[B, Q, T]` cost of giving target t query q.
    target_valid: `[B, T]` bool, False for padding slots.
    method: "hungarian" (exact), "sinkhorn" or "greedy".
    **options: for "sinkhorn", `epsilon` (entropic regularization, in cost units; default 0.05)
      and `iterations` (default 50).

  Returns:
    `[B, T]` int32 `query_of_target`, -1 for invalid and unmatched targets.
  """
  target_valid = jnp.asarray(target_valid, bool)
  cost = jnp.where(target_valid[:, None, :], jax.lax.stop_gradient(cost).astype(jnp.float32), 0.0)
  if method == "hungarian":
    query_of_target = _exact(cost, target_valid)
  elif method == "sinkhorn":
    query_of_target = _sinkhorn(cost, target_valid, **options)
  elif method == "greedy":
    query_of_target = _greedy(cost, target_valid)
  else:
    raise ValueError(f"unknown matching method {method!r}; use hungarian, sinkhorn or greedy")
  return jnp.where(target_valid, query_of_target, -1).astype(jnp.int32)


def _exact(cost: jnp.ndarray, target_valid: jnp.ndarray) -> jnp.ndarray:
  _, num_queries, num_targets = cost.shape
  if num_targets <= num_queries and math.perm(num_queries, num_targets) <= MAX_ENUMERATED_MAPS:
    return _enumerate_assignments(cost)
  return _augmenting_paths(cost, target_valid)


def _enumerate_assignments(cost: jnp.ndarray) -> jnp.ndarray:
  """Exact assignment by scoring every injective target -> query map (needs T <= Q).

  Invalid targets cost 0 everywhere (see `match`), so a map's score is the cost of its valid part,
  and every injective map of the valid targets extends to a full one: the best full map restricted
  to the valid targets is an optimal assignment. Ties go to the lexicographically first map.

  Args:
    cost: `[B, Q, T]` with T <= Q, invalid targets already zeroed.

  Returns:
    `[B, T]` int32 query of every target.
  """
  batch, num_queries, num_targets = cost.shape
  maps = np.array(list(itertools.permutations(range(num_queries), num_targets)), np.int32)
  # selects[m, q * T + t] = 1 where map m gives target t query q: the scores are one matmul.
  selects = np.zeros((len(maps), num_queries * num_targets), np.float32)
  selects[np.arange(len(maps))[:, None], maps * num_targets + np.arange(num_targets)] = 1.0
  # Maps along the leading axis: the reductions below then run across the batch in SIMD lanes,
  # much faster on CPU than a last-axis argmin.
  scores = jnp.dot(selects, cost.reshape(batch, -1).T, precision=jax.lax.Precision.HIGHEST)
  best_score = scores.min(axis=0)
  first_best = jnp.where(scores == best_score, np.arange(len(maps))[:, None], len(maps)).min(0)
  return jnp.asarray(maps)[first_best]


def _augmenting_paths(cost: jnp.ndarray, target_valid: jnp.ndarray) -> jnp.ndarray:
  """Exact assignment by shortest augmenting paths, for any Q and T.

  Solves a square `[N, N]` problem, N = max(Q, T), whose rows are the side with fewer active
  members: targets when an image has at most Q valid ones, queries otherwise (then the best Q
  targets are chosen). Rows are added one by one; each addition runs Dijkstra on reduced costs and
  updates the duals so that they stay feasible, which keeps every partial assignment optimal.

  Args:
    cost: `[B, Q, T]`, invalid targets already zeroed.
    target_valid: `[B, T]` bool.

  Returns:
    `[B, T]` int32 query of every target (-1 when unmatched).
  """
  _, num_queries, num_targets = cost.shape
  size = max(num_queries, num_targets)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, size - x.shape[1]), (0, size - x.shape[2])])
  queries = jnp.arange(size) < num_queries
  targets = jnp.pad(target_valid, [(0, 0), (0, size - num_targets)])
  queries_as_rows = targets.sum(1) > num_queries
  rows_cost = jnp.where(queries_as_rows[:, None, None], pad(cost), pad(jnp.swapaxes(cost, 1, 2)))
  row_active = jnp.where(queries_as_rows[:, None], queries, targets)
  column_active = jnp.where(queries_as_rows[:, None], targets, queries)
  column_of_row, row_of_column = jax.vmap(_solve_rows_into_columns)(rows_cost, row_active, column_active)
  return jnp.where(queries_as_rows[:, None], row_of_column, column_of_row)[:, :num_targets]


def _solve_rows_into_columns(cost, row_active, column_active):
  """One image: assigns every active row of `cost [N, N]` a distinct active column.

  Needs no more active rows than active columns. Returns `(column_of_row [N], row_of_column [N])`,
  -1 where unassigned.
  """
  size = cost.shape[0]
  index = jnp.arange(size)

  def add_row(row, state):
    row_dual, column_dual, column_of_row, row_of_column = state

    def searching(search):
      *_, sink, steps = search
      return (sink < 0) & (steps < size)

    def extend(search):
      current, path_cost, distance, parent, seen_rows, seen_columns, _, steps = search
      seen_rows = seen_rows.at[current].set(True)
      reduced = path_cost + cost[current] - row_dual[current] - column_dual
      shorter = ~seen_columns & column_active & (reduced < distance)
      parent = jnp.where(shorter, current, parent)
      distance = jnp.where(shorter, reduced, distance)
      open_distance = jnp.where(~seen_columns & column_active, distance, jnp.inf)
      path_cost = open_distance.min()
      # Among equally close columns a free one ends the search at once.
      closest = (open_distance == path_cost) & jnp.isfinite(open_distance)
      column = jnp.argmin(jnp.where(closest, (row_of_column >= 0).astype(jnp.int32), 2))
      seen_columns = seen_columns.at[column].set(True)
      free = row_of_column[column] < 0
      sink = jnp.where(free & jnp.isfinite(path_cost), column, -1)
      return (
        row_of_column[column],
        path_cost,
        distance,
        parent,
        seen_rows,
        seen_columns,
        sink,
        jnp.where(jnp.isfinite(path_cost), steps + 1, size),
      )

    start = (
      row,
      jnp.float32(0),
      jnp.full(size, jnp.inf),
      jnp.full(size, -1),
      jnp.zeros(size, bool),
      jnp.zeros(size, bool),
      jnp.int32(-1),
      jnp.int32(0),
    )
    _, path_cost, distance, parent, seen_rows, seen_columns, sink, _ = jax.lax.while_loop(searching, extend, start)

    # Dual update: reduced costs stay >= 0 and are 0 on the assignment (complementary slackness).
    assigned_distance = distance[jnp.maximum(column_of_row, 0)]
    row_dual = row_dual + jnp.where(index == row, path_cost, jnp.where(seen_rows, path_cost - assigned_distance, 0.0))
    column_dual = column_dual - jnp.where(seen_columns, path_cost - distance, 0.0)

    def flip_edge(walk):
      column, column_of_row, row_of_column, _ = walk
      parent_row = parent[column]
      row_of_column = row_of_column.at[column].set(parent_row)
      previous = column_of_row[parent_row]
      column_of_row = column_of_row.at[parent_row].set(column)
      return previous, column_of_row, row_of_column, parent_row == row

    _, column_of_row, row_of_column, _ = jax.lax.while_loop(
      lambda walk: ~walk[-1], flip_edge, (sink, column_of_row, row_of_column, sink < 0)
    )
    return row_dual, column_dual, column_of_row, row_of_column

  def maybe_add_row(row, state):
    return jax.lax.cond(row_active[row], add_row, lambda _, s: s, row, state)

  state = (jnp.zeros(size), jnp.zeros(size), jnp.full(size, -1), jnp.full(size, -1))
  _, _, column_of_row, row_of_column = jax.lax.fori_loop(0, size, maybe_add_row, state)
  return column_of_row, row_of_column


def _sinkhorn(cost: jnp.ndarray, target_valid: jnp.ndarray, epsilon: float = 0.05, iterations: int = 50) -> jnp.ndarray:
  """Entropic OT plan between queries and valid targets, rounded greedily to an assignment.

  Every query and every valid target has mass 1. A zero-cost dummy target takes the mass of queries
  left over when there are fewer valid targets than queries, and a dummy query the targets left over
  otherwise, so that the unregularized problem is exactly the rectangular assignment problem.
  Epsilon is annealed geometrically from the image's cost range down to `epsilon` over the first
  half of the iterations (epsilon scaling): small epsilons converge slowly from a cold start.
  """
  _, num_queries, _ = cost.shape
  # Batch on the last axis: the small reductions then run across images in SIMD lanes.
  cost = jnp.pad(cost, [(0, 0), (0, 1), (0, 1)]).transpose(1, 2, 0)
  valid = target_valid.T.astype(jnp.float32)
  num_valid = valid.sum(0)
  query_mass = jnp.concatenate([jnp.ones((num_queries, valid.shape[1])), jnp.maximum(num_valid - num_queries, 0)[None]])
  target_mass = jnp.concatenate([valid, jnp.maximum(num_queries - num_valid, 0)[None]])
  log_query_mass, log_target_mass = _log_or_minus_inf(query_mass), _log_or_minus_inf(target_mass)
  cost_range = jnp.maximum(cost.max((0, 1)) - cost.min((0, 1)), epsilon)
  anneal_steps = max(iterations // 2, 1)

  def iterate(step, potentials):
    # Potentials in cost units, so that they carry over when epsilon changes.
    _, target_potential = potentials
    progress = jnp.minimum(step / anneal_steps, 1.0)
    eps = epsilon * (cost_range / epsilon) ** (1.0 - progress)
    query_potential = eps * (log_query_mass - _logsumexp((target_potential[None] - cost) / eps, 1))
    target_potential = eps * (log_target_mass - _logsumexp((query_potential[:, None] - cost) / eps, 0))
    return query_potential, target_potential

  # Padding targets start (and stay) at -inf, so they never enter a sum.
  start = (jnp.zeros_like(log_query_mass), jnp.where(target_mass > 0, 0.0, -jnp.inf))
  query_potential, target_potential = jax.lax.fori_loop(0, iterations, iterate, start)
  reduced_cost = cost - query_potential[:, None] - target_potential[None]
  return _greedy(reduced_cost[:num_queries, :-1].transpose(2, 0, 1), target_valid)


def _log_or_minus_inf(mass: jnp.ndarray) -> jnp.ndarray:
  return jnp.where(mass > 0, jnp.log(jnp.where(mass > 0, mass, 1.0)), -jnp.inf)


def _logsumexp(x: jnp.ndarray, axis: int) -> jnp.ndarray:
  # Every slice reduced here holds a finite entry (each side keeps positive mass), so the plain
  # max-shift is safe and leaner than jax.nn.logsumexp's all -inf handling.
  shift = x.max(axis, keepdims=True)
  return (shift + jnp.log(jnp.exp(x - shift).sum(axis, keepdims=True))).squeeze(axis)


def _greedy(cost: jnp.ndarray, target_valid: jnp.ndarray) -> jnp.ndarray:
  """Repeatedly matches the cheapest pair among unmatched queries and unmatched valid targets.

  Args:
    cost: `[B, Q, T]`.
    target_valid: `[B, T]` bool.

  Returns:
    `[B, T]` int32 query of every target (-1 when unmatched).
  """
  batch, num_queries, num_targets = cost.shape
  pair_index = np.arange(num_queries * num_targets).reshape(num_queries, num_targets)

  def take_cheapest(_, state):
    query_of_target, query_free = state
    open_pair = query_free[:, :, None] & (target_valid & (query_of_target < 0))[:, None, :]
    open_cost = jnp.where(open_pair, cost, jnp.inf).reshape(batch, -1)
    lowest = open_cost.min(1, keepdims=True)
    pair = jnp.where((open_cost == lowest) & open_pair.reshape(batch, -1), pair_index.reshape(-1), pair_index.size).min(
      1
    )
    any_open = pair < pair_index.size
    query, target = pair // num_targets, pair % num_targets
    query_of_target = jnp.where(
      any_open[:, None] & (np.arange(num_targets) == target[:, None]), query[:, None], query_of_target
    )
    query_free = query_free & ~(any_open[:, None] & (np.arange(num_queries) == query[:, None]))
    return query_of_target, query_free

  start = (jnp.full((batch, num_targets), -1, jnp.int32), jnp.ones((batch, num_queries), bool))
  query_of_target, _ = jax.lax.fori_loop(0, min(num_queries, num_targets), take_cheapest, start)
  return query_of_target
