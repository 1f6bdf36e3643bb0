"""What `main` runs: one training run (+ evaluation), or a comparison of arms x seeds x worlds x settings.

With `config.experiment.arms` set (e.g. GRAIN and the plain-CLIP baseline) every arm (the config with
the arm's overrides) is trained with every seed of `config.experiment.seeds`, in every synthetic world
of `config.experiment.worlds` (`data.synthetic.seed`) and under every setting of
`config.experiment.settings` (overrides applied to every arm: how much the captions say, say), each run
in `workdir/[<setting>/][world<w>/]<arm>_seed<seed>` (a level only when its field is set). Arms of one
setting and world share one dataset. Per setting one table compares the evaluations, mean +- std over
worlds and seeds, beside what no skill scores and, for two arms, their difference paired by world and
seed; it is printed and written to `workdir/comparison.json` and `workdir/comparison.md`.
"""

import json
import os

import jax
import numpy as np

from grain_jax import files, sharding
from grain_jax.config import comparison_runs
from grain_jax.errors import output_dir
from grain_jax.eval import heads as heads_lib
from grain_jax.eval.run import run_evaluation
from grain_jax.eval.table import headline_metrics
from grain_jax.train import checkpoint, trainer


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, then evaluates it when `config.experiment.evaluate`."""
  model, metrics = trainer.train(config, workdir)
  if not config.experiment.evaluate:
    return {"train": metrics}
  evaluation = run_evaluation(
    config, model, workdir, sharding.make_mesh(config.mesh), checkpoint_id=f"step{config.train.num_steps}"
  )
  return {"train": metrics, "eval": evaluation}


def evaluate_checkpoint(config, workdir: str, out_dir: str = "") -> dict:
  """Evaluates the newest checkpoint in `workdir` on every set of `config.eval` (`--mode eval`),
  writing into `out_dir` (default `workdir/eval`); reads `workdir` only, so a read-only (archived)
  run and one that is training there can be evaluated."""
  out_dir = output_dir(out_dir, workdir, "eval")
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    model, step = checkpoint.restore_model(config, workdir, mesh)
  return run_evaluation(config, model, workdir, mesh, checkpoint_id=f"step{step}", out_dir=out_dir)


def _mean_std(values: list[float], signed: bool = False) -> str:
  if not values:
    return "n/a"
  mean = f"{np.mean(values):+.1f}" if signed else f"{np.mean(values):.1f}"
  return mean + (f" +- {np.std(values):.1f}" if len(values) > 1 else "")


def comparison_table(
  per_run: dict[tuple, dict[str, float]], no_skill: dict[str, float], arms, seeds, worlds=(None,)
) -> str:
  """Markdown table: one row per metric; what no skill scores; one column per arm, `mean +- std` over
  worlds and seeds; with two arms their difference paired by (world, seed), overall and per world.

  Args:
    per_run: (arm, world, seed) -> rows (`grain_jax.eval.table.headline_metrics`).
    no_skill: metric -> what no skill scores there (the mean over the runs' worlds).
    arms, seeds, worlds: the runs' arm names, seeds and worlds (None: the config's one world).
  """
  metrics = list(dict.fromkeys(name for rows in per_run.values() for name in rows))
  paired = len(arms) == 2
  columns = ["metric", "no skill", *arms]
  if paired:
    columns.append(f"{arms[0]} - {arms[1]}, paired")
    if len(worlds) > 1:
      columns.append("per world")
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  runs = [(world, seed) for world in worlds for seed in seeds]
  for metric in metrics:
    values = {arm: [per_run[(arm, *run)][metric] for run in runs if metric in per_run[(arm, *run)]] for arm in arms}
    only = [arm for arm in arms if values[arm]]
    label = metric + (f" [{', '.join(only)} only]" if len(only) < len(arms) else "")
    if metric.endswith(f"({heads_lib.PAPER_HEAD})"):
      label = f"**{label}** (the paper's)"
    no_skill_cell = f"{no_skill[metric]:.1f}" if metric in no_skill else "n/a"
    cells = [label, no_skill_cell, *(_mean_std(values[arm]) for arm in arms)]
    if paired:
      differences = {
        run: per_run[(arms[0], *run)][metric] - per_run[(arms[1], *run)][metric]
        for run in runs
        if metric in per_run[(arms[0], *run)] and metric in per_run[(arms[1], *run)]
      }
      cells.append(_mean_std(list(differences.values()), signed=True))
      if len(worlds) > 1:
        cells.append(
          " / ".join(_mean_std([d for (w, _), d in differences.items() if w == world], signed=True) for world in worlds)
          if differences
          else "n/a"
        )
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def arm_config(run_config, seed: int, world: int | None, shared_data: str):
  """The config of one run of a comparison: its arm's (`comparison_runs`) with `seed`, the synthetic
  `world` (None: the config's own) and the shared data."""
  run_config = run_config.copy_and_resolve_references()
  with run_config.unlocked():
    run_config.seed = seed
    if world is not None:
      run_config.data.synthetic.seed = world
    run_config.data.synthetic_dir = run_config.data.synthetic_dir or shared_data
  return run_config


def _write(workdir: str, name: str, text: str) -> None:
  files.replace_durably(os.path.join(workdir, name), text)


def run(config, workdir: str) -> dict:
  """Runs what `config.experiment` asks for; returns the results. `config` is validated, and with it
  every run's config (`grain_jax.config.validate` checks each of `comparison_runs`)."""
  cfg = config.experiment
  if not cfg.arms:
    return train_and_evaluate(config, workdir)
  arm_configs = comparison_runs(config)
  settings = list(dict.fromkeys(setting for setting, _ in arm_configs))
  names = list(dict.fromkeys(name for _, name in arm_configs))
  seeds = tuple(cfg.seeds) or (config.seed,)
  worlds = tuple(cfg.worlds) or (None,)
  root = files.absolute(workdir)
  # Settings vary fastest, so that the first world and seed of every setting come first.
  runs = {}
  for world in worlds:
    for seed in seeds:
      for setting in settings:
        folder = os.path.join(root, setting, "" if world is None else f"world{world}")
        for name in names:
          runs[(setting, name, world, seed)] = (
            os.path.join(folder, f"{name}_seed{seed}"),
            arm_config(arm_configs[(setting, name)], seed, world, os.path.join(folder, "synthetic")),
          )
  per_run, baselines = {}, {}
  for (setting, name, world, seed), (run_dir, run_config) in runs.items():
    where = ", ".join(filter(None, [setting and f"setting {setting}", world is not None and f"world {world}"]))
    print(f"\n=== {name}, seed {seed}{', ' + where if where else ''} ===", flush=True)
    rows, baseline = headline_metrics(train_and_evaluate(run_config, run_dir)["eval"])
    per_run[(setting, name, world, seed)] = rows
    for metric, value in baseline.items():  # fixed boxes and box shares differ from world to world
      baselines.setdefault(setting, {}).setdefault(metric, []).append(value)
  tables = {
    setting: comparison_table(
      {key[1:]: rows for key, rows in per_run.items() if key[0] == setting},
      {m: float(np.mean(v)) for m, v in baselines[setting].items()},
      names,
      seeds,
      worlds,
    )
    for setting in settings
  }
  text = "\n\n".join((f"## setting {setting}\n\n" if setting else "") + table for setting, table in tables.items())
  if jax.process_index() == 0:
    _write(
      workdir,
      "comparison.json",
      json.dumps(
        {
          "/".join(filter(None, [s, "" if w is None else f"world{w}", f"{a}_seed{seed}"])): rows
          for (s, a, w, seed), rows in per_run.items()
        },
        indent=1,
      ),
    )
    _write(workdir, "comparison.md", text + "\n")
    print(
      f"\n{', '.join(names)} over seeds {seeds}"
      + (f" and worlds {worlds}" if worlds != (None,) else "")
      + f" (%):\n{text}",
      flush=True,
    )
  return {"runs": per_run, "table": text}
