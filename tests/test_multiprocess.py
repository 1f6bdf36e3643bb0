"""Two processes on localhost (gloo collectives) through the real entry point equal one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ARGS = ["--config", "configs/base.py:tiny", "--config.data.batch_size=8", "--config.train.num_steps=3",
        "--config.train.log_every=1", "--config.experiment.evaluate=False", "--config.optim.warmup_steps=1",
        "--config.data.synthetic.num_train=32", "--config.data.synthetic.images_per_class=1",
        "--config.data.synthetic.num_retrieval=2", "--config.data.synthetic.num_grounding=2"]
TIMEOUT_S = 600


def launch(workdir: str, devices: int, extra: list[str]) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  return subprocess.Popen([sys.executable, "-m", "grain_jax.main", *ARGS, "--workdir", workdir, *extra],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
  output, _ = process.communicate(timeout=TIMEOUT_S)
  assert process.returncode == 0, output[-3000:]


def losses(workdir: str) -> list[float]:
  return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  single, double = str(tmp_path / "single"), str(tmp_path / "double")
  coordinator = f"--config.train.coordinator_address=127.0.0.1:{free_port()}"
  processes = [launch(double, 2, ["--config.train.multiprocess=True", coordinator,
                                  "--config.train.num_processes=2", f"--config.train.process_id={index}"])
               for index in range(2)]
  for process in processes:
    finish(process)
  finish(launch(single, 4, []))
  assert len(losses(single)) == 3
  np.testing.assert_allclose(losses(double), losses(single), rtol=1e-4)
