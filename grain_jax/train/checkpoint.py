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

Evaluation and export restore a model with `restore_model`: its parameters alone, from a workdir
they only read.

What a kill loses: the steps since the newest committed checkpoint. With synchronous saves that is
at most `checkpoint_every` steps. An asynchronous save commits while training goes on, and the next
save waits for it, so a kill loses at most 2 x `checkpoint_every` steps. A save cut short leaves a
`<step>.orbax-checkpoint-tmp-*` folder, which a writable Checkpointer removes (logged): the workdir
lock makes sure no other run is writing it. (In a gs:// workdir it leaves a `<step>` folder without
Orbax's `commit_success.txt`, which is never restored and which a save of that step replaces.) A save
that fails (a full disk) stops training at the next step (`check()`) with CheckpointSaveError, which
names the newest committed checkpoint.
"""

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from grain_jax import files, sharding
from grain_jax.checksums import checksums, leaf_checks, leaf_names, to_host
from grain_jax.errors import UserError
from grain_jax.models.grain import build_model
from grain_jax.processes import any_process
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


class CheckpointSaveError(UserError, RuntimeError):
  """A checkpoint could not be written (a full disk, no permission): fixing the cause and running the
  same command again resumes from the newest committed checkpoint."""


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  """`{"params/decoder/...": shape}` of every leaf (arrays, ShapeDtypeStructs, Orbax ArrayMetadata)."""
  return dict(zip(leaf_names(tree), (tuple(leaf.shape) for leaf in jax.tree.leaves(tree)), strict=True))


def describe_mismatch(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], limit: int = 5) -> str:
  """How the arrays of a checkpoint (`saved`) differ from the config's (`wanted`), "" when they fit."""
  params_first = lambda name: (not name.startswith("params/"), name)  # the optimizer's copies say less
  missing = sorted(set(wanted) - set(saved), key=params_first)
  extra = sorted(set(saved) - set(wanted), key=params_first)
  reshaped = sorted((name for name in set(saved) & set(wanted) if saved[name] != wanted[name]), key=params_first)
  parts = []
  if reshaped:
    parts.append(
      f"{len(reshaped)} arrays have other shapes ("
      + "; ".join(f"{name}: checkpoint {saved[name]}, config {wanted[name]}" for name in reshaped[:limit])
      + ")"
    )
  if missing:
    parts.append(f"{len(missing)} arrays of the config are not in the checkpoint ({', '.join(missing[:limit])})")
  if extra:
    parts.append(f"{len(extra)} arrays of the checkpoint are not in the config ({', '.join(extra[:limit])})")
  return "; ".join(parts)


def remove_unfinished_saves(directory: str) -> None:
  """Removes (logged) the temporary folders of saves that never committed under `directory`
  (process 0; the others wait for it). Only for the run that holds the workdir's lock.

  Such folders are those of a local (or mounted) directory: in a gs:// bucket Orbax writes a step's
  objects under their final names and marks the step committed last (`commit_success.txt`), and a
  step without that mark is never restored."""
  suffix = ocp.path.atomicity_types.TMP_DIR_SUFFIX
  if jax.process_index() == 0 and files.is_dir(directory):
    for name in files.listdir(directory):
      path = os.path.join(directory, name)
      if suffix in name and files.is_dir(path):
        size = files.tree_size(path) / 2**20
        files.remove_tree(path)
        logging.warning(
          "removed %s (%.1f MB): a save that never committed (cut short by a kill or a failure)", path, size
        )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("grain_jax_checkpoint_unfinished_saves_removed")


def checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its checkpoints: the absolute `<workdir>/checkpoints`."""
  return os.path.join(files.absolute(workdir), "checkpoints")


class Checkpointer:
  """Keeps the newest `keep` checkpoints of `TrainState` + data iterator under `directory`.

  `read_only` (evaluation, export): a corrupt checkpoint is skipped, not moved aside, and nothing
  is removed; otherwise the folders of saves that never committed are removed first.
  """

  def __init__(self, directory: str, keep: int, async_save: bool = True, read_only: bool = False):
    self.directory = directory
    self.read_only = read_only
    self._pending: int | None = None  # the step of the newest save not yet known to have committed
    if not read_only:
      remove_unfinished_saves(directory)
    self.manager = ocp.CheckpointManager(
      directory,
      item_names=("state", "data", CHECKSUMS),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only
      ),
    )

  def save(self, state: TrainState, data_iterator) -> None:
    """Starts saving at step `state.step` (asynchronously when enabled), with the arrays' checksums,
    once the previous save has committed.

    Raises:
      CheckpointSaveError when the previous save or this one (when synchronous) failed.
    """
    self.wait()
    step, tree = int(state.step), state._asdict()
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          **{CHECKSUMS: ocp.args.JsonSave(checksums(tree))},
        ),
        force=True,
      )
    except Exception as error:  # noqa: BLE001 - whatever the storage raised, the run stops on one line
      raise self._save_error(step, error) from error
    self._pending = step

  def check(self) -> None:
    """Raises CheckpointSaveError when an asynchronous save has failed; returns at once while it is in
    progress. Call at every step: a failed save stops the run at the step after it is known."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until pending asynchronous saves have committed; raises CheckpointSaveError when one failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
      raise self._save_error(step, error) from error

  def _save_error(self, step: int | None, error: Exception) -> CheckpointSaveError:
    self.manager.reload()  # the steps that committed, read from the directory
    committed = self.manager.latest_step()
    newest = (
      f"the newest committed checkpoint is step {committed}, where running the same command again resumes"
      if committed is not None
      else "no checkpoint has committed in this workdir"
    )
    cause = " ".join(f"{type(error).__name__}: {error}".split())
    return CheckpointSaveError(
      f"saving the checkpoint of step {step} in {self.directory} failed ({cause}); training "
      f"stopped; {newest} once the cause (a full disk, say) is fixed"
    )

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
    restored = self._restore_newest(
      ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
      ),
      _shapes(target),
    )
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
        "new --workdir. Nothing was moved."
      )
    if any_process(error is not None):
      raise error or CheckpointMismatchError(
        f"another process could not restore the data position of step {step} in {self.directory}; see its log"
      )

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
      if any_process(mismatch):
        raise (
          outcome
          if mismatch
          else CheckpointMismatchError(
            f"another process found that the checkpoint at step {step} in {self.directory} does not fit this "
            "config; see its log"
          )
        )
      if any_process(outcome is not None):
        unread.append((step, outcome or "another process could not read it; see its log"))
        continue
      problem = self._corruption(step, *restored)
      if any_process(bool(problem)):
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
      after = (
        ""
        if self.read_only
        else f" They were moved to {os.path.join(self.directory, UNREADABLE)}; training "
        "again in this workdir starts from step 0, so to keep this run apart use a new workdir."
      )
      raise NoReadableCheckpointError(
        f"every checkpoint in {self.directory} is corrupt ({'; '.join(problems)}).{after}"
      )
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
    mismatch = describe_mismatch(
      {name: shape for name, shape in saved.items() if name.split("/")[0] in items_wanted}, wanted
    )
    if mismatch:
      return CheckpointMismatchError(
        f"the checkpoint at step {step} in {self.directory} does not fit this config: {mismatch}. It is "
        "another model's (its run's config is config.json in the same workdir). To train this config, "
        "use a new --workdir; to start it from that checkpoint's weights, export them (--mode export with "
        "that run's config) and set config.model.init_from to the exported .safetensors file."
      ), ()
    items = dict(state=state_args)
    if files.is_dir(os.path.join(step_dir, CHECKSUMS)):
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
      "use a new --workdir to train from step 0."
    )

  def _corruption(self, step: int, state: dict, saved: dict | None) -> str:
    """What proves the restored `state` corrupt ("" = nothing): checksums that differ from the
    `saved` ones, or values that are not finite. A collective with several processes."""
    values, finite = leaf_checks(state)
    names = leaf_names(state)
    if saved is None:
      logging.warning(
        "the checkpoint at step %d in %s has no %s (saved by an earlier grain_jax): only the "
        "finiteness of its values is checked",
        step,
        self.directory,
        CHECKSUMS,
      )
      differ = []
    else:
      differ = [name for name, value in zip(names, to_host(values), strict=True) if saved.get(name) != int(value)]
    if differ:
      return f"{len(differ)} arrays do not match their {CHECKSUMS} ({', '.join(differ[:5])})"
    return "" if bool(to_host(finite)) else "it holds values that are not finite (NaN or inf)"

  def _set_aside(self, step: int, problem: str) -> None:
    """Logs that the checkpoint at `step` `problem` ("is corrupt (...)") and, unless read-only, moves
    it to `unreadable/<step>` (process 0; the others wait for it)."""
    if self.read_only:
      logging.warning("checkpoint at step %d in %s %s; skipped", step, self.directory, problem)
      return
    unreadable = os.path.join(self.directory, UNREADABLE)
    aside = os.path.join(unreadable, str(step))
    suffix = 1
    while files.exists(aside):
      aside, suffix = os.path.join(unreadable, f"{step}.{suffix}"), suffix + 1
    if jax.process_index() == 0:
      files.rename(self._step_dir(step), aside)
      # Nothing deletes what is moved aside (it may be needed to find out what went wrong): say what it costs.
      logging.warning(
        "checkpoint at step %d in %s %s; moved to %s. %s now holds %d checkpoints, %.1f MB: delete "
        "them when they are no longer needed",
        step,
        self.directory,
        problem,
        aside,
        unreadable,
        len(files.listdir(unreadable)),
        files.tree_size(unreadable) / 2**20,
      )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"grain_jax_checkpoint_{step}_set_aside")
    self.manager.reload()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def restore_model(config, workdir: str, mesh: jax.sharding.Mesh) -> tuple[nnx.Module, int]:
  """The model of the newest intact checkpoint in `<workdir>/checkpoints` (a local folder or gs://),
  in eval mode with its parameters sharded over `mesh` by `config.sharding_rules`, and its step: what
  evaluation and export read. Only the parameters are read and verified, not the optimizer state
  (twice their size with AdamW). The workdir is only read: a corrupt checkpoint is skipped (logged),
  not moved, so this runs beside a training run there or on a read-only copy.

  Raises:
    FileNotFoundError naming the workdir when it holds no checkpoint.
    CheckpointMismatchError, CheckpointReadError, NoReadableCheckpointError as
      `Checkpointer.restore_latest` does (each names the checkpoints' folder in the workdir).
  """
  abstract = sharding.create_abstract(lambda: build_model(config.model, config.seed), mesh, config.sharding_rules)
  graphdef, like_params, rest = nnx.split(abstract, nnx.Param, ...)
  directory = checkpoint_dir(workdir)
  checkpointer = Checkpointer(directory, keep=1, async_save=False, read_only=True)
  try:
    restored = checkpointer.restore_latest_params(like_params)
  finally:
    checkpointer.close()
  if restored is None:
    raise FileNotFoundError(
      f"--workdir {workdir} holds no checkpoint ({directory} has none): give the workdir "
      "of a training run, or train there first"
    )
  step, params = restored
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  return model, step
