"""Faults of a run of two CPU processes through launch/local_multiprocess.sh: a process killed during an
asynchronous save, a corrupt newest checkpoint both processes see, and a SIGTERM during a save. Each
ends in the state a restart resumes from bitwise (the per-array checksums saved with the final
checkpoint equal those of an uninterrupted run), or, after a SIGTERM, in a committed checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TIMEOUT_S, TWO_PROCESSES, finish, flip_bytes, tiny_run_flags

pytestmark = pytest.mark.integration

STEPS = 6
HEARTBEAT_S = 20  # config.train.heartbeat_timeout_s's default
ARGS = [*tiny_run_flags(STEPS), "--config.train.checkpoint_every=2"]


def launch(workdir: Path, *extra: str) -> subprocess.Popen:
  """Two processes of two CPU devices each, in a process group of their own."""
  return subprocess.Popen(
    [
      *TWO_PROCESSES,
      *ARGS,
      *extra,
      "--workdir",
      str(workdir),
    ],
    env=dict(os.environ, PYTHON=sys.executable),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def checksums(workdir: Path, step: int = STEPS) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "checksums" / "metadata").read_text())


def committed(workdir: Path) -> list[int]:
  return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())


def processes(launcher: subprocess.Popen) -> list[int]:
  """The launcher's training processes (its children), process 0 first."""
  found = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == launcher.pid:
      found.append((int(fields[19]), int(entry)))
  return [pid for _, pid in sorted(found)]


def when_saving(launcher: subprocess.Popen, workdir: Path, step: int) -> None:
  """Returns as soon as the save of `step` has begun and not committed: Orbax writes a checkpoint
  into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once every process has written."""
  checkpoints = workdir / "checkpoints"
  deadline = time.monotonic() + TIMEOUT_S
  while not (checkpoints.exists() and any(path.name.startswith(f"{step}.") for path in checkpoints.iterdir())):
    assert launcher.poll() is None, launcher.stdout.read()[-4000:]
    assert time.monotonic() < deadline
    time.sleep(0.002)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  finish(launch(workdir))
  return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict:
  return checksums(uninterrupted_run)


def test_a_process_killed_during_a_save_stops_the_other_and_a_restart_resumes_bitwise(tmp_path, uninterrupted):
  launcher = launch(tmp_path)
  try:
    when_saving(launcher, tmp_path, 4)
    os.kill(processes(launcher)[1], signal.SIGKILL)
    killed = time.monotonic()
    output, _ = launcher.communicate(timeout=TIMEOUT_S)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode not in (0, 75), output[-4000:]
  assert time.monotonic() - killed < HEARTBEAT_S, "the other process outlived the heartbeat timeout"
  last = committed(tmp_path)[-1]
  assert last < STEPS
  output = finish(launch(tmp_path))
  assert output.count(f"restored the checkpoint at step {last}") == 2, output[-4000:]
  assert checksums(tmp_path) == uninterrupted


def test_a_corrupt_newest_checkpoint_is_set_aside_once_and_both_resume_from_the_same_step(
  tmp_path, uninterrupted_run, uninterrupted
):
  shutil.copytree(uninterrupted_run, tmp_path, dirs_exist_ok=True)
  flip_bytes(tmp_path / "checkpoints" / str(STEPS))
  output = finish(launch(tmp_path))
  assert output.count(f"restored the checkpoint at step {STEPS - 2}") == 2, output[-4000:]
  assert output.count("moved to") == 1
  assert sorted(path.name for path in (tmp_path / "checkpoints" / "unreadable").iterdir()) == [str(STEPS)]
  assert checksums(tmp_path) == uninterrupted


def test_a_sigterm_during_a_save_still_saves_and_exits_75(tmp_path):
  """The notice reaches one process while the save of step 2 is in flight; both save the step they agree
  on after it (resuming from such a checkpoint: tests/test_multiprocess.py, tests/test_preemption.py)."""
  launcher = launch(tmp_path, "--config.train.num_steps=1000")
  try:
    when_saving(launcher, tmp_path, 2)
    os.kill(processes(launcher)[1], signal.SIGTERM)
    output = finish(launcher, status=75)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  saved = int((tmp_path / "preempted").read_text())
  assert saved >= 2 and committed(tmp_path)[-1] == saved, output[-4000:]
  assert (tmp_path / "checkpoints" / str(saved) / "checksums" / "metadata").exists()
