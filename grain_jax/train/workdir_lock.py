"""One training run per workdir: `<workdir>/lock` names the run that holds it.

  with workdir_lock.held(workdir) as lock:   # WorkdirLockedError when another run holds it
    lock.check()    # at every step, free: WorkdirLostError once the heartbeat found the lock gone
    lock.verify()   # before a save: the same, asked of the file system now

The lock file holds the holder's host, pid and start time, and a heartbeat. A run that finds it
held exits at once, naming the holder. A run that is gone is told apart from one that is alive so:
- The holder keeps an exclusive flock on the file, which the kernel drops when the process ends,
  however it ends. On one host, and on file systems whose locks span hosts (NFS), a lock file that
  is not flocked was left by a run that is gone.
- A mount whose locks are local to each host (gcsfuse) cannot tell so of a holder on another host:
  there the holder rewrites its heartbeat every HEARTBEAT_S, and a lock whose heartbeat is older
  than STALE_AFTER_S was left by a run that is gone.
Such a stale lock is taken over, with a warning naming the run that left it. The heartbeat also
notices when the lock file disappears (the workdir deleted under the run) or names another run;
the trainer then stops instead of writing checkpoints nobody can find.

Evaluation and export only read checkpoints and take no lock: they run beside a trainer. With
several processes, process 0 holds the lock for all of them. Local and mounted file systems only:
a `gs://` workdir would need an `acquire` of its own (a write conditioned on the object's
generation), with the same holder record and errors.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time

import jax

from grain_jax.errors import UserError, check_writable
from grain_jax.processes import any_process

LOCK_FILE = "lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# Every record is written whole in one write of this size, so a reader sees the old one or the new.
_RECORD_BYTES = 512
# flock on a file system that has none.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(UserError, RuntimeError):
  """Another training run holds the workdir."""


class WorkdirLostError(UserError, RuntimeError):
  """The workdir's lock went away while this run held it (the workdir deleted, the lock taken over)."""


def describe(holder: dict) -> str:
  """`host H, pid P, started T` of a lock record."""
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _same_run(a: dict, b: dict) -> bool:
  return all(a.get(key) == b.get(key) for key in ("host", "pid", "started"))


def _read(fd: int) -> dict:
  """The record in the open lock file `fd`; {} when it is empty or does not parse."""
  try:
    record = json.loads(os.pread(fd, 4 * _RECORD_BYTES, 0).decode() or "{}")
  except (ValueError, UnicodeDecodeError):
    return {}
  return record if isinstance(record, dict) else {}


def _write(fd: int, record: dict) -> None:
  os.pwrite(fd, json.dumps(record).encode().ljust(_RECORD_BYTES), 0)
  os.fsync(fd)


def _flock(fd: int) -> bool | None:
  """Takes the exclusive flock of `fd`: True, False when another process holds it, None when the
  file system has no flock."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError as error:
    if error.errno in _NO_FLOCK:
      return None
    raise
  return True


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _gone_why(holder: dict, flocked: bool | None, stale_after_s: float) -> str:
  """Why the run of `holder` is gone ("" when it may be alive), the lock's flock being ours
  (`flocked`: True, or None without flock)."""
  if not holder:
    return "its lock file holds no record"
  if holder.get("host") == socket.gethostname():
    if flocked:
      return "its process no longer holds the lock"
    if not _alive(int(holder.get("pid", 0))):
      return "its process no longer exists"
    return ""
  age = time.time() - float(holder.get("heartbeat", 0))
  return f"its heartbeat is {age:.0f} s old" if age > stale_after_s else ""


class WorkdirLock:
  """The lock of a workdir, held by this process (see the module doc)."""

  def __init__(self, path: str, fd: int, record: dict, heartbeat_s: float):
    self.path, self._fd, self.record = path, fd, record
    self.lost = ""  # why the lock is no longer this run's; set by the heartbeat or verify()
    self._stop = threading.Event()
    self._heartbeat = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                       name="grain_jax_workdir_lock")
    self._heartbeat.start()

  def _problem(self) -> str:
    """Why the lock file is no longer this run's, "" while it is."""
    try:
      same_file = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
    except FileNotFoundError:
      return f"{self.path} was deleted while this run held it (was the workdir deleted or moved?)"
    holder = _read(self._fd)
    if not same_file or not _same_run(holder, self.record):
      return f"another run took {self.path} over ({describe(holder)})"
    return ""

  def _beat(self, heartbeat_s: float) -> None:
    while not self._stop.wait(heartbeat_s):
      self.lost = self._problem()
      if self.lost:
        return
      self.record["heartbeat"] = time.time()
      _write(self._fd, self.record)

  def check(self) -> None:
    """Raises WorkdirLostError when the heartbeat found the lock gone (reads no file)."""
    if self.lost:
      raise WorkdirLostError(f"{self.lost}: this run stops rather than write where no run will find it")

  def verify(self) -> None:
    """Raises WorkdirLostError unless the lock file is still this run's (asks the file system)."""
    self.lost = self.lost or self._problem()
    self.check()

  def release(self) -> None:
    self._stop.set()
    self._heartbeat.join()
    if not self._problem():
      os.remove(self.path)
    os.close(self._fd)


class _HeldByProcessZero:
  """What processes other than 0 hold: process 0 watches the lock for all."""

  def check(self) -> None:
    pass

  def verify(self) -> None:
    pass


def acquire(workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> WorkdirLock:
  """Takes `<workdir>/lock` (the folder exists) for this process, or takes over a stale one (logged).

  Raises:
    WorkdirLockedError naming the holder when another run holds the workdir.
    ArgumentError when the workdir cannot be written (a read-only, archived run).
  """
  check_writable(workdir, "--workdir", "training writes its checkpoints, metrics and config there (--mode eval "
                 "and --mode export read a read-only run, writing to --output-dir)")
  path = os.path.join(workdir, LOCK_FILE)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    flocked = _flock(fd)
    try:
      replaced = os.stat(path).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
      replaced = True
    if not replaced:
      break
    os.close(fd)  # its holder released it between our open and our flock: the next file is the lock
  holder = _read(fd)
  gone = "" if flocked is False else _gone_why(holder, flocked, stale_after_s)
  if not gone:
    os.close(fd)
    heartbeat = holder.get("heartbeat")
    seen = f", last heartbeat {time.time() - heartbeat:.0f} s ago" if isinstance(heartbeat, (int, float)) else ""
    raise WorkdirLockedError(
        f"another training run holds the workdir {workdir} ({describe(holder)}{seen}): wait for it to end or stop "
        f"it; {path} of a run that is gone is taken over (on another host after {stale_after_s:.0f} s without its "
        "heartbeat). Evaluating beside it (--mode eval) needs no lock")
  if holder:
    logging.warning("took over the lock of the workdir %s from a run that is gone (%s: %s)", workdir,
                    describe(holder), gone)
  now = time.time()
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "heartbeat": now}
  os.ftruncate(fd, _RECORD_BYTES)
  _write(fd, record)
  return WorkdirLock(path, fd, record, heartbeat_s)


@contextlib.contextmanager
def held(workdir: str, **timing):
  """The workdir's lock for the body (process 0 takes it; every process raises when it cannot);
  yields an object with `check()` and `verify()`. `timing`: acquire's heartbeat_s, stale_after_s."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, **timing)
    except UserError as e:
      error = e
  if any_process(error is not None):
    raise error or WorkdirLockedError(f"process 0 could not lock the workdir {workdir}; see its log")
  try:
    yield lock or _HeldByProcessZero()
  finally:
    if lock is not None:
      lock.release()
