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

In a `gs://` workdir the lock is the object `<workdir>/lock`, with the same record. There is no
flock: it is created only if absent, and rewritten (the heartbeat, a takeover) only if it is still
the version this run last saw, each in one request that GCS carries out or refuses whole (a write
conditioned on the object's generation), so two runs never both hold it. A run that is gone is told
apart by its process (on the same host) or by its heartbeat, as on a mount.

Evaluation and export only read checkpoints and take no lock: they run beside a trainer. With
several processes, process 0 holds the lock for all of them.
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

from grain_jax import files
from grain_jax.errors import ArgumentError, UserError, check_writable
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


def _parse(content: bytes) -> dict:
  """The record in a lock's `content`; {} when it is empty or does not parse."""
  try:
    record = json.loads(content.decode() or "{}")
  except (ValueError, UnicodeDecodeError):
    return {}
  return record if isinstance(record, dict) else {}


def _encode(record: dict) -> bytes:
  return json.dumps(record).encode().ljust(_RECORD_BYTES)


def _read(fd: int) -> dict:
  """The record in the open lock file `fd`."""
  return _parse(os.pread(fd, 4 * _RECORD_BYTES, 0))


def _write(fd: int, record: dict) -> None:
  os.pwrite(fd, _encode(record), 0)
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


def _process_id(pid: int) -> str:
  """`<boot id>/<start time>` of the process `pid` ("" where /proc does not say): a pid that another
  process took since (after a reboot, in a restarted container) gives another."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      boot = f.read().strip()
    with open(f"/proc/{pid}/stat") as f:
      start = f.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime, counted from the state (3)
  except (OSError, IndexError):
    return ""
  return f"{boot}/{start}"


def _gone_why(holder: dict, flocked: bool | None, stale_after_s: float) -> str:
  """Why the run of `holder` is gone ("" when it may be alive), the lock's flock being ours
  (`flocked`: True, or None without flock)."""
  if not holder:
    return "its lock file holds no record"
  if holder.get("host") == socket.gethostname():
    if flocked:
      return "its process no longer holds the lock"
    pid = int(holder.get("pid", 0))
    if not _alive(pid):
      return "its process no longer exists"
    if holder.get("process") and _process_id(pid) not in ("", holder["process"]):
      return f"its pid {pid} is another process's now"
    return ""
  age = time.time() - float(holder.get("heartbeat", 0))
  return f"its heartbeat is {age:.0f} s old" if age > stale_after_s else ""


class WorkdirLock:
  """The lock of a workdir, held by this process (see the module doc). A subclass keeps its record
  where it lives (a flocked file, an object in a bucket): `_problem()`, `_rewrite()`, `_remove()`."""

  def __init__(self, path: str, record: dict, heartbeat_s: float):
    self.path, self.record = path, record
    self.lost = ""  # why the lock is no longer this run's; set by the heartbeat or verify()
    self._mutex = threading.Lock()  # the heartbeat's rewrite and verify()'s reading, one at a time
    self._stop = threading.Event()
    self._heartbeat = threading.Thread(
      target=self._beat, args=(heartbeat_s,), daemon=True, name="grain_jax_workdir_lock"
    )
    self._heartbeat.start()

  def _problem(self) -> str:
    """Why the lock is no longer this run's, "" while it is."""
    raise NotImplementedError

  def _rewrite(self) -> None:
    """Writes `self.record` over the lock (setting `self.lost` when that shows it is no longer ours)."""
    raise NotImplementedError

  def _remove(self) -> None:
    raise NotImplementedError

  def _deleted(self) -> str:
    return f"{self.path} was deleted while this run held it (was the workdir deleted or moved?)"

  def _taken_over(self, holder: dict) -> str:
    return f"another run took {self.path} over ({describe(holder)})"

  def _beat(self, heartbeat_s: float) -> None:
    while not self._stop.wait(heartbeat_s):
      with self._mutex:
        self.lost = self.lost or self._problem()
        if self.lost:
          return
        self.record["heartbeat"] = time.time()
        self._rewrite()

  def check(self) -> None:
    """Raises WorkdirLostError when the heartbeat found the lock gone (reads no file)."""
    if self.lost:
      raise WorkdirLostError(f"{self.lost}: this run stops rather than write where no run will find it")

  def verify(self) -> None:
    """Raises WorkdirLostError unless the lock is still this run's (asks the file system or bucket)."""
    with self._mutex:
      self.lost = self.lost or self._problem()
    self.check()

  def release(self) -> None:
    self._stop.set()
    self._heartbeat.join()
    if not self.lost and not self._problem():
      self._remove()


class _FileLock(WorkdirLock):
  """A lock file, flocked through `fd` while this run holds it."""

  def __init__(self, path: str, fd: int, record: dict, heartbeat_s: float):
    self._fd = fd
    super().__init__(path, record, heartbeat_s)

  def _problem(self) -> str:
    try:
      same_file = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
    except FileNotFoundError:
      return self._deleted()
    holder = _read(self._fd)
    return self._taken_over(holder) if not same_file or not _same_run(holder, self.record) else ""

  def _rewrite(self) -> None:
    _write(self._fd, self.record)

  def _remove(self) -> None:
    os.remove(self.path)

  def release(self) -> None:
    try:
      super().release()
    finally:
      os.close(self._fd)


class _ObjectLock(WorkdirLock):
  """A lock object in a bucket whose version (`generation`) this run wrote last."""

  def __init__(self, path: str, generation: str, record: dict, heartbeat_s: float):
    self._generation = generation
    super().__init__(path, record, heartbeat_s)

  def _problem(self) -> str:
    try:
      content, generation = files.read_object(self.path)
    except FileNotFoundError:
      return self._deleted()
    except Exception as error:  # noqa: BLE001 - the bucket out of reach: nothing known, ask again later
      logging.warning(
        "could not read the workdir lock %s (%s: %s); trying again", self.path, type(error).__name__, error
      )
      return ""
    return "" if generation == self._generation else self._taken_over(_parse(content))

  def _rewrite(self) -> None:
    try:
      self._generation = files.write_object(self.path, _encode(self.record), if_generation=self._generation)
    except FileExistsError:  # not the version this run wrote last: gone, or another run's
      self.lost = self._problem() or self._taken_over({})
    except Exception as error:  # noqa: BLE001 - the next heartbeat tries again
      logging.warning(
        "could not renew the workdir lock %s (%s: %s); trying again", self.path, type(error).__name__, error
      )

  def _remove(self) -> None:
    try:
      files.remove_object(self.path, if_generation=self._generation)
    except (FileExistsError, FileNotFoundError):
      pass  # another run's now, or gone


class _HeldByProcessZero:
  """What processes other than 0 hold: process 0 watches the lock for all."""

  def check(self) -> None:
    pass

  def verify(self) -> None:
    pass


def _new_record() -> dict:
  now = time.time()
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "process": _process_id(os.getpid()),
    "started": datetime.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
    "heartbeat": now,
  }


def _locked_error(workdir: str, path: str, holder: dict, stale_after_s: float) -> WorkdirLockedError:
  heartbeat = holder.get("heartbeat")
  seen = f", last heartbeat {time.time() - heartbeat:.0f} s ago" if isinstance(heartbeat, (int, float)) else ""
  return WorkdirLockedError(
    f"another training run holds the workdir {workdir} ({describe(holder)}{seen}): wait for it to end or stop "
    f"it; {path} of a run that is gone is taken over (on another host after {stale_after_s:.0f} s without its "
    "heartbeat). Evaluating beside it (--mode eval) needs no lock"
  )


def _took_over(workdir: str, holder: dict, gone: str) -> None:
  if holder:
    logging.warning(
      "took over the lock of the workdir %s from a run that is gone (%s: %s)", workdir, describe(holder), gone
    )


def acquire(workdir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S) -> WorkdirLock:
  """Takes `<workdir>/lock` (the folder exists, or `workdir` is gs://) for this process, or takes over
  a stale one (logged).

  Raises:
    WorkdirLockedError naming the holder when another run holds the workdir.
    ArgumentError when the workdir cannot be written (a read-only, archived run).
  """
  why = (
    "training writes its checkpoints, metrics and config there (--mode eval and --mode export read a "
    "read-only run, writing to --output-dir)"
  )
  if files.is_bucket(workdir):
    return _acquire_object(workdir, heartbeat_s, stale_after_s, why)
  check_writable(workdir, "--workdir", why)
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
    raise _locked_error(workdir, path, holder, stale_after_s)
  _took_over(workdir, holder, gone)
  record = _new_record()
  os.ftruncate(fd, _RECORD_BYTES)
  _write(fd, record)
  return _FileLock(path, fd, record, heartbeat_s)


def _acquire_object(workdir: str, heartbeat_s: float, stale_after_s: float, why: str) -> WorkdirLock:
  """`acquire` in a bucket: the object is written only if absent, or only over the version that was
  read and judged stale, so that of two runs trying at once one wins and the other is refused."""
  path, record = f"{workdir.rstrip('/')}/{LOCK_FILE}", _new_record()
  seen, holder, gone = "0", {}, ""  # "0": written only if there is no lock
  while True:
    try:
      generation = files.write_object(path, _encode(record), if_generation=seen)
    except FileExistsError:  # there is one (another version than the one judged stale)
      try:
        content, seen = files.read_object(path)
      except FileNotFoundError:
        seen = "0"  # released since
        continue
      holder = _parse(content)
      gone = _gone_why(holder, None, stale_after_s)
      if not gone:
        raise _locked_error(workdir, path, holder, stale_after_s) from None
      continue
    except OSError as error:  # no such bucket, no permission
      raise ArgumentError(
        f"--workdir {workdir} cannot be written ({type(error).__name__}: {' '.join(str(error).split())}): {why}"
      ) from error
    _took_over(workdir, holder, gone)
    return _ObjectLock(path, generation, record, heartbeat_s)


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
