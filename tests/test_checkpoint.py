"""Checkpoints on a tiny state (no model): checksums, non-finite values, mismatches, what is moved aside
and what is not, a kill during an asynchronous save and what it leaves, a save that fails."""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import grain
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import fill_the_disk_at, flip_bytes
from grain_jax.train.checkpoint import (
  CHECKSUMS,
  UNREADABLE,
  Checkpointer,
  CheckpointMismatchError,
  CheckpointReadError,
  CheckpointSaveError,
  NoReadableCheckpointError,
)
from grain_jax.train.step import TrainState

NOISE = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)


def state(step: int, value: float = 1.0, shape=(4, 3)) -> TrainState:
  """`noise` does not compress: its array data fills most of the largest file, where flip_bytes hits."""
  return TrainState(
    step=jnp.int32(step),
    params={"w": jnp.full(shape, value), "b": jnp.zeros(3), "noise": jnp.asarray(NOISE)},
    opt_state={"mu": jnp.zeros(shape)},
    skipped_steps=jnp.int32(0),
  )


def data(num_workers: int = 0):
  dataset = grain.MapDataset.range(10).to_iter_dataset()
  if num_workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(dataset)


def save(directory, *states, async_save=False):
  checkpointer = Checkpointer(str(directory), keep=5, async_save=async_save)
  for s in states:
    checkpointer.save(s, data())
  checkpointer.close()


def restore(directory, like=None, read_only=False, iterator=None):
  checkpointer = Checkpointer(str(directory), keep=5, async_save=False, read_only=read_only)
  restored = checkpointer.restore_latest(like or state(0))
  if restored is not None:
    checkpointer.restore_data(int(restored.step), iterator or data())
  checkpointer.close()
  return restored


def test_a_save_holds_the_checksums_of_its_arrays(tmp_path):
  save(tmp_path, state(1), state(2))
  for step in ("1", "2"):
    assert os.path.isdir(tmp_path / step / CHECKSUMS)
  assert int(restore(tmp_path).step) == 2


def test_flipped_bytes_are_caught_and_the_checkpoint_moved_aside(tmp_path, caplog):
  save(tmp_path, state(1), state(2, value=2.0))
  flip_bytes(str(tmp_path / "2"))
  assert int(restore(tmp_path).step) == 1
  assert os.path.isdir(tmp_path / UNREADABLE / "2") and not os.path.exists(tmp_path / "2")
  assert "step 2" in caplog.text and f"do not match their {CHECKSUMS}" in caplog.text and "MB" in caplog.text
  save(tmp_path, state(2, value=3.0))  # the step number is free again: no StepAlreadyExistsError
  np.testing.assert_array_equal(restore(tmp_path).params["w"], 3.0)


def test_the_newest_checkpoint_corrupted_after_a_kill_is_caught(tmp_path):
  """No close(), no later save: nothing after the save itself may be needed to verify it."""
  checkpointer = Checkpointer(str(tmp_path), keep=5, async_save=True)
  checkpointer.save(state(1), data())
  checkpointer.save(state(2, value=2.0), data())
  checkpointer.manager.wait_until_finished()  # committed, as a kill right after the commit leaves it
  flip_bytes(str(tmp_path / "2"))
  assert int(restore(tmp_path).step) == 1
  assert os.path.isdir(tmp_path / UNREADABLE / "2")


def test_non_finite_values_make_a_checkpoint_unreadable(tmp_path, caplog):
  save(tmp_path, state(1), state(2, value=np.nan))
  assert int(restore(tmp_path).step) == 1
  assert "not finite" in caplog.text and os.path.isdir(tmp_path / UNREADABLE / "2")


def truncate(step_dir):
  """Empties the files of the checkpoint's state (not its array data): Orbax no longer reads it."""
  for name in os.listdir(os.path.join(step_dir, "state")):
    if os.path.isfile(os.path.join(step_dir, "state", name)):
      open(os.path.join(step_dir, "state", name), "wb").close()


def test_a_checkpoint_that_does_not_read_is_moved_aside_when_an_older_one_restores(tmp_path, caplog):
  save(tmp_path, state(1), state(2, value=2.0), state(3, value=3.0))
  truncate(str(tmp_path / "3"))
  truncate(str(tmp_path / "2"))
  np.testing.assert_array_equal(restore(tmp_path).params["w"], 1.0)
  assert sorted(os.listdir(tmp_path)) == ["1", UNREADABLE] and sorted(os.listdir(tmp_path / UNREADABLE)) == ["2", "3"]
  assert "step 3" in caplog.text and "does not read" in caplog.text and "step 1 restores intact" in caplog.text
  save(tmp_path, state(2, value=4.0))  # the step number is free again: no StepAlreadyExistsError
  np.testing.assert_array_equal(restore(tmp_path).params["w"], 4.0)


@pytest.mark.parametrize("steps", [(1,), (1, 2)])
def test_checkpoints_that_do_not_read_stop_with_the_newest_and_nothing_is_moved(tmp_path, steps):
  save(tmp_path, *(state(step) for step in steps))
  for step in steps:
    truncate(str(tmp_path / str(step)))
  with pytest.raises(CheckpointReadError, match=f"step {steps[-1]} .*does not read.*were not moved"):
    restore(tmp_path)
  assert sorted(os.listdir(tmp_path)) == [str(step) for step in steps]


def test_a_data_position_of_other_workers_stops_names_the_field_and_moves_nothing(tmp_path):
  save(tmp_path, state(1), state(2))
  with pytest.raises(CheckpointMismatchError, match=r"config\.data\.num_workers.*Nothing was moved"):
    restore(tmp_path, iterator=data(num_workers=1))
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_read_only_skips_an_unreadable_checkpoint_without_moving_it(tmp_path):
  save(tmp_path, state(1), state(2))
  flip_bytes(str(tmp_path / "2"))
  assert int(restore(tmp_path, read_only=True).step) == 1
  assert os.path.isdir(tmp_path / "2") and not os.path.exists(tmp_path / UNREADABLE)


def test_a_checkpoint_of_other_shapes_stops_and_names_the_differences(tmp_path):
  save(tmp_path, state(1))
  like = state(0, shape=(5, 3))._replace(params={"w": jnp.ones((5, 3)), "b": jnp.zeros(3), "new": jnp.zeros(2)})
  with pytest.raises(
    CheckpointMismatchError,
    match=r"params/w: checkpoint \(4, 3\), config \(5, 3\).*params/new"
    r".*new --workdir",
  ):
    restore(tmp_path, like)
  assert os.path.isdir(tmp_path / "1") and not os.path.exists(tmp_path / UNREADABLE)


def test_only_unreadable_checkpoints_stop_the_run(tmp_path):
  save(tmp_path, state(1))
  flip_bytes(str(tmp_path / "1"))
  with pytest.raises(NoReadableCheckpointError, match=f"step 1: 1 arrays do not match their {CHECKSUMS}"):
    restore(tmp_path)
  assert os.path.isdir(tmp_path / UNREADABLE / "1")
  assert restore(tmp_path) is None  # told once; the run after it starts from step 0


def test_a_kill_during_an_asynchronous_save_resumes_from_the_previous_checkpoint(tmp_path):
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path[:0] = [{os.getcwd()!r}, {os.path.join(os.getcwd(), "tests")!r}]
      from tests.test_checkpoint import Checkpointer, data, state
      import jax.numpy as jnp
      checkpointer = Checkpointer({str(tmp_path)!r}, keep=5, async_save=True)
      checkpointer.save(state(1), data())
      big = state(2)._replace(opt_state={{"mu": jnp.ones((4, 3))}}, params={{"w": jnp.ones((4, 3)),
                                                                           "b": jnp.zeros(3), "x": jnp.ones(2**24)}})
      checkpointer.save(big, data())  # waits for step 1 to commit, then starts writing step 2
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert result.returncode == -9, result.stderr[-2000:]
  assert any(ocp.path.atomicity_types.TMP_DIR_SUFFIX in name for name in os.listdir(tmp_path))
  assert int(restore(tmp_path).step) == 1
  assert sorted(os.listdir(tmp_path)) == ["1"]  # the unfinished save was removed
  save(tmp_path, state(2, value=5.0))
  np.testing.assert_array_equal(restore(tmp_path).params["w"], 5.0)


def bytes_read() -> int:
  """Bytes this process has read through system calls (Linux), page cache hits included."""
  with open("/proc/self/io") as f:
    return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read through /proc/self/io (Linux)")
def test_restoring_the_parameters_reads_and_verifies_no_optimizer_state(tmp_path):
  moments = np.random.default_rng(1).normal(size=(512, 1024)).astype(np.float32)  # 2 MiB that do not compress
  saved = state(1)._replace(opt_state={"mu": jnp.asarray(moments)})
  save(tmp_path, saved)
  flip_bytes(os.path.join(tmp_path, "1"))  # the moments fill the largest data file
  like = {name: jnp.zeros_like(value) for name, value in saved.params.items()}
  before = bytes_read()
  checkpointer = Checkpointer(str(tmp_path), keep=5, async_save=False, read_only=True)
  step, params = checkpointer.restore_latest_params(like)
  checkpointer.close()
  assert bytes_read() - before < moments.nbytes / 10
  assert step == 1
  for name, value in saved.params.items():
    np.testing.assert_array_equal(params[name], value)
  before = bytes_read()
  with pytest.raises((NoReadableCheckpointError, CheckpointReadError)):  # the whole state: the moments are damaged
    restore(tmp_path, like=saved, read_only=True)
  assert bytes_read() - before > moments.nbytes / 2


def test_restoring_the_parameters_verifies_their_checksums(tmp_path):
  save(tmp_path, state(1))
  path = os.path.join(tmp_path, "1", CHECKSUMS, "metadata")
  with open(path) as f:
    saved = json.load(f)
  saved["params/w"] ^= 1
  with open(path, "w") as f:
    json.dump(saved, f)
  checkpointer = Checkpointer(str(tmp_path), keep=5, async_save=False, read_only=True)
  with pytest.raises(NoReadableCheckpointError, match="params/w"):
    checkpointer.restore_latest_params({name: jnp.zeros_like(value) for name, value in state(1).params.items()})
  checkpointer.close()


def test_folders_of_saves_that_never_committed_are_removed_by_a_writer_only(tmp_path, caplog):
  save(tmp_path, state(1))
  unfinished = tmp_path / f"2{ocp.path.atomicity_types.TMP_DIR_SUFFIX}-1733450000"
  (unfinished / "state").mkdir(parents=True)
  (unfinished / "state" / "data").write_bytes(b"x" * 2**20)
  assert int(restore(tmp_path, read_only=True).step) == 1
  assert unfinished.exists()  # evaluation beside a trainer must not touch its save in progress
  with caplog.at_level(logging.WARNING):
    assert int(restore(tmp_path).step) == 1
  assert sorted(os.listdir(tmp_path)) == ["1"]
  assert f"removed {unfinished} (1.0 MB): a save that never committed" in caplog.text


@pytest.fixture
def disk_full_at_step_2(monkeypatch):
  fill_the_disk_at(2, monkeypatch)


FAILED_SAVE = (
  r"^saving the checkpoint of step 2 in .* failed \(.*No space left on device.*\); training stopped; the "
  r"newest committed checkpoint is step 1, where running the same command again resumes"
)


def test_a_synchronous_save_that_fails_names_the_newest_committed_step(tmp_path, disk_full_at_step_2):
  checkpointer = Checkpointer(str(tmp_path), keep=5, async_save=False)
  checkpointer.save(state(1), data())
  with pytest.raises(CheckpointSaveError, match=FAILED_SAVE):
    checkpointer.save(state(2), data())
  checkpointer.close()


def test_an_asynchronous_save_that_fails_is_reported_by_check(tmp_path, disk_full_at_step_2):
  checkpointer = Checkpointer(str(tmp_path), keep=5, async_save=True)
  checkpointer.save(state(1), data())
  checkpointer.save(state(2), data())  # waits for step 1 to commit; step 2 fails in the background
  with pytest.raises(CheckpointSaveError, match=FAILED_SAVE):
    for _ in range(1000):
      checkpointer.check()  # at once while the save is in progress
      time.sleep(0.01)
  checkpointer.check()  # reported once
  checkpointer.close()
