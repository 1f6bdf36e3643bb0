"""A preemption notice: a training process whose process group (it and its data workers) gets SIGTERM
saves at the step it reached, marks the workdir, and exits with status 75; resuming goes on from
that step with none lost. A Ctrl-C (SIGINT to the group) saves too and exits with 130, and a second
one stops the process at once."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from grain_jax.config import load_config
from grain_jax.train import preemption, trainer
from grain_jax.train.preemption import INTERRUPTED_STATUS, PREEMPTED_STATUS, PreemptionNotice

pytestmark = pytest.mark.integration

OVERRIDES = dict(
  data=dict(
    batch_size=8, num_workers=1, synthetic=dict(num_train=32, images_per_class=1, num_retrieval=2, num_grounding=2)
  ),
  train=dict(num_steps=1000, log_every=1, checkpoint_every=1000, peak_flops_per_device=1e12),
  experiment=dict(evaluate=False),
  optim=dict(warmup_steps=1),
)
TIMEOUT_S = 600


def flags(tree: dict, prefix: str = "--config") -> list[str]:
  """`--config.a.b=value` for every leaf of `tree`."""
  return [
    flag
    for name, value in tree.items()
    for flag in (flags(value, f"{prefix}.{name}") if isinstance(value, dict) else [f"{prefix}.{name}={value}"])
  ]


def apply(config: ml_collections.ConfigDict, tree: dict) -> None:
  for name, value in tree.items():
    if isinstance(value, dict):
      apply(config[name], value)
    else:
      config[name] = value


def rows(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def signalled(workdir: str, signum: int) -> tuple[str, int, str]:
  """A run of `python -m grain_jax.main` with a data worker process, whose process group is sent
  `signum` once it has logged two steps (as launchers and terminals do): (workdir, its exit status,
  its output)."""
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "grain_jax.main",
      "--config",
      "configs/base.py:tiny",
      "--workdir",
      workdir,
      *flags(OVERRIDES),
    ],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + TIMEOUT_S
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
      assert process.poll() is None and time.monotonic() < deadline
      time.sleep(0.1)
    os.killpg(process.pid, signum)
    output, _ = process.communicate(timeout=TIMEOUT_S)
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
  return workdir, process.returncode, output


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  return signalled(str(tmp_path_factory.mktemp("preempted")), signal.SIGTERM)


def test_a_notice_saves_the_step_reached_and_exits_with_its_status(preempted):
  workdir, status, output = preempted
  assert status == PREEMPTED_STATUS, output[-3000:]
  [saved] = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
  logged = [row["step"] for row in rows(workdir)]
  assert saved >= 2 and logged == list(range(1, saved + 1))
  assert f"preempted: saved the checkpoint of step {saved}" in output
  assert open(os.path.join(workdir, preemption.MARKER)).read() == f"{saved}\n"


def test_the_report_logs_mfu_when_the_peak_is_given(preempted):
  """config.train.peak_flops_per_device set on a CPU: the step's FLOPs are counted and mfu logged."""
  assert all(0 < row["mfu"] < 1 for row in rows(preempted[0]))


def test_resuming_after_a_notice_loses_no_step_and_a_notice_at_the_last_step_is_no_preemption(preempted, monkeypatch):
  workdir = preempted[0]
  saved = rows(workdir)[-1]["step"]
  config = load_config("configs/base.py:tiny")
  apply(config, OVERRIDES)
  asked = []
  monkeypatch.setattr(PreemptionNotice, "reached", lambda self, step: asked.append(step) or step == saved + 2)
  _, metrics = trainer.train(config, workdir, stop_at_step=saved + 2)
  assert asked == [saved + 1, saved + 2]
  assert [row["step"] for row in rows(workdir)] == list(range(1, saved + 3))
  assert np.isfinite(metrics["loss"])
  assert not os.path.exists(os.path.join(workdir, preemption.MARKER))


def test_a_single_process_catches_sigterm_only_while_it_trains():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionNotice() as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert notice.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_ctrl_c_saves_the_step_reached_and_exits_with_130(tmp_path):
  workdir, status, output = signalled(str(tmp_path), signal.SIGINT)
  assert status == INTERRUPTED_STATUS, output[-3000:]
  [saved] = [int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit()]
  assert saved >= 2 and [row["step"] for row in rows(workdir)] == list(range(1, saved + 1))
  assert f"interrupted: saved the checkpoint of step {saved}" in output and "Traceback" not in output
  assert not os.path.exists(os.path.join(workdir, preemption.MARKER))  # a user stopped it: no launcher restarts it
  assert not any(
    ocp.path.atomicity_types.TMP_DIR_SUFFIX in name for name in os.listdir(os.path.join(workdir, "checkpoints"))
  )


def test_a_ctrl_c_is_caught_only_while_training_and_a_second_one_stops_at_once():
  before = signal.getsignal(signal.SIGINT)
  with PreemptionNotice() as notice:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert notice.reached(2) and notice.interrupted
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # a second Ctrl-C is not caught
  assert signal.getsignal(signal.SIGINT) is before
  script = textwrap.dedent("""
      import os, signal, time
      from grain_jax.train.preemption import PreemptionNotice
      with PreemptionNotice() as notice:
        os.kill(os.getpid(), signal.SIGINT)
        print("saving" if notice.reached(1) else "not told", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)  # a save that takes long
        print("still running", flush=True)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert result.returncode == -signal.SIGINT and result.stdout == "saving\n", result.stderr[-2000:]
