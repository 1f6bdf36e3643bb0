"""launch/tpu_pod.sh against a fake gcloud: the slice's state machine, and the commands it runs on the
workers executed here under bash (each fake worker a directory), with a fake trainer."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests" / "fakes"

# The fake trainer: prints its arguments, starts a child (as data loaders do) and runs until killed, or
# exits with the status in ~/exit_status, or kills itself with SIGKILL once ~/crash exists. It records
# its and its child's pids in ~/pids. Where ~/preemptible exists it answers SIGTERM as grain_jax.main
# does (says it saved, exits with status 75), and touches ~/ready once it does.
TRAINER = f"""#!/usr/bin/env bash
echo "trainer of worker $FAKE_WORKER_INDEX: $*"
if [[ -e "$HOME/exit_status" ]]; then
  exit "$(cat "$HOME/exit_status")"
fi
sleep 600 &
echo "$! $$" >>"$HOME/pids"
exec {sys.executable} -c 'import os, signal, sys, time
def save(*_):
  print("saved a checkpoint", flush=True)
  sys.exit(75)
if os.path.exists(os.path.expanduser("~/preemptible")):
  signal.signal(signal.SIGTERM, save)
  open(os.path.expanduser("~/ready"), "w").close()
while not os.path.exists(os.path.expanduser("~/crash")): time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)'
"""


class Pod:
  """A fake slice: `gcloud` answers from a scripted list of states and runs ssh commands locally."""

  def __init__(self, root: Path, workers: int):
    self.root = root
    self.workdir = root / "bucket" / "run"
    self.states = root / "states"
    self.gcloud_log = root / "gcloud.log"
    self.gcloud_log.touch()
    self.env = {
      "PATH": f"{FAKES}:/usr/bin:/bin",
      "FAKE_GCLOUD_LOG": str(self.gcloud_log),
      "FAKE_GCLOUD_STATES": str(self.states),
      "FAKE_ROOT": str(root),
      "FAKE_WORKERS": str(workers),
      "TPU_POD_POLL_SECONDS": "0",
      "TPU_WORKER_POLL_SECONDS": "0.05",
      "TMPDIR": str(root),
    }
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
    command = [
      "bash",
      str(REPO / "launch" / "tpu_pod.sh"),
      *args,
      "--name",
      "p",
      "--zone",
      "z",
      *(["--queued"] if queued else []),
    ]
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
@pytest.mark.parametrize(
  "queued, states, calls, status",
  [
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
    # A stopping slice is waited for; a stopped one is left to whoever stopped it.
    (False, ["STOPPING", "STOPPED"], [], 1),
    (False, ["SOMETHING_NEW"], [], 1),
  ],
)
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
  pod.script_states("STOPPED")
  result = pod.run("create")
  assert "TPU VM p is STOPPED" in result.stderr and "gcloud compute tpus tpu-vm start p --zone z" in result.stderr


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
  assert [line.split(" (run")[0] for line in lines] == [
    "worker 0: exited with status 143",
    "worker 1: exited with status 143",
  ]
  # Each worker's log reaches the shared workdir, and nobody counts a requested stop as a failure.
  [run_logs] = (pod.workdir / "logs").iterdir()
  assert sorted(path.name for path in run_logs.iterdir()) == ["worker-0.log", "worker-1.log"]
  assert (
    (run_logs / "worker-1.log")
    .read_text()
    .startswith("trainer of worker 1: -m grain_jax.main --config configs/base.py:tiny --workdir")
  )


def test_a_failing_worker_stops_the_others(pod):
  (pod.worker_home(1) / "exit_status").write_text("3")
  pod.script_states("READY")
  assert pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny").returncode == 0
  lines = pod.wait_for_status("worker 0: exited", "worker 1: exited with status 3")
  assert lines[0].endswith("; stopped because worker 1 failed (status 3)"), lines
  assert not any(alive(pid) for pid in trainer_pids(pod, 2))
  [run_logs] = (pod.workdir / "logs").iterdir()
  assert sorted(path.name for path in run_logs.iterdir()) == ["worker-0.log", "worker-1.failed", "worker-1.log"]


def test_a_trainer_killed_by_a_signal_counts_as_failed(pod):
  """A trainer that dies from a signal while its supervisor is outside `wait -n` (here: often, with a
  0.01 s poll) has its job dropped by bash; the supervisor must still record its status and fail the
  run. The race is microseconds wide: without the supervisor's liveness check this test fails only now
  and then (a supervisor alone with a 0.01 s poll hung in about 1 run of 30 under bash 5.1 and 5.2)."""
  (pod.worker_home(1) / "crash").touch()
  pod.env["TPU_WORKER_POLL_SECONDS"] = "0.01"
  pod.script_states("READY")
  assert pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny").returncode == 0
  lines = pod.wait_for_status("worker 0: exited", "worker 1: exited with status 137")
  assert lines[0].endswith("; stopped because worker 1 failed (status 137)"), lines


def test_a_preemption_notice_reaches_the_trainers_which_save_and_do_not_fail(pod):
  """A maintenance event or spot preemption sends SIGTERM: the supervisors pass it on to their
  trainers instead of dying, and a trainer's status 75 (saved on the notice) fails no one."""
  for index in range(2):
    (pod.worker_home(index) / "preemptible").touch()
  pod.script_states("READY")
  assert pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny").returncode == 0
  deadline = time.monotonic() + 20
  while not all((pod.worker_home(index) / "ready").exists() for index in range(2)):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  for index in range(2):
    os.kill(int((pod.worker_home(index) / "grain-jax-run" / "supervisor.pid").read_text().split()[0]), signal.SIGTERM)
  lines = pod.wait_for_status("worker 0: exited with status 75", "worker 1: exited with status 75")
  assert all(line.endswith("; saved a checkpoint on a preemption notice (SIGTERM to this worker)") for line in lines)
  [run_logs] = (pod.workdir / "logs").iterdir()
  assert sorted(path.name for path in run_logs.iterdir()) == ["worker-0.log", "worker-1.log"]
  assert (run_logs / "worker-0.log").read_text().endswith("saved a checkpoint\n")


def test_status_before_any_run_and_without_a_project(pod):
  assert pod.status_lines() == ["worker 0: not started", "worker 1: not started"]
  (pod.worker_home(1) / "grain-jax" / "launch").unlink()
  assert pod.status_lines() == [
    "worker 0: not started",
    "worker 1: no grain-jax/launch/tpu_worker.sh (setup has not run here)",
  ]
  (pod.worker_home(0) / "grain-jax" / "launch").unlink()
  assert pod.run("stop").returncode == 0


def test_a_bucket_url_is_no_workdir(pod):
  """The supervisors share logs and failure files through the file system: a gs:// workdir would become
  a local folder named `gs:`; the launcher and the worker refuse it."""
  pod.script_states("READY")
  result = pod.run("run", "--workdir", "gs://b/run", "--config", "configs/base.py:tiny")
  assert result.returncode == 2 and "--workdir gs://b/run: a URL" in result.stderr
  assert not pod.gcloud_calls("ssh")
  worker = subprocess.run(
    ["bash", "launch/tpu_worker.sh", "start", "--workdir", "gs://b/run", "--run", "r", "--", "true"],
    cwd=pod.worker_home(0) / "grain-jax",
    env={**pod.env, "HOME": str(pod.worker_home(0)), "FAKE_WORKER_INDEX": "0"},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert worker.returncode == 2 and "give the bucket's mount such as /gcs/BUCKET" in worker.stderr
  assert not list(pod.worker_home(0).rglob("gs:"))


def checkout(root: Path) -> Path:
  """A git checkout holding only a link to this project's launch scripts."""
  root.mkdir()
  subprocess.run(["git", "init", "-q"], cwd=root, check=True)
  (root / "launch").symlink_to(REPO / "launch")
  return root


def test_setup_refuses_a_large_checkout_before_archiving_it(pod, tmp_path):
  root = checkout(tmp_path / "checkout")
  (root / "photos").mkdir()
  # Enough files that their sizes, sorted, overflow a pipe: `sort | head -n 5` died of SIGPIPE there.
  for index in range(4000):
    (root / "photos" / f"an-image-with-a-rather-long-name-{index:05d}.jpg").write_bytes(b"x" * 100)
  (root / "photos" / "big.tar").write_bytes(b"x" * 2_000_000)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "tar").write_text('#!/bin/sh\ntouch "$0.ran"\nexec /usr/bin/tar "$@"\n')
  (bin_dir / "tar").chmod(0o755)
  result = subprocess.run(
    ["bash", str(root / "launch" / "tpu_pod.sh"), "setup", "--name", "p", "--zone", "z", "--max-archive-mb", "1"],
    env={**pod.env, "PATH": f"{bin_dir}:{pod.env['PATH']}"},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1, result.stderr
  assert "more than --max-archive-mb 1 MB" in result.stderr and ".gitignore" in result.stderr
  assert "photos/big.tar" in result.stderr.splitlines()[1]
  assert not (bin_dir / "tar.ran").exists()
  assert not list(tmp_path.glob("grain-jax-*.tar.gz"))
  assert not pod.gcloud_calls("scp") and not pod.gcloud_calls("ssh")


def test_a_failed_copy_leaves_no_archive(pod, tmp_path):
  root = checkout(tmp_path / "checkout")
  (root / "README.md").write_text("small\n")
  result = subprocess.run(
    ["bash", str(root / "launch" / "tpu_pod.sh"), "setup", "--name", "p", "--zone", "z"],
    env={**pod.env, "FAKE_SCP_FAILS": "1"},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode != 0 and pod.gcloud_calls("scp")
  assert not list(tmp_path.glob("grain-jax-*.tar.gz"))


def test_data_and_runs_are_not_shipped():
  paths = [
    "shards/cc12m/shard-00000.array_record",
    "runs/demo/metrics.jsonl",
    "photos/shard-00001.array_record",
    "grain-jax-1234.log",
  ]
  result = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True)
  assert result.stdout.split() == paths
  dockerignore = (REPO / ".dockerignore").read_text().split()
  assert {"runs", "shards", "**/*.array_record", ".venv", ".git", "grain-jax-*.log"} <= set(dockerignore)


def test_a_stale_pid_after_a_reboot_is_not_signalled(pod):
  """A maintenance reboot leaves ~/grain-jax-run behind, and its pids may now be unrelated processes':
  stop must not signal them, and start must not take them for a running trainer."""
  unrelated = subprocess.Popen(["sleep", "600"], start_new_session=True)
  try:
    state = pod.worker_home(0) / "grain-jax-run"
    state.mkdir()
    (state / "run").write_text("earlier\n")
    for name, recorded in [
      ("trainer.pid", f"{unrelated.pid} an-earlier-boot 12345"),
      ("supervisor.pid", f"{unrelated.pid}"),
    ]:  # as the format before boot ids
      (state / name).write_text(recorded + "\n")
    assert pod.run("stop").returncode == 0
    assert alive(unrelated.pid)
    assert pod.status_lines()[0].startswith("worker 0: ended without recording a status (run earlier)")
    pod.script_states("READY")
    result = pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny")
    assert result.returncode == 0, result.stderr
    pod.wait_for_status("worker 0: running", "worker 1: running")
    assert pod.run("stop").returncode == 0
    assert alive(unrelated.pid)
  finally:
    unrelated.kill()
    unrelated.wait()


def test_up_without_a_workdir_creates_no_slice(pod):
  pod.script_states("ERROR:NOT_FOUND")
  result = pod.run("up")
  assert result.returncode == 2 and "up needs --workdir or --bucket" in result.stderr
  assert not pod.gcloud_log.read_text()


def test_workers_that_started_are_stopped_when_another_cannot_start(pod):
  """Worker 1 has no project: worker 0's trainer would wait for it in jax.distributed.initialize."""
  (pod.worker_home(1) / "grain-jax" / "launch").unlink()
  pod.script_states("READY")
  result = pod.run("run", "--workdir", str(pod.workdir), "--config", "configs/base.py:tiny")
  assert result.returncode == 1 and "a worker could not start run" in result.stderr
  lines = pod.status_lines()
  assert lines[0].startswith("worker 0: exited") and lines[0].endswith("stopped by launch/tpu_worker.sh stop"), lines
  assert not any(alive(pid) for pid in trainer_pids(pod, 2))


def test_setup_replaces_the_workers_copy_and_keeps_its_environment(pod, tmp_path):
  """Extracting over the old copy left files deleted from the project behind; .venv is kept."""
  root = tmp_path / "checkout"
  (root / "launch").mkdir(parents=True)
  subprocess.run(["git", "init", "-q"], cwd=root, check=True)
  for script in (REPO / "launch").iterdir():
    if script.name != "install.sh":
      (root / "launch" / script.name).symlink_to(script)
  (root / "launch" / "install.sh").write_text('touch "$HOME/installed-$1"\n')
  (root / "README.md").write_text("new\n")
  old = pod.worker_home(0) / "grain-jax"
  (old / "deleted_since.py").write_text("old\n")
  (old / ".venv" / "marker").write_text("kept\n")
  result = subprocess.run(
    ["bash", str(root / "launch" / "tpu_pod.sh"), "setup", "--name", "p", "--zone", "z"],
    env=pod.env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  for index in range(2):
    copy = pod.worker_home(index) / "grain-jax"
    assert (copy / "README.md").read_text() == "new\n" and not (copy / "deleted_since.py").exists()
    home = pod.worker_home(index)
    assert (home / "installed-tpu").exists() and not (home / "grain-jax.new").exists()
  assert (old / ".venv" / "marker").read_text() == "kept\n"
