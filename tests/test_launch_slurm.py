"""launch/slurm_gpu.sbatch and launch/slurm_task.sh under simulated SLURM variables, with a fake srun
and scontrol: each task's GPUs, srun's CPUs per task, and the save and requeue before the time limit."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FAKES = REPO / "tests" / "fakes"
EIGHT = "0,1,2,3,4,5,6,7"


def task_devices(variables: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", "launch/slurm_task.sh", "printenv", "JAX_LOCAL_DEVICE_IDS"],
    cwd=REPO,
    env={"PATH": "/usr/bin:/bin", **variables},
    capture_output=True,
    text=True,
    timeout=30,
  )


@pytest.mark.parametrize(
  "variables, devices",
  [
    # One process per GPU, every task seeing the node's 8: the GPU of its local rank.
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="8(x2)",
        SLURM_NODEID="1",
        SLURM_LOCALID="5",
        CUDA_VISIBLE_DEVICES=EIGHT,
        SLURM_STEP_GPUS=EIGHT,
      ),
      "5",
    ),
    # One process per node drives all 8.
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="1(x2)",
        SLURM_NODEID="0",
        SLURM_LOCALID="0",
        CUDA_VISIBLE_DEVICES=EIGHT,
        SLURM_STEP_GPUS=EIGHT,
      ),
      EIGHT,
    ),
    # --ntasks=16 --gres=gpu:4 (no --ntasks-per-node, no --gpus-per-node): 4 tasks on each of 4 nodes.
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="4(x4)",
        SLURM_NODEID="3",
        SLURM_LOCALID="2",
        CUDA_VISIBLE_DEVICES="0,1,2,3",
        SLURM_JOB_GPUS="0,1,2,3",
      ),
      "2",
    ),
    # Tasks spread unevenly over the nodes: node 2 has 2 tasks.
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="3,2(x2)",
        SLURM_NODEID="2",
        SLURM_LOCALID="1",
        CUDA_VISIBLE_DEVICES="0,1",
        SLURM_STEP_GPUS="0,1",
      ),
      "1",
    ),
    # Two tasks sharing a node's 8 GPUs: 4 each.
    (dict(SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0", SLURM_LOCALID="1", CUDA_VISIBLE_DEVICES=EIGHT), "4,5,6,7"),
    # Bound tasks (--gpus-per-task, --gpu-bind) see their own GPUs, numbered from 0.
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="8",
        SLURM_NODEID="0",
        SLURM_LOCALID="6",
        CUDA_VISIBLE_DEVICES="6",
        SLURM_STEP_GPUS=EIGHT,
      ),
      "0",
    ),
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="4",
        SLURM_NODEID="0",
        SLURM_LOCALID="3",
        CUDA_VISIBLE_DEVICES="6,7",
        SLURM_STEP_GPUS=EIGHT,
      ),
      "0,1",
    ),
    # No CUDA_VISIBLE_DEVICES: the step's GPUs on this node.
    (dict(SLURM_STEP_TASKS_PER_NODE="4", SLURM_NODEID="0", SLURM_LOCALID="3", SLURM_STEP_GPUS="4,5,6,7"), "3"),
    # Set by hand: kept.
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="8",
        SLURM_NODEID="0",
        SLURM_LOCALID="3",
        CUDA_VISIBLE_DEVICES=EIGHT,
        JAX_LOCAL_DEVICE_IDS="7",
      ),
      "7",
    ),
  ],
)
def test_each_task_drives_the_gpus_it_sees(variables, devices):
  result = task_devices(variables)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == devices


@pytest.mark.parametrize(
  "variables, message",
  [
    (dict(SLURM_STEP_TASKS_PER_NODE="8", SLURM_NODEID="0", SLURM_LOCALID="0", SLURM_PROCID="0"), "sees no GPU"),
    (
      dict(
        SLURM_STEP_TASKS_PER_NODE="3", SLURM_NODEID="0", SLURM_LOCALID="0", SLURM_PROCID="2", CUDA_VISIBLE_DEVICES=EIGHT
      ),
      "task 2 on node 0: 3 tasks on this node cannot split its 8 GPUs evenly",
    ),
  ],
)
def test_a_task_whose_gpus_cannot_be_assigned_fails(variables, message):
  result = task_devices(variables)
  assert result.returncode == 2 and message in result.stderr


@pytest.fixture
def cluster(tmp_path):
  # The fake trainer runs while $KEEP_RUNNING exists, then exits with $EXIT_STATUS; on SIGTERM (or
  # exiting with 75) it "saves" as grain_jax.main does: process 0 writes <workdir>/preempted, and it
  # exits with 75. $ON_TERM replaces that answer to SIGTERM.
  python = tmp_path / "python"
  python.write_text(
    '#!/usr/bin/env bash\necho "process $SLURM_PROCID devices $JAX_LOCAL_DEVICE_IDS: $*"\n'
    "while [[ $# -gt 0 ]]; do\n"
    '  case "$1" in --workdir) workdir="$2" ;; --workdir=*) workdir="${1#--workdir=}" ;; esac; shift\n'
    "done\n"
    'save() { echo "process $SLURM_PROCID saved"; [[ "$SLURM_PROCID" != 0 ]] || echo 12 >"$workdir/preempted"; '
    "exit 75; }\n"
    'trap "${ON_TERM:-save}" TERM\n'
    'while [[ -e "$KEEP_RUNNING" ]]; do sleep 0.05; done\n'
    '[[ "${EXIT_STATUS:-0}" != 75 ]] || save\nexit "${EXIT_STATUS:-0}"\n'
  )
  python.chmod(0o755)
  (tmp_path / "run").mkdir()
  env = {
    "PATH": f"{FAKES}:/usr/bin:/bin",
    "PYTHON": str(python),
    "FAKE_SRUN_LOG": str(tmp_path / "srun.log"),
    "FAKE_SRUN_TASKS": str(tmp_path / "tasks"),
    "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
    "FAKE_SCANCEL_LOG": str(tmp_path / "scancel.log"),
    "KEEP_RUNNING": str(tmp_path / "keep_running"),
    "SLURM_JOB_ID": "77",
    "SLURM_CPUS_PER_TASK": "12",
  }
  return tmp_path, env


def test_sbatch_gives_srun_the_cpus_and_each_task_its_gpus(cluster):
  tmp_path, env = cluster
  # --ntasks=4 --gres=gpu:2 on 2 nodes: SLURM_NTASKS_PER_NODE and SLURM_GPUS_PER_NODE are unset.
  (tmp_path / "tasks").write_text(
    "".join(
      f"SLURM_PROCID={2 * node + local} SLURM_NODEID={node} SLURM_LOCALID={local} SLURM_STEP_TASKS_PER_NODE=2(x2) "
      "CUDA_VISIBLE_DEVICES=0,1 SLURM_STEP_GPUS=0,1\n"
      for node in range(2)
      for local in range(2)
    )
  )
  workdir = tmp_path / "run"
  (workdir / "preempted").write_text("3\n")  # a previous run's
  result = subprocess.run(
    ["bash", "launch/slurm_gpu.sbatch", "--workdir", str(workdir)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines() == [
    f"process {index} devices {index % 2}: -m grain_jax.main --workdir {workdir} --config.train.multiprocess=True"
    for index in range(4)
  ]
  assert (tmp_path / "srun.log").read_text().split()[-1] == "SRUN_CPUS_PER_TASK=12"
  header = (REPO / "launch" / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --open-mode=append" in header
  assert not (tmp_path / "scontrol.log").exists()


ONE_TASK = "SLURM_PROCID=0 SLURM_NODEID=0 SLURM_LOCALID=0 SLURM_STEP_TASKS_PER_NODE=1(x2) CUDA_VISIBLE_DEVICES=0\n"
TWO_TASKS = ONE_TASK + ONE_TASK.replace("PROCID=0", "PROCID=1").replace("NODEID=0", "NODEID=1")


@pytest.mark.parametrize("on_term, requeued", [("save", True), ("exit 3", False)])
def test_the_time_limit_signal_makes_the_trainers_save_then_requeues_the_job(cluster, on_term, requeued):
  """Requeued once the trainers saved; a trainer that fails instead is not started again."""
  tmp_path, env = cluster
  (tmp_path / "tasks").write_text(ONE_TASK)
  (tmp_path / "keep_running").touch()
  job = subprocess.Popen(
    ["bash", "launch/slurm_gpu.sbatch", f"--workdir={tmp_path / 'run'}"],
    cwd=REPO,
    env={**env, "ON_TERM": on_term},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + 20
    while not (tmp_path / "srun.log.task").exists():
      assert time.monotonic() < deadline and job.poll() is None
      time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=20)
    # The trainer got SIGTERM through scancel (the batch script's own signal is USR1).
    assert (tmp_path / "scancel.log").read_text() == "--signal=TERM 77\n"
    assert (tmp_path / "scontrol.log").exists() == requeued
    if requeued:
      assert stdout.splitlines()[-1] == "process 0 saved"
      assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"
      assert job.returncode == 0 and "the trainers saved step 12 on a preemption notice" in stderr
    else:
      assert job.returncode == 3, stderr
  finally:
    if job.poll() is None:
      os.killpg(job.pid, signal.SIGKILL)


@pytest.mark.parametrize("exit_status, requeued", [(75, True), (3, False), (0, False)])
def test_trainers_that_saved_on_a_notice_are_requeued_and_failures_are_not(cluster, exit_status, requeued):
  """Two tasks under srun's --kill-on-bad-exit: the first to exit gets the second killed, so srun's
  status is the kill's (137), not 75; the marker decides."""
  tmp_path, env = cluster
  (tmp_path / "tasks").write_text(TWO_TASKS)
  result = subprocess.run(
    ["bash", "launch/slurm_gpu.sbatch", "--workdir", str(tmp_path / "run")],
    cwd=REPO,
    env={**env, "EXIT_STATUS": str(exit_status)},
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert result.returncode == (0 if requeued or exit_status == 0 else 137), result.stderr
  assert (tmp_path / "scontrol.log").exists() == requeued
  assert not (tmp_path / "scancel.log").exists()


def test_the_batch_script_needs_the_workdir(cluster):
  tmp_path, env = cluster
  (tmp_path / "tasks").write_text(ONE_TASK)
  result = subprocess.run(
    ["bash", "launch/slurm_gpu.sbatch", "--config", "configs/base.py:tiny"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert result.returncode == 2 and "missing --workdir DIR" in result.stderr
  assert not (tmp_path / "srun.log").exists()
