"""Training: exact resume, checkpoint fallback, a changed config, what stops a run before it writes (a
config error, another run in the workdir, a checkpoint past num_steps) and during it (a failed save,
the workdir deleted), non-finite skipping, weight-decay mask, accumulation."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fill_the_disk_at, flip_bytes
from grain_jax import main
from grain_jax.config import ConfigError, load_config, validate
from grain_jax.data import pipeline, text_packing
from grain_jax.models.grain import build_model
from grain_jax.train import optim, trainer, workdir_lock
from grain_jax.train.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointSaveError
from grain_jax.train.metrics_writer import MetricsWriter, drop_rows_after
from grain_jax.train.step import TrainState, make_train_step, split_micro_batches
from grain_jax.train.step_report import StepReport

pytestmark = pytest.mark.integration

NUM_STEPS = 6


def train_config(**train_overrides):
  config = load_config("configs/base.py:tiny")
  config.mesh.update(data=8)
  config.data.batch_size = 8
  config.data.synthetic.update(num_train=64, images_per_class=2, num_retrieval=4, num_grounding=4)
  config.train.update(num_steps=NUM_STEPS, log_every=1, checkpoint_every=3, async_checkpointing=False)
  config.train.update(train_overrides)
  config.optim.warmup_steps = 2
  return config


def params_of(workdir):
  """The parameters of the newest checkpoint in `workdir`, as numpy leaves."""
  return [np.asarray(x) for x in jax.tree.leaves(read_checkpoint(workdir).params)]


def read_checkpoint(workdir) -> TrainState:
  config = train_config()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def init():
    model = build_model(config.model, config.seed)
    return trainer.init_state(model, optim.make_optimizer(nnx.state(model, nnx.Param), config.optim, NUM_STEPS))

  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), jax.eval_shape(init))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=3, async_save=False)
  iterator = iter(pipeline.train_dataset_from_config(config, pipeline.training_data_dir(config, workdir)))
  state = checkpointer.restore_latest(like)
  checkpointer.restore_data(int(state.step), iterator)
  checkpointer.close()
  return state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two runs of the same recipe: straight through, and stopped at step 3 then resumed."""
  root = tmp_path_factory.mktemp("runs")
  straight, resumed = str(root / "straight"), str(root / "resumed")
  _, straight_metrics = trainer.train(train_config(), straight)
  shutil.copytree(os.path.join(straight, "synthetic"), os.path.join(resumed, "synthetic"))
  trainer.train(train_config(), resumed, stop_at_step=3)
  _, resumed_metrics = trainer.train(train_config(), resumed)
  return straight, resumed, straight_metrics, resumed_metrics


def test_training_writes_logs_config_and_checkpoints(runs):
  straight = runs[0]
  lines = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
  assert [line["step"] for line in lines] == list(range(1, NUM_STEPS + 1))
  assert all(np.isfinite(line["loss"]) and line["skipped"] == 0 for line in lines)
  assert not any("mfu" in line for line in lines)  # no bf16 peak is known for a CPU
  assert os.listdir(os.path.join(straight, "tensorboard"))
  assert json.load(open(os.path.join(straight, "config.json")))["train"]["num_steps"] == NUM_STEPS
  assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["3", "6"]


def test_stop_and_resume_equals_training_straight_through(runs):
  straight, resumed, straight_metrics, resumed_metrics = runs
  assert straight_metrics["loss"] == resumed_metrics["loss"]
  for a, b in zip(params_of(straight), params_of(resumed), strict=True):
    np.testing.assert_array_equal(a, b)


def metric_steps(workdir):
  return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_run_goes_on(runs, tmp_path, caplog):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs[0], workdir)
  flip_bytes(os.path.join(workdir, "checkpoints", "6"))
  state = read_checkpoint(workdir)
  assert int(state.step) == 3
  assert "step 6" in caplog.text and "corrupt" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "unreadable", "6"))
  trainer.train(train_config(), workdir)  # saves step 6 again
  assert metric_steps(workdir) == list(range(1, NUM_STEPS + 1))  # the rows of steps 4-6 were not repeated
  for a, b in zip(params_of(runs[0]), params_of(workdir), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_model_stops_the_run_before_it_writes(runs, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs[0], workdir)
  before = {name: open(os.path.join(workdir, name)).read() for name in ("config.json", "metrics.jsonl")}
  config = train_config()
  config.model.decoder.depth += 1
  with pytest.raises(CheckpointMismatchError, match=r"step 6 .*params/decoder.*new --workdir"):
    trainer.train(config, workdir)
  assert {name: open(os.path.join(workdir, name)).read() for name in before} == before
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


def files_of(workdir) -> dict[str, float]:
  """Every file under `workdir` with its modification time."""
  return {
    os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
    for root, _, names in os.walk(workdir)
    for name in names
  }


@pytest.mark.parametrize("overrides", [dict(grad_accum_steps=3), dict(keep_checkpoints=0), dict(checkpoint_every=0)])
def test_a_config_error_stops_the_run_before_it_makes_the_workdir(tmp_path, overrides):
  with pytest.raises(
    ConfigError, match="|".join(f"config\\.train\\.{field}={value}" for field, value in overrides.items())
  ):
    main.run(train_config(**overrides), "train", str(tmp_path / "run"))
  assert os.listdir(tmp_path) == []


def test_a_second_trainer_in_the_workdir_stops_before_it_writes(runs, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs[0], workdir)
  before = files_of(workdir)
  with workdir_lock.held(workdir):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"holds the workdir {workdir} .*pid {os.getpid()}"):
      trainer.train(train_config(num_steps=NUM_STEPS + 3), workdir)
    assert {path: time for path, time in files_of(workdir).items() if not path.endswith("lock")} == before


def test_num_steps_below_the_newest_checkpoint_is_refused_before_it_writes(runs, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs[0], workdir)
  before = files_of(workdir)
  with pytest.raises(
    ConfigError,
    match=rf"num_steps={NUM_STEPS - 1} is below the step of the newest checkpoint in "
    rf".*, {NUM_STEPS}: nothing to train",
  ):
    trainer.train(train_config(num_steps=NUM_STEPS - 1), workdir)
  assert files_of(workdir) == before


def test_a_failed_asynchronous_save_stops_training_at_the_next_step(tmp_path, monkeypatch):
  """A full disk while step 4 is saved in the background: the run stops within a step or two, naming
  the cause and the newest committed step, instead of training on to the end."""
  fill_the_disk_at(4, monkeypatch)
  workdir = str(tmp_path / "run")
  with pytest.raises(
    CheckpointSaveError,
    match=r"^saving the checkpoint of step 4 in .* failed \(OSError: \[Errno 28\] "
    r"No space left on device\); .*newest committed checkpoint is step 2",
  ):
    trainer.train(train_config(num_steps=40, checkpoint_every=2, async_checkpointing=True), workdir)
  assert 4 <= max(metric_steps(workdir)) < 10
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:1] == ["2"]


def test_a_workdir_deleted_under_the_trainer_stops_it_before_the_next_save(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  ended = StepReport.ended

  def delete_the_workdir_after_step_1(self, step, *args):
    ended(self, step, *args)
    if step == 0:
      shutil.rmtree(workdir)

  monkeypatch.setattr(StepReport, "ended", delete_the_workdir_after_step_1)
  with pytest.raises(workdir_lock.WorkdirLostError, match=r"lock was deleted while this run held it"):
    trainer.train(train_config(num_steps=4, checkpoint_every=2), workdir)
  assert not os.path.exists(workdir)  # no checkpoint written where no run will find it


def test_a_changed_config_keeps_the_earlier_config_json(tmp_path):
  config = train_config()
  trainer.write_config(config, str(tmp_path))
  trainer.write_config(config, str(tmp_path))
  assert os.listdir(tmp_path) == ["config.json"]
  config.train.log_every = 2
  trainer.write_config(config, str(tmp_path))
  assert json.load(open(tmp_path / "config.1.json"))["train"]["log_every"] == 1
  assert json.load(open(tmp_path / "config.json"))["train"]["log_every"] == 2


def test_metrics_rows_past_the_restored_step_are_dropped(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  rows = "".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3, 4))
  path.write_text("garbage\n" + rows + '{"step": 5, "lo')
  drop_rows_after(str(path), 2)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
  assert f"{path}: dropped 2 lines" in caplog.text


def test_a_run_without_a_checkpoint_keeps_the_earlier_metrics(tmp_path):
  earlier = json.dumps({"step": 1, "loss": 1.0}) + "\n"
  (tmp_path / "metrics.jsonl").write_text(earlier)
  MetricsWriter(str(tmp_path), first_step=0).close()
  assert (tmp_path / "metrics.1.jsonl").read_text() == earlier
  assert not (tmp_path / "metrics.jsonl").exists()  # until this run writes its first row


def make_step(config):
  """(initial state, jitted step) for `config` on the default device."""
  model = build_model(config.model, config.seed)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(params, config.optim, NUM_STEPS)
  step_fn = jax.jit(
    make_train_step(graphdef, rest, tx, config, 1, optim.learning_rate_schedule(config.optim, NUM_STEPS))
  )
  return trainer.init_state(model, tx), step_fn


def raw_batch():
  """A batch of 8 examples as the input pipeline gives it."""
  rng = np.random.default_rng(0)
  ids = np.zeros((8, 16), np.int32)
  ids[:, 0], ids[:, 1:4], ids[:, 4] = 49406, rng.integers(1, 4000, (8, 3)), 49407
  return dict(
    image=rng.normal(size=(8, 32, 32, 3)).astype(np.float32),
    caption_ids=ids,
    boxes=np.tile(np.array([0.5, 0.5, 0.2, 0.3], np.float32), (8, 5, 1)),
    box_valid=np.arange(5)[None].repeat(8, 0) < 2,
    desc_ids=np.repeat(ids[:, None], 5, 1),
    desc_text_id=np.arange(40, dtype=np.int32).reshape(8, 5),
  )


def make_batch(groups=1):
  """`raw_batch()` with its texts packed in `groups` groups (one per micro-batch)."""
  return text_packing.pack_batch(raw_batch(), groups, 77)


@pytest.fixture(scope="module")
def step_setup():
  return (*make_step(train_config(grad_accum_steps=2)), make_batch(groups=2))


def test_a_non_finite_step_leaves_the_state_unchanged_and_is_counted(step_setup):
  state, step_fn, batch = step_setup
  bad = dict(batch, image=np.where(np.arange(32)[:, None, None] == 3, np.nan, batch["image"]).astype(np.float32))
  new_state, metrics = step_fn(state, bad)
  assert float(metrics["skipped"]) == 1 and int(new_state.skipped_steps) == 1 and int(new_state.step) == 1
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good_state, metrics = step_fn(new_state, batch)
  assert float(metrics["skipped"]) == 0 and int(good_state.skipped_steps) == 1
  # The skipped step did not advance the optimizer's schedule: the second step still runs at step 0's rate.
  schedule = optim.learning_rate_schedule(train_config().optim, NUM_STEPS)
  assert float(schedule(0)) != pytest.approx(float(schedule(1)))
  assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(0)))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss_rd"]) > 0


def test_bfloat16_compute_keeps_float32_parameters():
  config = train_config()
  config.model.dtype = "bfloat16"
  state, step_fn = make_step(config)
  new_state, metrics = step_fn(state, make_batch())
  assert np.isfinite(float(metrics["loss"])) and float(metrics["skipped"]) == 0
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params))]
  assert sum(changed) > len(changed) // 2


def test_micro_batches_interleave_the_shards():
  batch = dict(x=jnp.arange(8))
  np.testing.assert_array_equal(split_micro_batches(batch, 2, 2)["x"], [[0, 1, 4, 5], [2, 3, 6, 7]])
  np.testing.assert_array_equal(split_micro_batches(batch, 1, 4)["x"], [np.arange(8)])


def test_weight_decay_skips_biases_norms_and_logit_scale():
  config = load_config("configs/base.py:tiny")
  model = nnx.eval_shape(lambda: build_model(config.model, 0))
  decayed = {
    "/".join(map(str, path))
    for path, flag in nnx.to_flat_state(optim.weight_decay_mask(nnx.state(model, nnx.Param)))
    if flag
  }
  assert "visual/blocks/blocks/attn/qkv_kernel" in decayed and "text/token_embedding" in decayed
  assert "decoder/query_embed" in decayed and "decoder/proj/kernel" in decayed
  for name in (
    "logit_scale",
    "visual/blocks/blocks/attn/qkv_bias",
    "visual/blocks/blocks/norm1/scale",
    "decoder/layers/blocks/mlp/fc1/bias",
    "text/ln_final/scale",
    "visual/patch_bias",
  ):
    assert name not in decayed


def test_schedule_warms_up_then_decays_to_the_end_value():
  optim_config = load_config("configs/base.py:tiny").optim
  optim_config.update(warmup_steps=10, learning_rate=1e-3, warmup_init=1e-6, end_learning_rate=1e-5)
  schedule = optim.learning_rate_schedule(optim_config, 100)
  assert float(schedule(0)) == pytest.approx(1e-6, rel=1e-4)
  assert float(schedule(10)) == pytest.approx(1e-3, rel=1e-4)
  assert float(schedule(100)) == pytest.approx(1e-5, rel=1e-4)
  assert float(schedule(5)) < float(schedule(10)) and float(schedule(50)) < float(schedule(10))


def test_texts_are_packed_per_device_and_micro_batch_and_bad_splits_are_refused():
  config = train_config(grad_accum_steps=2)
  packed = trainer.pack_texts(raw_batch(), config, batch_shards=2)  # 4 groups of 2 examples
  for key, value in text_packing.pack_batch(raw_batch(), 4, 77).items():
    np.testing.assert_array_equal(packed[key], value, err_msg=key)
  config.mesh.update(data=-1)
  with pytest.raises(ConfigError, match=r"batch_size=8 does not split into 3 batch shards x .*grad_accum_steps=2"):
    validate(config, num_devices=3, training=True)
  six = {key: value[:6] for key, value in raw_batch().items()}
  with pytest.raises(ConfigError, match="holds 6 examples of each batch, not a multiple of the 4"):
    trainer.pack_texts(six, config, batch_shards=1)
