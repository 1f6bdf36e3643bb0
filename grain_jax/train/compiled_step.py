"""The train step compiled ahead of its first call, once per batch shape, with every process of a
multi-process run waiting for all the others to finish compiling before any of them runs it.

Why the wait: CPU collectives (gloo) give a peer 30 s to join, and processes do not finish
compiling together. With a persistent compilation cache only process 0 writes entries (and the
other processes' cache keys differ), so in a second launch process 0 loads its programs while the
others compile theirs anew; when that takes longer than 30 s the first collective fails. The
barrier goes through the coordination service instead, which waits `COMPILE_BARRIER_TIMEOUT_S`.

Optionally it counts each program's model FLOPs (the matmuls of `flops_fn`'s jaxpr) for
utilization: packed texts make steps of different row counts cost different amounts.
"""

from typing import Callable

import jax
import orbax.checkpoint as ocp

from grain_jax.train.flops import matmul_flops

# Generous: a pod-sized model's step can take many minutes to compile on a slow host.
COMPILE_BARRIER_TIMEOUT_S = 3600


def batch_signature(batch: dict[str, jax.Array]) -> tuple:
  """What decides which program runs `batch`: each field's name, shape and dtype."""
  return tuple((name, tuple(value.shape), str(value.dtype)) for name, value in sorted(batch.items()))


def wait_for_other_processes(name: str) -> None:
  """Returns once every process has called this with the same unique `name` (at once when there is
  one process)."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(
      name, timeout=COMPILE_BARRIER_TIMEOUT_S, processes=set(range(jax.process_count()))
    )


class CompiledStep:
  """Calls `step_fn(state, batch)` through its compiled program for the batch's shapes.

  With `flops_fn` (the same step without rematerialization, `Training.flops_fn`), `last_flops` is
  the model FLOPs of the latest call (all devices together); otherwise None. Counting traces
  `flops_fn` once per batch shape.
  """

  def __init__(self, step_fn: Callable, flops_fn: Callable | None = None):
    self._step_fn = step_fn
    self._flops_fn = flops_fn
    self._programs: dict[tuple, Callable] = {}
    self._flops: dict[tuple, int] = {}
    self.last_flops: int | None = None

  def __call__(self, state, batch: dict[str, jax.Array]):
    signature = batch_signature(batch)
    program = self._programs.get(signature)
    if program is None:
      program = self._step_fn.lower(state, batch).compile()
      self._programs[signature] = program
      # Every process sees the same batch shapes in the same order (the packed texts' row count is
      # agreed across processes), so the count names the same barrier everywhere.
      wait_for_other_processes(f"grain_jax_compiled_train_step_{len(self._programs)}")
      if self._flops_fn is not None:
        self._flops[signature] = matmul_flops(self._flops_fn, state, batch)
    self.last_flops = self._flops.get(signature)
    return program(state, batch)
