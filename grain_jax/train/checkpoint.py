"""Checkpoints: the train state and the data iterator's position, saved together with Orbax.

Restoring takes the newest checkpoint that is intact. A checkpoint is *unreadable* when Orbax
cannot read it, when its files do not match the digest manifest written when its save committed
(grain_jax/train/digests.py), or when a restored value is not finite (training never stores one);
a writable Checkpointer moves it to `checkpoints/unreadable/<step>` (logged) and tries the one
before, so the run goes on and later saves of that step number do not collide with it. A
checkpoint that reads but does not fit the config (other arrays or shapes) stops with
CheckpointMismatchError: it belongs to another model and is never replaced by a fresh one.

What a kill loses: the steps since the newest committed checkpoint. With synchronous saves that is
at most `checkpoint_every` steps. An asynchronous save commits while training goes on, and the next
save waits for it, so a kill loses at most 2 x `checkpoint_every` steps.
"""

import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from grain_jax.errors import UserError
from grain_jax.train import digests
from grain_jax.train.step import TrainState

UNREADABLE = "unreadable"


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint reads but holds other arrays or shapes than the config's model and optimizer."""


class NoReadableCheckpointError(UserError, RuntimeError):
  """A directory holds checkpoints, and none of them is intact."""


def _path(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """`{"params/decoder/...": shape}` of every leaf (arrays, ShapeDtypeStructs, Orbax ArrayMetadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_path(key) for key in path): tuple(leaf.shape) for path, leaf in leaves}


def describe_mismatch(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]],
                      limit: int = 5) -> str:
  """How the arrays of a checkpoint (`saved`) differ from the config's (`wanted`), "" when they fit."""
  params_first = lambda name: (not name.startswith("params/"), name)  # the optimizer's copies say less
  missing = sorted(set(wanted) - set(saved), key=params_first)
  extra = sorted(set(saved) - set(wanted), key=params_first)
  reshaped = sorted((name for name in set(saved) & set(wanted) if saved[name] != wanted[name]), key=params_first)
  parts = []
  if reshaped:
    parts.append(f"{len(reshaped)} arrays have other shapes (" + "; ".join(
        f"{name}: checkpoint {saved[name]}, config {wanted[name]}" for name in reshaped[:limit]) + ")")
  if missing:
    parts.append(f"{len(missing)} arrays of the config are not in the checkpoint ({', '.join(missing[:limit])})")
  if extra:
    parts.append(f"{len(extra)} arrays of the checkpoint are not in the config ({', '.join(extra[:limit])})")
  return "; ".join(parts)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _agree(flag: bool) -> bool:
  """Process 0's `flag` on every process (only process 0 checks the digests)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


class Checkpointer:
  """Keeps the newest `keep` checkpoints of `TrainState` + data iterator under `directory`.

  `read_only` (evaluation, export): unreadable checkpoints are skipped, not moved aside.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True, read_only: bool = False):
    self.directory = directory
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(
        directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=not read_only, read_only=read_only))
    self._uncommitted: list[int] = []  # saves started here whose digests are not written yet

  def save(self, state: TrainState, data_iterator) -> None:
    """Starts saving at step `state.step` (asynchronously when enabled)."""
    self.wait()  # Orbax waits for the previous save anyway; its digests are written meanwhile
    step = int(state.step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state._asdict()),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
    self._uncommitted.append(step)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves have committed, and writes their digest manifests."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._uncommitted:
        if os.path.isdir(self._step_dir(step)):  # not already deleted by retention
          digests.write(self._step_dir(step))
    self._uncommitted.clear()

  def restore_latest(self, like: TrainState, data_iterator=None) -> TrainState | None:
    """The newest intact checkpoint restored into `like`'s shapes and shardings; None when there is none.

    `data_iterator`, when given, is moved to the restored position in place (evaluation passes
    none and reads only the train state).

    Raises:
      CheckpointMismatchError when the newest readable checkpoint holds other arrays than `like`.
      NoReadableCheckpointError when there are checkpoints but none is intact.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._restore_newest(items, _shapes(target))
    return None if restored is None else TrainState(**restored[1].state)

  def restore_latest_params(self, like_params) -> tuple[int, object] | None:
    """`(step, params)` of the newest intact checkpoint, or None; only the parameters are read
    (not the optimizer state), into `like_params`' shapes and shardings (arrays or
    ShapeDtypeStructs with shardings). Raises like `restore_latest`."""
    target = dict(params=jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params))
    items = dict(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    restored = self._restore_newest(items, _shapes(target))
    return None if restored is None else (restored[0], restored[1].state["params"])

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_newest(self, items: dict, wanted: dict[str, tuple[int, ...]]) -> tuple[int, ocp.args.Composite] | None:
    """Restores `items` from the newest intact step: `(step, restored)`, or None without checkpoints."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    problems = []
    for step in steps:
      problem = self._corruption(step)
      restored = None
      if not problem:
        problem, restored = self._restore_step(step, items, wanted)
      if not problem:
        logging.info("restored the checkpoint at step %d from %s", step, self.directory)
        return step, restored
      problems.append(f"step {step}: {problem}")
      self._set_aside(step, problem)
    if steps:
      after = ("" if self.read_only else f" They were moved to {os.path.join(self.directory, UNREADABLE)}; training "
               "again in this workdir starts from step 0, so to keep this run apart use a new workdir.")
      raise NoReadableCheckpointError(f"no checkpoint in {self.directory} is intact ({'; '.join(problems)}).{after}")
    return None

  def _corruption(self, step: int) -> str:
    """What process 0 finds wrong with the step's files against its digest manifest ("" = nothing)."""
    problem = ""
    if jax.process_index() == 0:
      step_dir = self._step_dir(step)
      if not digests.has_manifest(step_dir):
        logging.warning("checkpoint at step %d in %s has no %s (its save did not finish writing it): "
                        "its files are not verified", step, self.directory, digests.DIGESTS)
      else:
        found = digests.problems(step_dir)
        problem = f"its files do not match {digests.DIGESTS}: {', '.join(found[:5])}" if found else ""
    return "" if _agree(not problem) else (problem or "process 0 found its files corrupt")

  def _restore_step(self, step: int, items: dict, wanted: dict) -> tuple[str, ocp.args.Composite | None]:
    """`("", restored)`, or `(why it is unreadable, None)`; raises CheckpointMismatchError."""
    try:
      saved = _shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(self._step_dir(step)) / "state").tree)
    except Exception as error:  # noqa: BLE001 - any failure to read the metadata makes it unreadable
      return f"its metadata does not read ({type(error).__name__}: {error})", None
    items_wanted = {name.split("/")[0] for name in wanted}  # "params" alone for a partial restore
    mismatch = describe_mismatch({name: shape for name, shape in saved.items() if name.split("/")[0] in items_wanted},
                                 wanted)
    if mismatch:
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} does not fit this config: {mismatch}. It is "
          "another model's (its run's config is config.json in the same workdir). To train this config, "
          "use a new --workdir; to start it from that checkpoint's weights, export them (--mode export with "
          "that run's config) and set config.model.init_from to the exported .safetensors file.")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001 - any failure to read means: fall back to an older one
      return f"{type(error).__name__}: {error}", None
    if not bool(_all_finite(restored.state)):
      return "it holds values that are not finite (NaN or inf)", None
    return "", restored

  def _set_aside(self, step: int, problem: str) -> None:
    """Logs the unreadable step and, unless read-only, moves it to `unreadable/<step>`."""
    if self.read_only:
      logging.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one",
                      step, self.directory, problem)
      return
    aside = os.path.join(self.directory, UNREADABLE, str(step))
    suffix = 1
    while os.path.exists(aside):
      aside, suffix = os.path.join(self.directory, UNREADABLE, f"{step}.{suffix}"), suffix + 1
    logging.warning("checkpoint at step %d in %s is unreadable (%s); moved to %s, trying the previous one",
                    step, self.directory, problem, aside)
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.rename(self._step_dir(step), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"grain_jax_checkpoint_{step}_set_aside")
    self.manager.reload()

  def close(self) -> None:
    self.wait()
    self.manager.close()
