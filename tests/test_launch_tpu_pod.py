"""launch/tpu_pod.sh against a fake gcloud: the slice's state machine, and the commands it runs on the
workers executed here under bash (each fake worker a directory), with a fake trainer."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests" / "fakes"

# The fake trainer: prints its arguments, starts a child (as data loaders do) and runs until killed, or
# exits with the status in ~/exit_status. It records its and its child's pids in ~/pids.
TRAINER = f"""#!/usr/bin/env bash
echo "trainer of worker $FAKE_WORKER_INDEX: $*"
if [[ -e "$HOME/exit_status" ]]; then
  exit "$(cat "$HOME/exit_status")"
fi
sleep 600 &
echo "$! $$" >>"$HOME/pids"
exec {sys.executable} -c 'import time
while True: time.sleep(0.05)'
"""


class Pod:
  """A fake slice: `gcloud` answers from a scripted list of states and runs ssh commands locally."""

  def __init__(self, root: Path, workers: int):
    self.root = root
    self.workdir = root / "bucket" / "run"
    self.states = root / "states"
    self.gcloud_log = root / "gcloud.log"
    self.gcloud_log.touch()
    self.env = {"PATH": f"{FAKES}:/usr/bin:/bin", "FAKE_GCLOUD_LOG": str(self.gcloud_log),
                "FAKE_GCLOUD_STATES": str(self.states), "FAKE_ROOT": str(root), "FAKE_WORKERS": str(workers),
                "TPU_POD_POLL_SECONDS": "0", "TPU_WORKER_POLL_SECONDS": "0.05", "TMPDIR": str(root)}
    for index in range(workers):
      project = root / f"worker-{index}" / "grain-jax"
      (project / ".venv" / "bin").mkdir(parents=True)
      (project / "launch").symlink_to(REPO / "launch")
      trainer = project / ".venv" / "bin" / "python"
      trainer.write_text(TRAINER)
      trainer.chmod(0o755)

  def script_states(self, *states: str) -> None:
    self.states.write_text("\n".join(states) + "\n")

  def run(self, *args: str, queued: bool = False) -> subprocess.CompletedProcess:
    command = ["bash", str(REPO / "launch" / "tpu_pod.sh"), *args, "--name", "p", "--zone", "z",
               *(["--queued"] if queued else [])]
    return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)

  def gcloud_calls(self, verb: str) -> list[str]:
    return [line for line in self.gcloud_log.read_text().splitlines() if line.split()[3:4] == [verb]]

  def worker_home(self, index: int) -> Path:
    return self.root / f"worker-{index}"

  def status_lines(self) -> list[str]:
    self.script_states("READY")
    result = self.run("status")
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[1:]

  def wait_for_status(self, *expected: str) -> list[str]:
    """The workers' status lines once each starts with the expected text (a few seconds at most)."""
    deadline = time.monotonic() + 20
    while True:
      lines = self.status_lines()
      if len(lines) == len(expected) and all(line.startswith(text) for line, text in zip(lines, expected)):
        return lines
      assert time.monotonic() < deadline, lines
      time.sleep(0.05)


def alive(pid: int) -> bool:
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(")", 1)[1].split()[0] != "Z"


def trainer_pids(pod: Pod, workers: int) -> list[int]:
  pids = []
  for index in range(workers):
    pid_file = pod.worker_home(index) / "pids"
    if pid_file.exists():
      pids += [int(pid) for pid in pid_file.read_text().split()]
  return pids


@pytest.fixture
def pod(tmp_path):
  pod = Pod(tmp_path, workers=2)
  yield pod
  for pid in trainer_pids(pod, 2):
    if alive(pid):
      os.kill(pid, 9)


# The slice's state machine: (queued?, the states `describe` reports in turn, the gcloud verbs called
# besides describe, the exit status).
@pytest.mark.parametrize("queued, states, calls, status", [
    # A queued request keeps its place: re-running waits for it instead of deleting it.
    (True, ["ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], [], 0),
    (True, ["ERROR:NOT_FOUND", "CREATING", "ACCEPTED", "ACTIVE"], ["create"], 0),
    # A spot request whose slice was preempted is deleted and requested again.
    (True, ["SUSPENDED", "DELETING", "ERROR:NOT_FOUND", "ACCEPTED", "ACTIVE"], ["delete", "create"], 0),
    (True, ["SUSPENDING", "SUSPENDED", "ERROR:NOT_FOUND", "ACTIVE"], ["delete", "create"], 0),
    # A request that fails or is suspended while this run waits for it ends the wait with an error.
    (True, ["ERROR:NOT_FOUND", "ACCEPTED", "FAILED"], ["create"], 1),
    (True, ["ERROR:NOT_FOUND", "WAITING_FOR_RESOURCES", "SUSPENDED"], ["create"], 1),
    # A slice being created or repaired is waited for, never deleted.
    (False, ["CREATING", "REPAIRING", "READY"], [], 0),
    (False, ["PREEMPTED", "ERROR:NOT_FOUND", "READY"], ["delete", "create"], 0),
    (False, ["ERROR:NOT_FOUND", "READY"], ["create"], 0),
    # Failing to ask is not "absent"; an unknown state is not deleted.
    (False, ["ERROR:PERMISSION_DENIED"], [], 1),
    (True, ["ERROR:UNAVAILABLE"], [], 1),
    (False, ["STOPPED"], [], 1),
])
def test_create_follows_the_slice_state_machine(pod, queued, states, calls, status):
  pod.script_states(*states)
  result = pod.run("create", queued=queued)
  assert result.returncode == status, result.stderr
  verbs = [line.split()[3] for line in pod.gcloud_log.read_text().splitlines() if line.split()[3] != "describe"]
  assert verbs == calls
  if status:
    assert states[-1].removeprefix("ERROR:") in result.stderr


def test_create_says_why_it_gives_up(pod):
  pod.script_states("ERROR:NOT_FOUND", "ACCEPTED", "FAILED")
  result = pod.run("create", queued=True)
  assert "queued resource p is FAILED after it was requested" in result.stderr
  assert "gcloud compute tpus queued-resources describe p --zone z" in result.stderr
  pod.script_states("ERROR:PERMISSION_DENIED")
  result = pod.run("create")
  assert "cannot read the state of TPU VM p: ERROR:" in result.stderr


def test_stop_leaves_no_trainer_process(pod):
  pod.script_states("READY")
  assert pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny").returncode == 0
  pod.wait_for_status("worker 0: running", "worker 1: running")
  deadline = time.monotonic() + 20
  while len(pids := trainer_pids(pod, 2)) < 4:  # the trainers write them once they run
    assert time.monotonic() < deadline
    time.sleep(0.05)
  assert all(alive(pid) for pid in pids)

  assert pod.run("stop").returncode == 0
  assert not any(alive(pid) for pid in pids)
  lines = pod.status_lines()
  assert all(line.endswith("; stopped by launch/tpu_worker.sh stop") for line in lines), lines
  assert [line.split(" (run")[0] for line in lines] == ["worker 0: exited with status 143",
                                                      "worker 1: exited with status 143"]
  # Each worker's log reaches the shared workdir, and nobody counts a requested stop as a failure.
  [run_logs] = (pod.workdir / "logs").iterdir()
  assert sorted(path.name for path in run_logs.iterdir()) == ["worker-0.log", "worker-1.log"]
  assert (run_logs / "worker-1.log").read_text().startswith(
      "trainer of worker 1: -m grain_jax.main --config configs/base.py:tiny --workdir")


def test_a_failing_worker_stops_the_others(pod):
  (pod.worker_home(1) / "exit_status").write_text("3")
  pod.script_states("READY")
  assert pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny").returncode == 0
  lines = pod.wait_for_status("worker 0: exited", "worker 1: exited with status 3")
  assert lines[0].endswith("; stopped because worker 1 failed (status 3)"), lines
  assert not any(alive(pid) for pid in trainer_pids(pod, 2))
  [run_logs] = (pod.workdir / "logs").iterdir()
  assert sorted(path.name for path in run_logs.iterdir()) == ["worker-0.log", "worker-1.failed", "worker-1.log"]


def test_status_before_any_run_and_stop_without_a_project(pod):
  assert pod.status_lines() == ["worker 0: not started", "worker 1: not started"]
  for index in range(2):
    (pod.worker_home(index) / "grain-jax" / "launch").unlink()
  assert pod.run("stop").returncode == 0


def test_setup_refuses_a_large_archive(pod):
  result = pod.run("setup", "--max-archive-mb", "1")
  assert result.returncode == 1
  assert "above --max-archive-mb 1" in result.stderr and ".gitignore" in result.stderr
  assert not pod.gcloud_calls("scp") and not pod.gcloud_calls("ssh")


def test_data_and_runs_are_not_shipped():
  paths = ["shards/cc12m/shard-00000.array_record", "runs/demo/metrics.jsonl", "photos/shard-00001.array_record"]
  result = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
  assert result.stdout.split() == paths
  dockerignore = (REPO / ".dockerignore").read_text().split()
  assert {"runs", "shards", "**/*.array_record", ".venv", ".git"} <= set(dockerignore)
