"""Preemption notices: a SIGTERM makes the run save at a step boundary and stop, instead of dying
and losing the steps since its last checkpoint.

Cloud TPU maintenance events and spot preemptions, Kubernetes and SLURM (at preemption or, through
launch/slurm_gpu.sbatch, before the time limit) all send SIGTERM some time before they kill.

- With `jax.distributed` initialized, JAX's preemption service catches SIGTERM on any process and
  the processes agree on the step at which all of them save (the step after the largest one any
  process has reached): `multihost_utils.reached_preemption_sync_point`, asked at every step.
- A single process (no `jax.distributed`) catches SIGTERM itself while the run trains, and saves
  after the step in progress.

The run then raises `Preempted`, and `python -m grain_jax.main` exits with `PREEMPTED_STATUS`, so
that a launcher can tell "saved, run me again" from a failure. Process 0 also writes the step into
`<workdir>/preempted` once the checkpoint has committed (the next training run removes it): under
SLURM, srun's status is that of whichever task it saw end first, or of the signal that killed the
others, so launch/slurm_gpu.sbatch requeues on that file rather than on the status.
"""

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from grain_jax.train import workdir_files

# EX_TEMPFAIL of sysexits.h: a temporary failure, the run should be started again.
PREEMPTED_STATUS = 75


MARKER = "preempted"


def write_marker(workdir: str, step: int) -> None:
  """`<workdir>/preempted` holding `step`: the run saved that step on a notice and stopped."""
  workdir_files.replace_durably(os.path.join(workdir, MARKER), f"{step}\n")


def remove_marker(workdir: str) -> None:
  """A run trains again: the previous one's notice is dealt with."""
  workdir_files.remove(os.path.join(workdir, MARKER))


class Preempted(Exception):
  """A preemption notice arrived; the run saved a checkpoint at `step` and stopped."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"preempted: saved the checkpoint of step {step} in {workdir}; running the same command "
                     "again resumes from it")
    self.step = step


class PreemptionNotice:
  """`reached(step)`: whether the run should save after `step` steps and stop. Use as a context
  manager around the training loop (single process: SIGTERM is caught inside it only)."""

  def __init__(self):
    self.shared = jax.distributed.is_initialized()
    self.enabled = not self.shared or jax.config.jax_enable_preemption_service
    if not self.enabled:
      logging.warning("jax_enable_preemption_service is off: a SIGTERM ends the run without a checkpoint")
    self.received = False
    self._previous = None

  def __enter__(self) -> "PreemptionNotice":
    if not self.shared:
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, self._receive)
      else:
        logging.warning("training outside the main thread: a SIGTERM ends it without a checkpoint")
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _receive(self, signum, frame) -> None:
    del signum, frame
    if not self.received:
      logging.warning("SIGTERM: saving a checkpoint after the step in progress, then stopping")
    self.received = True

  def reached(self, step: int) -> bool:
    """Call with every step count, in order, on every process."""
    if self.shared:
      return self.enabled and multihost_utils.reached_preemption_sync_point(step)
    return self.received
