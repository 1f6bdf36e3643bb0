"""The training loop: mesh, input, model, sharding, update step, checkpoints, logging.

One straight line from a config to a trained model, identical on a laptop CPU and a pod: only
the config (mesh, data paths, sizes) changes.
"""

import contextlib
import functools
import logging
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from grain_jax import files, sharding
from grain_jax.data import pipeline, text_packing
from grain_jax.errors import ConfigError
from grain_jax.models.grain import build_model
from grain_jax.torch_format import from_torch
from grain_jax.train import optim, preemption, workdir_files, workdir_lock
from grain_jax.train.checkpoint import Checkpointer, checkpoint_dir
from grain_jax.train.compiled_step import CompiledStep, wait_for_other_processes
from grain_jax.train.step import TrainState, make_train_step
from grain_jax.train.step_report import StepReport


def text_groups(config, batch_shards: int) -> int:
  """Into how many groups the global batch's texts are packed: one per device holding distinct rows
  and micro-batch (`grain_jax.config.validate(..., training=True)` has checked that the batch splits so)."""
  return batch_shards * config.train.grad_accum_steps


def pack_texts(batch: dict[str, np.ndarray], config, batch_shards: int) -> dict[str, np.ndarray]:
  """This process's batch with its captions and descriptions packed for one pass of the text tower
  (`text_packing.pack_batch`): one group per device and micro-batch, in the order the step splits
  the global batch; every process packs into the same number of rows."""
  per_group = config.data.batch_size // text_groups(config, batch_shards)
  examples = len(batch["caption_ids"])
  if examples % per_group:
    raise ConfigError(
      f"this process holds {examples} examples of each batch, not a multiple of the {per_group} "
      f"each device's micro-batch takes: give the mesh's batch axes (config.mesh) at least as "
      f"many devices as there are processes"
    )
  agree = None
  if jax.process_count() > 1:
    agree = lambda rows: int(np.max(multihost_utils.process_allgather(np.array(rows))))
  return text_packing.pack_batch(
    batch,
    examples // per_group,
    config.model.text.context_length,
    with_descriptions=config.model.kind == "grain",
    agree_rows=agree,
  )


def global_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows -> arrays sharded over the mesh's batch axes (`[B_global, ...]`)."""
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
  return {key: jax.make_array_from_process_local_data(batch_sharding, value) for key, value in batch.items()}


def optimizer_shardings(tx, params: nnx.State, mesh: jax.sharding.Mesh):
  """Shardings of `tx.init(params)` for `params` that carry shardings: the parameter-shaped parts
  (Adam's moments) laid out like the parameters, the rest (step counts) replicated.

  Left to `jax.jit`, the moments would be replicated on every device: they are `zeros_like` the
  parameters, so nothing propagates the parameters' layout to them.
  """
  return optax.tree_map_params(
    tx,
    lambda _, param_sharding: param_sharding,
    jax.eval_shape(tx.init, params),
    jax.tree.map(lambda x: x.sharding, params),
    transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
  )


def init_state(model: nnx.Module, tx, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """The step-0 TrainState; with `mesh`, the optimizer state is sharded like the parameters."""
  params = nnx.state(model, nnx.Param)
  init = jax.jit(tx.init) if mesh is None else jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=init(params), skipped_steps=jnp.zeros((), jnp.int32)
  )


def abstract_state(model: nnx.Module, tx, mesh: jax.sharding.Mesh) -> TrainState:
  """The step-0 TrainState as `jax.ShapeDtypeStruct`s with the shardings `init_state` gives."""
  params = nnx.state(model, nnx.Param)
  opt_state = jax.tree.map(
    lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
    jax.eval_shape(tx.init, params),
    optimizer_shardings(tx, params, mesh),
  )
  counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
  return TrainState(step=counter, params=params, opt_state=opt_state, skipped_steps=counter)


class Training(NamedTuple):
  """A model ready to train on a mesh.

  graphdef, rest: the model's structure and non-parameter state (`nnx.merge(graphdef, state.params,
    rest)` rebuilds it).
  state: the initial TrainState, sharded by the logical-axis rules.
  step_fn: the jitted `(state, global batch) -> (state, metrics)`; call it under
    `jax.set_mesh(mesh)` and `sharding.axis_rules(config.sharding_rules)`.
  flops_fn: the same step, not jitted, with `config.model.remat` off: its matmuls
    (`flops.matmul_flops(flops_fn, state, batch)`) are the step's model FLOPs, which do not count
    the forward pass that remat computes again in the backward pass.
  """

  graphdef: nnx.GraphDef
  rest: nnx.State
  state: TrainState
  step_fn: Callable
  flops_fn: Callable


def build_training(config, mesh: jax.sharding.Mesh, abstract: bool = False) -> Training:
  """Creates the model and optimizer state directly sharded over `mesh`, and the jitted step.

  With `abstract`, `state` holds only shapes and shardings (`jax.ShapeDtypeStruct`s) and no
  parameter is allocated: `step_fn.lower(state, batch).compile()` then builds the very program a
  real run executes (memory analysis of pod-sized configs on a small machine).
  """
  build = lambda: build_model(config.model, config.seed)
  create = sharding.create_abstract if abstract else sharding.create_sharded
  model = create(build, mesh, config.sharding_rules)
  model.train()
  num_steps = config.train.num_steps
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(params, config.optim, num_steps, config.model)
  state = (abstract_state if abstract else init_state)(model, tx, mesh)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  make_step = functools.partial(
    make_train_step,
    rest=rest,
    tx=tx,
    config=config,
    batch_shards=sharding.batch_shards(mesh, config.sharding_rules),
    learning_rate=optim.learning_rate_schedule(config.optim, num_steps),
  )
  step_fn = jax.jit(
    make_step(graphdef), in_shardings=(state_shardings, None), out_shardings=(state_shardings, None), donate_argnums=0
  )
  flops_fn = make_step(_without_remat(config) if config.model.remat else graphdef)
  return Training(graphdef, rest, state, step_fn, flops_fn)


def _without_remat(config) -> nnx.GraphDef:
  """The training-mode graphdef of `config.model` with remat off (the same parameters and state;
  only shapes are computed)."""
  model_config = config.model.copy_and_resolve_references()
  model_config.remat = False
  model = nnx.eval_shape(lambda: build_model(model_config, config.seed))
  model.train()
  return nnx.split(model, nnx.Param, ...)[0]


def write_config(config, workdir: str) -> None:
  """Writes `workdir/config.json`; an earlier, different one is kept as `config.<n>.json`."""
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2)
  if files.exists(path):
    if files.read_text(path) == text:
      return
    logging.warning("the config differs from %s's; the earlier one is now %s", path, files.keep_earlier(path))
  files.replace_durably(path, text)


def train(config, workdir: str, stop_at_step: int | None = None) -> tuple[nnx.Module, dict[str, float]]:
  """Trains `config` (validated: `grain_jax.config.validate(config, jax.device_count(), training=True)`),
  resuming from the newest intact checkpoint in `workdir/checkpoints`; returns the model in eval mode
  and the last logged metrics.

  `stop_at_step` ends this run early with a checkpoint (a time-limited job; the schedule still
  spans `config.train.num_steps`, so a later run continues exactly). A run that fails leaves no
  empty workdir it made. The run holds
  the workdir's lock (`workdir_lock`) while it trains: another training run there stops at once.
  A checkpoint whose arrays do not fit `config`, or whose step is past `config.train.num_steps`,
  stops the run (CheckpointMismatchError, ConfigError) before it writes anything into `workdir`;
  one whose data position does not fit the input pipeline stops it once the pipeline exists, after
  (re)generating the built-in synthetic data when its parameters changed (a deterministic function
  of `config.data.synthetic`, so an earlier run's data can be made again), and before config.json
  or metrics are written. `metrics.jsonl` rows past the restored step are dropped, as those steps
  run again.

  Raises:
    preemption.Preempted after saving a checkpoint, when a preemption notice (SIGTERM) or a Ctrl-C
      (SIGINT) arrived during training.
    checkpoint.CheckpointSaveError at the step after a save failed (a full disk, say).
    workdir_lock.WorkdirLockedError when another run holds the workdir; WorkdirLostError when the
      lock went away during the run (the workdir deleted under it).
  """
  mesh = sharding.make_mesh(config.mesh)
  with workdir_files.created(workdir), workdir_lock.held(workdir) as lock:
    return _train(config, workdir, mesh, lock, stop_at_step)


def _train(
  config, workdir: str, mesh: jax.sharding.Mesh, lock, stop_at_step: int | None
) -> tuple[nnx.Module, dict[str, float]]:
  """`train` in a workdir that exists and whose lock this run holds."""
  rules = config.sharding_rules
  shards = sharding.batch_shards(mesh, rules)
  with jax.set_mesh(mesh), sharding.axis_rules(rules):
    # ---- Model, optimizer state and update step, created sharded -----------------------------
    graphdef, rest, state, step_fn, flops_fn = build_training(config, mesh)
    # Creating the state compiled programs too; see compiled_step for why the processes wait.
    wait_for_other_processes("grain_jax_built_train_state")
    num_steps = config.train.num_steps

    # ---- Checkpoint: the state first, so that a checkpoint of another model stops the run before
    # the input pipeline (re)generates synthetic data in the workdir ------------------------------
    checkpointer = Checkpointer(
      checkpoint_dir(workdir), config.train.keep_checkpoints, config.train.async_checkpointing
    )
    restored = checkpointer.restore_latest(state)
    state = restored or state._replace(params=from_torch.initial_params(state.params, config.model))
    first_step = int(state.step)
    if first_step > num_steps:
      checkpointer.close()
      raise ConfigError(
        f"config.train.num_steps={num_steps} is below the step of the newest checkpoint in "
        f"{checkpointer.directory}, {first_step}: nothing to train. Raise num_steps to train on, "
        "evaluate it with --mode eval, or use a new --workdir to train from step 0"
      )
    if first_step == num_steps:
      logging.info("the newest checkpoint is at step %d = config.train.num_steps: nothing to train", first_step)

    # ---- Input --------------------------------------------------------------------------------
    data_iterator = iter(pipeline.train_dataset_from_config(config, pipeline.training_data_dir(config, workdir)))
    if restored is not None:
      checkpointer.restore_data(first_step, data_iterator)
    # Only now, with a checkpoint that fits (or none), does this run write into the workdir.
    if jax.process_index() == 0:
      write_config(config, workdir)
      preemption.remove_marker(workdir)

    # ---- Loop ---------------------------------------------------------------------------------
    last_step = num_steps if stop_at_step is None else min(stop_at_step, num_steps)
    report = StepReport(config, workdir, first_step, last_step, float(state.skipped_steps))
    # Counting a step's FLOPs traces it again: only where they make an mfu.
    step_fn = CompiledStep(step_fn, flops_fn if report.peak_flops is not None else None)
    preempted = False
    with (
      preemption.PreemptionNotice() as notice,
      contextlib.closing(data_iterator),
      contextlib.closing(checkpointer),
      contextlib.closing(report),
    ):
      for step in range(first_step, last_step):
        # A failed asynchronous save, or a workdir gone from under the run, stops it here.
        checkpointer.check()
        lock.check()
        report.started(step)
        batch = global_batch(pack_texts(next(data_iterator), config, shards), mesh)
        state, metrics = step_fn(state, batch)
        try:
          report.ended(step, state, metrics, step_fn.last_flops, data_iterator.stats)
        except FileNotFoundError:
          lock.verify()  # a metrics row written into a workdir deleted under the run: say that instead
          raise
        done = step + 1
        # Every process asks at every step (the processes agree on the step to stop at); a notice
        # reached at the last step changes nothing, as the run saves there and goes on to evaluate.
        preempted = notice.reached(done) and done < last_step
        if preempted or done % config.train.checkpoint_every == 0 or done == last_step:
          lock.verify()
          checkpointer.save(state, data_iterator)
        if preempted:
          break
    if preempted:
      if jax.process_index() == 0 and not notice.interrupted:
        preemption.write_marker(workdir, done)
      raise preemption.Preempted(done, workdir, notice.interrupted)

  model = nnx.merge(graphdef, state.params, rest)
  model.eval()
  return model, report.last_metrics
