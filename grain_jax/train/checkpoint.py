"""Checkpoints: the train state and the data iterator's position, saved together with Orbax.

A checkpoint that cannot be read (a partial write, a corrupt file) is reported and the one
before it is used, so a crash during a save never loses more than one checkpoint interval.
"""

import logging

import grain
import jax
import orbax.checkpoint as ocp

from grain_jax.train.step import TrainState


class Checkpointer:
  """Keeps the newest `keep` checkpoints of `TrainState` + data iterator under `directory`."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.manager = ocp.CheckpointManager(
        directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def save(self, state: TrainState, data_iterator) -> None:
    """Starts saving at step `state.step` (asynchronously when enabled)."""
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state._asdict()),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore_latest(self, like: TrainState, data_iterator=None) -> TrainState | None:
    """The newest readable checkpoint restored into `like`'s shapes and shardings, or None.

    `data_iterator`, when given, is moved to the restored position in place (evaluation passes
    none and reads only the train state).
    """
    items = dict(state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._restore_newest(items)
    return None if restored is None else TrainState(**restored[1].state)

  def restore_latest_params(self, like_params) -> tuple[int, object] | None:
    """`(step, params)` of the newest readable checkpoint, or None; only the parameters are read
    (not the optimizer state), into `like_params`' shapes and shardings (arrays or
    ShapeDtypeStructs with shardings)."""
    target = dict(params=jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params))
    items = dict(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    restored = self._restore_newest(items)
    return None if restored is None else (restored[0], restored[1].state["params"])

  def _restore_newest(self, items: dict) -> tuple[int, ocp.args.Composite] | None:
    """Restores `items` from the newest step that reads without error; `(step, restored)` or None."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # noqa: BLE001 - any failure to read means: fall back to an older one
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                        step, self.manager.directory, type(error).__name__, error)
        continue
      logging.info("restored the checkpoint at step %d from %s", step, self.manager.directory)
      return step, restored
    return None

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
