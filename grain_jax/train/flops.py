"""Matmul FLOPs of a JAX function, counted from its jaxpr.

XLA's own count (`compiled.cost_analysis()`) sees a scanned layer stack as one iteration of a
while loop, so it undercounts a model run with `scan_layers=True` by its depth. Counting the
`dot_general`s of the jaxpr instead multiplies each scan body by its length, and is the same
whether the layers are scanned or unrolled. Elementwise work is not counted (it is the usual
"model FLOPs": the matmuls, forward and backward). The count is of the jaxpr as traced, so a
function with rematerialized (`jax.checkpoint`) parts also counts their forward pass again in the
backward pass; model FLOPs are those of the same function without remat (`trainer.Training.flops_fn`,
which is exact, where 3x the forward pass would not be: no gradient flows into the input images).
"""

import math
from typing import Any, Callable

import jax
import jax.extend


def dot_general_flops(lhs_shape: tuple[int, ...], rhs_shape: tuple[int, ...], dimension_numbers) -> int:
  """2 x (batch) x (lhs free) x (rhs free) x (contracted) for one `lax.dot_general`."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  contracted = math.prod(lhs_shape[d] for d in lhs_contract)
  batch = math.prod(lhs_shape[d] for d in lhs_batch)
  lhs_free = math.prod(lhs_shape) // (contracted * batch)
  rhs_free = math.prod(rhs_shape) // (contracted * batch)
  return 2 * batch * lhs_free * rhs_free * contracted


def _sub_jaxprs(value: Any):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def jaxpr_matmul_flops(jaxpr) -> int:
  """Matmul FLOPs of one execution of `jaxpr`: scan bodies times their length, the costliest branch
  of a `cond`; a `while` body counts once (its trip count is not known before it runs)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += dot_general_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.params["dimension_numbers"])
      continue
    if name == "cond":
      total += max(jaxpr_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"])
      continue
    inner = sum(jaxpr_matmul_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
    total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def matmul_flops(fn: Callable, *args) -> int:
  """Matmul FLOPs of one call `fn(*args)` (traced, not run; arrays or ShapeDtypeStructs)."""
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args).jaxpr)
