"""Agreement between the processes of a run, so that every process takes the same branch: one that
went another way would leave the others waiting in a collective."""

import jax
import numpy as np
from jax.experimental import multihost_utils


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (an all-gather with several processes)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def every_process(flag: bool) -> bool:
  """Whether `flag` is true on every process (an all-gather with several processes)."""
  return not any_process(not flag)
