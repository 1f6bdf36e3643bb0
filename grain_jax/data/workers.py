"""Setup of Grain's data worker processes, so that they outlive a preemption notice or a Ctrl-C and
not their trainer.

Launchers deliver a preemption notice (SIGTERM) to every process of the job: a TPU VM's process
group, every process of a SLURM step, a Kubernetes container; a terminal delivers a Ctrl-C (SIGINT)
to every process of its foreground group. The trainer answers either by saving after a step
(grain_jax/train/preemption.py), and it may need one more batch first, so its workers must not die
of those signals: they ignore them. They still end with the trainer: on a
normal exit Grain stops them (it closes its iterators before multiprocessing terminates daemon
processes), and when the trainer dies without that (SIGKILL, os._exit) a watchdog thread in each
worker sees it reparented and exits.
"""

import os
import signal
import threading

# How often a worker checks that its trainer is alive: the longest an orphaned worker lingers.
PARENT_CHECK_S = 1.0


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    threading.Event().wait(PARENT_CHECK_S)
  os._exit(0)


def init_worker(worker_index: int, worker_count: int) -> None:
  """Grain's `worker_init_fn`: run first in each worker process."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="exit_when_orphaned").start()
