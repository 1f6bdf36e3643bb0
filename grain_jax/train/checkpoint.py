"""Checkpoints: the train state and the data iterator's position, saved together with Orbax.

Every save holds, besides the state and the data position, a checksum of each array's values
(`checksums`, computed on device from the bit patterns): it is an item of the same Orbax save, so
it commits with the checkpoint, and the newest checkpoint is verified like any other. (Orbax 0.12
checksums only the shard index of zarr3 arrays, not the array data.)

Restoring takes the newest checkpoint and recomputes the checksums from the restored arrays.
A checkpoint whose values do not match them, or hold a NaN or inf (training never stores one),
is corrupt: a writable Checkpointer moves it to `checkpoints/unreadable/<step>` (logged) and tries
the one before, so the run goes on and later saves of that step number do not collide with it.
A checkpoint that does not read is passed over for the one before; once an older one restores and
verifies, the environment and config evidently read checkpoints, so the newer ones that did not
read are damaged: they are moved aside the same way. When none restores, the run stops with
CheckpointReadError for the newest and those are not moved, since a good checkpoint that a changed
config or environment cannot read is not damaged. One that does not fit the config's arrays or
shapes stops the run at once with CheckpointMismatchError, and so does a data position that does
not fit the input pipeline (other config.data.num_workers, other process count); nothing is moved.
With several processes, all of them agree on each outcome (an all-gather) before a collective or
a decision; only a failure inside Orbax's own restore on some processes alone leaves the others at
Orbax's barrier in it until that barrier times out.

What a kill loses: the steps since the newest committed checkpoint. With synchronous saves that is
at most `checkpoint_every` steps. An asynchronous save commits while training goes on, and the next
save waits for it, so a kill loses at most 2 x `checkpoint_every` steps.
"""

import logging
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from grain_jax.errors import UserError
from grain_jax.train import workdir_files
from grain_jax.train.step import TrainState

UNREADABLE = "unreadable"
CHECKSUMS = "checksums"


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint reads but does not fit the config: other arrays or shapes, or a data position
  that the input pipeline cannot take."""


class CheckpointReadError(UserError, RuntimeError):
  """The newest checkpoint does not read and no older one restores; the ones that do not read are
  not moved, as nothing proves them damaged."""


class NoReadableCheckpointError(UserError, RuntimeError):
  """A directory holds checkpoints, and every one of them is corrupt."""


def _path(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _names(tree) -> list[str]:
  """`"params/decoder/..."` of every leaf, in `jax.tree.leaves` order."""
  return ["/".join(_path(key) for key in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """`{"params/decoder/...": shape}` of every leaf (arrays, ShapeDtypeStructs, Orbax ArrayMetadata)."""
  return dict(zip(_names(tree), (tuple(leaf.shape) for leaf in jax.tree.leaves(tree)), strict=True))


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


def _bits(x: jax.Array) -> jax.Array:
  """`x`'s bit pattern as uint32 values (an 8-byte type gives two per value)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """A uint32 checksum of `x`'s values: each value's bits mixed with its position, summed modulo 2**32.

  The sum does not depend on the order of the additions, so every sharding and process count gives
  the same checksum; the mixing (murmur3's finalizer) makes a changed or moved value change it.
  """
  bits = _bits(x)
  strides = np.cumprod((1,) + bits.shape[:0:-1])[::-1] if bits.ndim else ()
  index = sum((jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(int(stride) % 2**32)
               for axis, stride in enumerate(strides)), jnp.zeros(bits.shape, jnp.uint32))
  mixed = (bits ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  mixed = (mixed ^ (mixed >> 13)) * jnp.uint32(0xC2B2AE35)
  return jnp.sum(mixed ^ (mixed >> 16), dtype=jnp.uint32)


@jax.jit
def _leaf_checks(tree) -> tuple[jax.Array, jax.Array]:
  """(checksum of every leaf `[n]` uint32, whether every floating value is finite)."""
  leaves = jax.tree.leaves(tree)
  finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack([_checksum(x) for x in leaves]), jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def _to_host(x: jax.Array) -> np.ndarray:
  """The value of a result of `_leaf_checks` on this host, also when it spans several processes."""
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def checksums(tree) -> dict[str, int]:
  """`{"params/decoder/...": checksum}` of every array of `tree` (a collective with several processes)."""
  values, _ = _leaf_checks(tree)
  return dict(zip(_names(tree), (int(v) for v in _to_host(values)), strict=True))


def _any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process: every process then takes the same branch."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints: the absolute `<workdir>/checkpoints`."""
  return os.path.join(workdir_files.absolute(workdir), "checkpoints")


class Checkpointer:
  """Keeps the newest `keep` checkpoints of `TrainState` + data iterator under `directory`.

  `read_only` (evaluation, export): a corrupt checkpoint is skipped, not moved aside.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True, read_only: bool = False):
    self.directory = directory
    self.read_only = read_only
    self.manager = ocp.CheckpointManager(
        directory, item_names=("state", "data", CHECKSUMS),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=not read_only, read_only=read_only))

  def save(self, state: TrainState, data_iterator) -> None:
    """Starts saving at step `state.step` (asynchronously when enabled), with the arrays' checksums."""
    tree = state._asdict()
    self.manager.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), data=grain.checkpoint.CheckpointSave(data_iterator),
        **{CHECKSUMS: ocp.args.JsonSave(checksums(tree))}), force=True)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves have committed."""
    self.manager.wait_until_finished()

  def restore_latest(self, like: TrainState) -> TrainState | None:
    """The newest intact checkpoint's state restored into `like`'s shapes and shardings; None when
    there is no checkpoint. `restore_data` then moves a data iterator to its position.

    Raises:
      CheckpointMismatchError when the newest checkpoint holds other arrays or shapes than `like`.
      CheckpointReadError when it does not read and no older one restores (those are not moved).
      NoReadableCheckpointError when there are checkpoints and all are corrupt.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())
    restored = self._restore_newest(ocp.args.StandardRestore(target), _shapes(target))
    return None if restored is None else TrainState(**restored[1])

  def restore_latest_params(self, like_params) -> tuple[int, object] | None:
    """`(step, params)` of the newest intact checkpoint, or None; only the parameters are read
    (not the optimizer state), into `like_params`' shapes and shardings (arrays or
    ShapeDtypeStructs with shardings). Raises like `restore_latest`."""
    target = dict(params=jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params))
    restored = self._restore_newest(ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True),
        _shapes(target))
    return None if restored is None else (restored[0], restored[1]["params"])

  def restore_data(self, step: int, data_iterator) -> None:
    """Moves `data_iterator` to the position saved at `step` (in place).

    Raises:
      CheckpointMismatchError naming config.data.num_workers and the process count when the saved
      position does not fit the iterator.
    """
    error = None
    try:
      self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # noqa: BLE001 - every process must reach the agreement below
      error = CheckpointMismatchError(
          f"the data iterator's position saved at step {step} in {self.directory} does not fit this run's input "
          f"pipeline ({type(e).__name__}: {e}). config.data.num_workers or the number of processes "
          f"({jax.process_count()} now) differs from the run that saved it: run with the same values, or use a "
          "new --workdir. Nothing was moved.")
    if _any_process(error is not None):
      raise error or CheckpointMismatchError(f"another process could not restore the data position of step {step} "
                                             f"in {self.directory}; see its log")

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _restore_newest(self, state_args, wanted: dict[str, tuple[int, ...]]) -> tuple[int, dict] | None:
    """The state restored with `state_args` from the newest intact step: `(step, state)`, or None
    without checkpoints."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    problems, unread = [], []
    for step in steps:
      outcome, restored = self._read(step, state_args, wanted)
      mismatch = isinstance(outcome, CheckpointMismatchError)
      if _any_process(mismatch):
        raise outcome if mismatch else CheckpointMismatchError(
            f"another process found that the checkpoint at step {step} in {self.directory} does not fit this "
            "config; see its log")
      if _any_process(outcome is not None):
        unread.append((step, outcome or "another process could not read it; see its log"))
        continue
      problem = self._corruption(step, *restored)
      if _any_process(bool(problem)):
        problem = problem or "another process found it corrupt"
        problems.append(f"step {step}: {problem}")
        self._set_aside(step, f"is corrupt ({problem})")
        continue
      for newer, why in unread:
        self._set_aside(newer, f"does not read ({why}), while the older one at step {step} restores intact")
      logging.info("restored the checkpoint at step %d from %s", step, self.directory)
      return step, restored[0]
    if unread:
      raise self._read_error(*unread[0])
    if steps:
      after = ("" if self.read_only else f" They were moved to {os.path.join(self.directory, UNREADABLE)}; training "
               "again in this workdir starts from step 0, so to keep this run apart use a new workdir.")
      raise NoReadableCheckpointError(f"every checkpoint in {self.directory} is corrupt ({'; '.join(problems)}).{after}")
    return None

  def _read(self, step: int, state_args, wanted: dict) -> tuple[CheckpointMismatchError | str | None, tuple]:
    """`(None, (state, saved checksums or None))`, `(the mismatch to raise, ())`, or `(why it does not
    read, ())`; never raises, so that every process reaches the agreement on the outcome."""
    step_dir = self._step_dir(step)
    try:
      saved = _shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state").tree)
    except Exception as error:  # noqa: BLE001
      return f"its metadata does not read ({type(error).__name__}: {error})", ()
    items_wanted = {name.split("/")[0] for name in wanted}  # "params" alone for a partial restore
    mismatch = describe_mismatch({name: shape for name, shape in saved.items() if name.split("/")[0] in items_wanted},
                                 wanted)
    if mismatch:
      return CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} does not fit this config: {mismatch}. It is "
          "another model's (its run's config is config.json in the same workdir). To train this config, "
          "use a new --workdir; to start it from that checkpoint's weights, export them (--mode export with "
          "that run's config) and set config.model.init_from to the exported .safetensors file."), ()
    items = dict(state=state_args)
    if workdir_files.is_dir(os.path.join(step_dir, CHECKSUMS)):
      items[CHECKSUMS] = ocp.args.JsonRestore()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # noqa: BLE001
      return f"{type(error).__name__}: {error}", ()
    return None, (restored.state, restored.get(CHECKSUMS))

  def _read_error(self, step: int, why: str) -> CheckpointReadError:
    return CheckpointReadError(
        f"the checkpoint at step {step} in {self.directory} does not read ({why}), and no older one restores. "
        "The checkpoints that do not read were not moved: a changed environment or config can cause this as well "
        f"as damage. If they are damaged, move them aside (e.g. to {os.path.join(self.directory, UNREADABLE)}) or "
        "use a new --workdir to train from step 0.")

  def _corruption(self, step: int, state: dict, saved: dict | None) -> str:
    """What proves the restored `state` corrupt ("" = nothing): checksums that differ from the
    `saved` ones, or values that are not finite. A collective with several processes."""
    values, finite = _leaf_checks(state)
    names = _names(state)
    if saved is None:
      logging.warning("the checkpoint at step %d in %s has no %s (saved by an earlier grain_jax): only the "
                      "finiteness of its values is checked", step, self.directory, CHECKSUMS)
      differ = []
    else:
      differ = [name for name, value in zip(names, _to_host(values), strict=True) if saved.get(name) != int(value)]
    if differ:
      return f"{len(differ)} arrays do not match their {CHECKSUMS} ({', '.join(differ[:5])})"
    return "" if bool(_to_host(finite)) else "it holds values that are not finite (NaN or inf)"

  def _set_aside(self, step: int, problem: str) -> None:
    """Logs that the checkpoint at `step` `problem` ("is corrupt (...)") and, unless read-only, moves
    it to `unreadable/<step>` (process 0; the others wait for it)."""
    if self.read_only:
      logging.warning("checkpoint at step %d in %s %s; skipped", step, self.directory, problem)
      return
    unreadable = os.path.join(self.directory, UNREADABLE)
    aside = os.path.join(unreadable, str(step))
    suffix = 1
    while workdir_files.exists(aside):
      aside, suffix = os.path.join(unreadable, f"{step}.{suffix}"), suffix + 1
    if jax.process_index() == 0:
      workdir_files.rename(self._step_dir(step), aside)
      # Nothing deletes what is moved aside (it may be needed to find out what went wrong): say what it costs.
      logging.warning("checkpoint at step %d in %s %s; moved to %s. %s now holds %d checkpoints, %.1f MB: delete "
                      "them when they are no longer needed", step, self.directory, problem, aside, unreadable,
                      len(workdir_files.listdir(unreadable)), workdir_files.tree_size(unreadable) / 2**20)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"grain_jax_checkpoint_{step}_set_aside")
    self.manager.reload()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def restore_params(workdir: str, like_params: Any) -> tuple[int, Any]:
  """`(step, params)` of the newest intact checkpoint in `<workdir>/checkpoints`, in the shapes and
  shardings of `like_params` (an nnx.State of arrays or ShapeDtypeStructs). Only the parameters are
  read and verified, not the optimizer state. A corrupt checkpoint is skipped (logged), not moved.

  Raises:
    FileNotFoundError naming the directory when it holds no checkpoint.
    CheckpointMismatchError, CheckpointReadError, NoReadableCheckpointError as
      `Checkpointer.restore_latest` does.
  """
  directory = checkpoint_dir(workdir)
  checkpointer = Checkpointer(directory, keep=1, async_save=False, read_only=True)
  restored = checkpointer.restore_latest_params(like_params)
  checkpointer.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  return restored
