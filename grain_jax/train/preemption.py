"""Preemption notices: a SIGTERM makes the run save at a step boundary and stop, instead of dying
and losing the steps since its last checkpoint. A Ctrl-C (SIGINT) while the run trains does the
same; a second Ctrl-C stops it at once (the default action of SIGINT, restored by the first).

Cloud TPU maintenance events and spot preemptions, Kubernetes and SLURM (at preemption or, through
launch/slurm_gpu.sbatch, before the time limit) all send SIGTERM some time before they kill.

- With `jax.distributed` initialized, JAX's preemption service catches SIGTERM on any process and
  the processes agree on the step at which all of them save (the step after the largest one any
  process has reached): `multihost_utils.reached_preemption_sync_point`, asked at every step.
- A single process (no `jax.distributed`) catches SIGTERM itself while the run trains, and saves
  after the step in progress.

A Ctrl-C reaches a process as SIGINT; with `jax.distributed` the process passes it on to itself as
SIGTERM, so that the processes agree on the step through the preemption service as for a notice.

The run then raises `Preempted`, and `python -m grain_jax.main` exits with `PREEMPTED_STATUS`, so
that a launcher can tell "saved, run me again" from a failure. Process 0 also writes the step into
`<workdir>/preempted` once the checkpoint has committed (the next training run removes it): under
SLURM, srun's status is that of whichever task it saw end first, or of the signal that killed the
others, so launch/slurm_gpu.sbatch requeues on that file rather than on the status. After a Ctrl-C
the status is `INTERRUPTED_STATUS` and no file is written: a user stopped the run, and a launcher
should not start it again.
"""

import logging
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

from grain_jax import files

# EX_TEMPFAIL of sysexits.h: a temporary failure, the run should be started again.
PREEMPTED_STATUS = 75
# What a shell reports for a command a Ctrl-C stopped (128 + SIGINT).
INTERRUPTED_STATUS = 130


MARKER = "preempted"


def write_marker(workdir: str, step: int) -> None:
  """`<workdir>/preempted` holding `step`: the run saved that step on a notice and stopped."""
  files.replace_durably(os.path.join(workdir, MARKER), f"{step}\n")


def remove_marker(workdir: str) -> None:
  """A run trains again: the previous one's notice is dealt with."""
  files.remove(os.path.join(workdir, MARKER))


class Preempted(Exception):
  """A preemption notice (or, `interrupted`, a Ctrl-C) arrived; the run saved a checkpoint at `step`
  and stopped."""

  def __init__(self, step: int, workdir: str, interrupted: bool = False):
    super().__init__(
      f"{'interrupted' if interrupted else 'preempted'}: saved the checkpoint of step {step} in "
      f"{workdir}; running the same command again resumes from it"
    )
    self.step = step
    self.status = INTERRUPTED_STATUS if interrupted else PREEMPTED_STATUS


class PreemptionNotice:
  """`reached(step)`: whether the run should save after `step` steps and stop; `interrupted`: the
  stop is a Ctrl-C's. Use as a context manager around the training loop: the signals are caught
  inside it only (SIGTERM by this class with a single process, by JAX's preemption service with
  several; SIGINT by this class)."""

  def __init__(self):
    self.shared = jax.distributed.is_initialized()
    self.enabled = not self.shared or jax.config.jax_enable_preemption_service
    if not self.enabled:
      logging.warning("jax_enable_preemption_service is off: a SIGTERM ends the run without a checkpoint")
    self.received = False
    self.interrupted = False
    self._previous = {}

  def __enter__(self) -> "PreemptionNotice":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("training outside the main thread: a SIGTERM or Ctrl-C ends it without a checkpoint")
      return self
    if not self.shared:
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._receive)
    if self.enabled:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _receive(self, signum, frame) -> None:
    del signum, frame
    if not self.received:
      logging.warning("SIGTERM: saving a checkpoint after the step in progress, then stopping")
    self.received = True

  def _interrupt(self, signum, frame) -> None:
    del frame
    # From now on SIGINT does what it does by default: a second Ctrl-C ends the process at once,
    # even in the middle of a compile or a save.
    signal.signal(signum, signal.SIG_DFL)
    logging.warning(
      "Ctrl-C: saving a checkpoint after the step in progress, then stopping (Ctrl-C again stops "
      "at once, losing the steps since the newest checkpoint)"
    )
    self.interrupted = True
    if self.shared:
      os.kill(os.getpid(), signal.SIGTERM)  # the preemption service's notice, which the processes agree on
    else:
      self.received = True

  def reached(self, step: int) -> bool:
    """Call with every step count, in order, on every process."""
    if self.shared:
      return self.enabled and multihost_utils.reached_preemption_sync_point(step)
    return self.received
