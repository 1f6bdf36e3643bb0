"""launch/local_multiprocess.sh: two processes on localhost (gloo collectives) through the real entry
point train like one process, and a second invocation resumes from the checkpoint. A preemption notice
(SIGTERM) to one process makes both save the same step and stop. Without
the launcher, the survivor of a killed process stops after config.train.heartbeat_timeout_s."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TIMEOUT_S, TWO_PROCESSES, finish, tiny_run_flags

pytestmark = pytest.mark.integration

ARGS = tiny_run_flags(3)
HEARTBEAT_S = 5
# One of two processes started by `grain_jax.main.initialize_distributed` (argv: process id, port);
# process 0 then waits at a barrier that process 1, killed by the test, never reaches.
PEER = f"""
import sys, time
import ml_collections
from jax.experimental import multihost_utils
from grain_jax.main import initialize_distributed
initialize_distributed(ml_collections.ConfigDict(dict(
    multiprocess=True, coordinator_address="127.0.0.1:" + sys.argv[2], num_processes=2,
    process_id=int(sys.argv[1]), heartbeat_timeout_s={HEARTBEAT_S}, initialization_timeout_s=int(sys.argv[3]))))
multihost_utils.sync_global_devices("started")
print("started", flush=True)
if sys.argv[1] == "0":
  multihost_utils.sync_global_devices("never reached")
time.sleep({TIMEOUT_S})
"""


def run(command: list[str], env: dict[str, str]) -> None:
  """Runs `command` in its own process group; on timeout the whole group (the launcher's
  training processes too) is killed."""
  finish(
    subprocess.Popen(
      command,
      env=dict(os.environ, **env),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
  )


def launch_two(workdir: str, *extra: str) -> None:
  """Two processes of two CPU devices each, through the launcher."""
  run(
    [
      *TWO_PROCESSES,
      *ARGS,
      "--workdir",
      workdir,
      *extra,
    ],
    dict(PYTHON=sys.executable),
  )


def metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("double"))
  launch_two(workdir)
  return workdir


def test_two_processes_train_like_one(double, tmp_path):
  single = str(tmp_path / "single")
  run(
    [sys.executable, "-m", "grain_jax.main", *ARGS, "--workdir", single],
    dict(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4"),
  )
  single_losses = [line["loss"] for line in metrics(single)]
  assert len(single_losses) == 3
  np.testing.assert_allclose([line["loss"] for line in metrics(double)], single_losses, rtol=1e-4)


def test_a_second_launch_resumes_from_the_checkpoint(double):
  before = metrics(double)
  launch_two(double, "--config.train.num_steps=4")
  after = metrics(double)
  assert after[:3] == before
  assert [line["step"] for line in after] == [1, 2, 3, 4]
  assert np.isfinite(after[-1]["loss"])
  assert "4" in os.listdir(os.path.join(double, "checkpoints"))


def children(pid: int) -> list[int]:
  """The processes whose parent is `pid`, in the order they started."""
  found = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
      continue
    if int(fields[1]) == pid:
      found.append((int(fields[19]), int(entry)))
  return [child for _, child in sorted(found)]


def test_a_notice_to_one_process_makes_both_save_the_same_step(tmp_path):
  workdir = str(tmp_path / "preempted")
  args = tiny_run_flags(1000)
  launcher = subprocess.Popen(
    [
      *TWO_PROCESSES,
      *args,
      "--workdir",
      workdir,
    ],
    env=dict(os.environ, PYTHON=sys.executable),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + TIMEOUT_S
    rows = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(rows) and len(open(rows).readlines()) >= 2):
      assert launcher.poll() is None and time.monotonic() < deadline
      time.sleep(0.1)
    os.kill(children(launcher.pid)[-1], signal.SIGTERM)  # process 1 only; process 0 writes the rows
    output, _ = launcher.communicate(timeout=TIMEOUT_S)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert launcher.returncode == 75, output[-3000:]
  [saved] = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
  # One checkpoint, of the last step either process ran (resuming from it: tests/test_preemption.py).
  assert [line["step"] for line in metrics(workdir)] == list(range(1, saved + 1))


def free_port() -> str:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return str(probe.getsockname()[1])


def test_a_process_whose_peer_never_joins_stops_after_the_initialization_timeout():
  """config.train.initialization_timeout_s reaches jax.distributed.initialize (pods that start far apart
  need more than JAX's 300 s)."""
  started = time.monotonic()
  alone = subprocess.run(
    [sys.executable, "-c", PEER, "0", free_port(), "3"],
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1"),
    timeout=120,
  )
  assert alone.returncode != 0 and "started" not in alone.stdout
  assert time.monotonic() - started < 60


def test_a_survivor_stops_after_the_heartbeat_timeout(tmp_path):
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  logs = [open(tmp_path / f"process{index}.log", "w") for index in range(2)]
  survivor = subprocess.Popen(
    [sys.executable, "-c", PEER, "0", port, "300"], env=env, stdout=logs[0], stderr=subprocess.STDOUT
  )
  peer = subprocess.Popen(
    [sys.executable, "-c", PEER, "1", port, "300"], env=env, stdout=subprocess.PIPE, stderr=logs[1], text=True
  )
  try:
    # Gloo prints to stdout as well; an empty line is the end: the peer failed to start.
    lines = iter(peer.stdout.readline, "")
    assert "started\n" in lines, (tmp_path / "process1.log").read_text()[-3000:]
    peer.kill()
    killed = time.monotonic()
    survivor.wait(timeout=HEARTBEAT_S + 60)
    waited = time.monotonic() - killed
  finally:
    for process in (survivor, peer):
      process.kill()
      process.wait()
    for log in logs:
      log.close()
  assert survivor.returncode != 0
  assert waited < HEARTBEAT_S + 10, f"the survivor stopped {waited:.1f} s after its peer was killed"
