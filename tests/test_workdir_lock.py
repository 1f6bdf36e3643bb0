"""The workdir lock: a second run is refused naming the holder, a stale lock is taken over, the
heartbeat notices a deleted workdir or a lock taken over; a failed run removes the workdir it made."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import LOCK_HOLDER, until
from grain_jax.errors import ArgumentError
from grain_jax.train import workdir_files, workdir_lock
from grain_jax.train.workdir_lock import WorkdirLockedError, WorkdirLostError


def write_record(workdir, **record):
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(record, f)


def test_a_second_run_is_refused_naming_the_holder_and_takes_over_once_it_is_killed(tmp_path, caplog):
  holder = subprocess.Popen(
    [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)],
    stdout=subprocess.PIPE,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(
      WorkdirLockedError,
      match=rf"^another training run holds the workdir {tmp_path} \(host "
      rf"{socket.gethostname()}, pid {holder.pid}, started 20\d\d-[^)]*\)",
    ):
      workdir_lock.acquire(str(tmp_path))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.acquire(str(tmp_path))
  assert f"pid {holder.pid}" in caplog.text and "its process no longer holds the lock" in caplog.text
  lock.verify()
  lock.release()
  assert os.listdir(tmp_path) == []


def test_the_same_process_cannot_take_it_twice(tmp_path):
  with workdir_lock.held(str(tmp_path)):
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.acquire(str(tmp_path))
  workdir_lock.acquire(str(tmp_path)).release()  # released at the end of the block


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path, caplog):
  write_record(tmp_path, host="elsewhere", pid=1, started="yesterday", heartbeat=time.time() - 10)
  with pytest.raises(WorkdirLockedError, match=r"host elsewhere, pid 1, started yesterday, last heartbeat 1\d s ago"):
    workdir_lock.acquire(str(tmp_path))
  write_record(tmp_path, host="elsewhere", pid=1, started="yesterday", heartbeat=time.time() - 1000)
  lock = workdir_lock.acquire(str(tmp_path), stale_after_s=300)
  assert (
    "from a run that is gone (host elsewhere, pid 1, started yesterday: its heartbeat is 1000 s old)" in caplog.text
  )
  lock.release()


def test_the_heartbeat_notices_a_deleted_workdir(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  lock = workdir_lock.acquire(str(workdir), heartbeat_s=0.02)
  first = lock.record["heartbeat"]
  time.sleep(0.2)
  lock.check()
  assert lock.record["heartbeat"] > first  # it beats
  shutil.rmtree(workdir)
  until(lambda: lock.lost, "lost lock")
  with pytest.raises(WorkdirLostError, match=r"lock was deleted while this run held it .*workdir deleted"):
    lock.check()
  lock.release()


def test_a_lock_taken_over_is_noticed_before_a_save(tmp_path):
  lock = workdir_lock.acquire(str(tmp_path))
  lock.check()  # the heartbeat has not run: nothing known yet
  write_record(tmp_path, host="elsewhere", pid=7, started="now", heartbeat=time.time())
  with pytest.raises(WorkdirLostError, match=r"another run took .* over \(host elsewhere, pid 7"):
    lock.verify()
  lock.release()
  assert os.path.exists(os.path.join(tmp_path, workdir_lock.LOCK_FILE))  # the other run's


def test_a_read_only_workdir_is_refused_in_one_line(tmp_path, read_only):
  read_only(tmp_path)
  with pytest.raises(ArgumentError, match=rf"^--workdir {tmp_path} cannot be written .*--output-dir\)$"):
    workdir_lock.acquire(str(tmp_path))


def test_a_failed_body_removes_the_folders_it_made_while_empty(tmp_path):
  (tmp_path / "runs").mkdir()
  workdir = tmp_path / "runs" / "new" / "run"
  with pytest.raises(WorkdirLockedError):
    with workdir_files.created(str(workdir)), workdir_lock.held(str(workdir)):
      (workdir / "checkpoints").mkdir()  # what the checkpointer makes before the data fails to read
      raise WorkdirLockedError("a failure once the lock is held")
  assert os.listdir(tmp_path) == ["runs"] and os.listdir(tmp_path / "runs") == []
  with pytest.raises(ValueError):
    with workdir_files.created(str(workdir)):
      (workdir / "config.json").write_text("{}")
      raise ValueError("a failure after the run wrote something")
  assert os.listdir(workdir) == ["config.json"]
