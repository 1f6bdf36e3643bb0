"""launch/local_multiprocess.sh: two processes on localhost (gloo collectives) through the real entry
point train like one process, and a second invocation resumes from the checkpoint."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["--config", "configs/base.py:tiny", "--config.data.batch_size=8", "--config.train.num_steps=3",
        "--config.train.log_every=1", "--config.experiment.evaluate=False", "--config.optim.warmup_steps=1",
        "--config.data.synthetic.num_train=32", "--config.data.synthetic.images_per_class=1",
        "--config.data.synthetic.num_retrieval=2", "--config.data.synthetic.num_grounding=2"]
TIMEOUT_S = 600


def run(command: list[str], env: dict[str, str]) -> None:
  """Runs `command` in its own process group; on timeout the whole group (the launcher's
  training processes too) is killed."""
  process = subprocess.Popen(command, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
  try:
    output, _ = process.communicate(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    raise
  assert process.returncode == 0, output[-3000:]


def launch_two(workdir: str, *extra: str) -> None:
  """Two processes of two CPU devices each, through the launcher."""
  run(["bash", "launch/local_multiprocess.sh", "--processes", "2", "--devices-per-process", "2", "--",
       *ARGS, "--workdir", workdir, *extra], dict(PYTHON=sys.executable))


def metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("double"))
  launch_two(workdir)
  return workdir


def test_two_processes_train_like_one(double, tmp_path):
  single = str(tmp_path / "single")
  run([sys.executable, "-m", "grain_jax.main", *ARGS, "--workdir", single],
      dict(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4"))
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
