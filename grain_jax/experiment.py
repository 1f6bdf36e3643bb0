"""What `main` runs: one training run (+ evaluation), or several arms (model kinds, variants) x seeds.

With `config.experiment.arms` set (e.g. GRAIN and the plain-CLIP baseline, or decoder variants) every
arm (the config with the arm's overrides) is trained with every seed of `config.experiment.seeds` on
the same data, each run in `workdir/<arm>_seed<seed>`, and the evaluations are compared in one table
(mean +- std over seeds), printed and written to `workdir/comparison.json` and
`workdir/comparison.md`.
"""

import json
import os

import jax
import numpy as np

from grain_jax import sharding
from grain_jax.config import ConfigError, apply_overrides, parse_arm, validate
from grain_jax.eval.run import run_evaluation
from grain_jax.train import trainer
from grain_jax.train import workdir_files


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, then evaluates it when `config.experiment.evaluate`; `run` has
  validated `config` (with its evaluation files)."""
  model, metrics = trainer.train(config, workdir)
  if not config.experiment.evaluate:
    return {"train": metrics}
  evaluation = run_evaluation(config, model, workdir, sharding.make_mesh(config.mesh),
                              checkpoint_id=f"step{config.train.num_steps}")
  return {"train": metrics, "eval": evaluation}


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Evaluates the newest checkpoint in `workdir` on every set of `config.eval` (`--mode eval`)."""
  validate(config, num_devices=jax.device_count(), evaluation_files=True)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    model, step = trainer.restore_model(config, workdir, mesh)
  return run_evaluation(config, model, workdir, mesh, checkpoint_id=f"step{step}")


def headline_metrics(evaluation: dict) -> dict[str, float]:
  """The comparison's rows (%): top-1 per set and head, retrieval R@1 both ways, grounding recall of
  the chosen and the best query, the boxes' spread across images (`conditioning_ratio`) and the
  fixed-box baseline."""
  rows = {}
  for name, result in evaluation["classification"].items():
    for head, metrics in result["heads"].items():
      rows[f"{name} top-1 ({head})"] = metrics["top1"]
  for name, result in evaluation["retrieval"].items():
    rows[f"{name} image->text R@1"] = next(iter(result["image_to_text"].values()))
    rows[f"{name} text->image R@1"] = next(iter(result["text_to_image"].values()))
  for name, result in evaluation["grounding"].items():
    if "recall" in result:
      at = f"@{result['iou_threshold']:g}"
      rows[f"{name} grounding recall{at} (chosen query)"] = result["recall"]
      rows[f"{name} grounding recall{at} (best query)"] = result["any_query_recall"]
      rows[f"{name} grounding box spread (% of the true boxes')"] = 100 * result["conditioning_ratio"]
      fixed = result.get("fixed_box_baseline")
      if fixed:
        rows[f"{name} fixed-box baseline recall{at} (one box)"] = fixed["single_box_recall"]
        rows[f"{name} fixed-box baseline recall{at} (best of {len(fixed['boxes'])})"] = fixed["best_of_k_recall"]
  return rows


def comparison_table(per_run: dict[tuple[str, int], dict[str, float]], arms, seeds) -> str:
  """Markdown table: one row per metric, one column per arm, `mean +- std` over seeds."""
  metrics = list(dict.fromkeys(name for rows in per_run.values() for name in rows))
  header = f"| metric | {' | '.join(arms)} |\n|---|{'---|' * len(arms)}"
  lines = [header]
  for metric in metrics:
    cells = []
    for arm in arms:
      values = [per_run[(arm, seed)][metric] for seed in seeds if metric in per_run[(arm, seed)]]
      cells.append("n/a" if not values else
                    f"{np.mean(values):.1f}" + (f" +- {np.std(values):.1f}" if len(values) > 1 else ""))
    lines.append(f"| {metric} | {' | '.join(cells)} |")
  return "\n".join(lines)


def arm_config(config, name: str, overrides, seed: int, shared_data: str):
  """The validated config of one run of an arm: the arm's overrides, `seed`, the shared data."""
  run_config = apply_overrides(config, overrides, f"config.experiment.arms entry {name!r}")
  with run_config.unlocked():
    run_config.seed = seed
    run_config.experiment.arms = ()
    run_config.data.synthetic_dir = run_config.data.synthetic_dir or shared_data
  validate(run_config, num_devices=jax.device_count(), evaluation_files=True)
  return run_config


def run(config, workdir: str) -> dict:
  """Runs what `config.experiment` asks for; returns the results. Every run's config, descriptor files
  included when it will evaluate, is validated before the first one trains."""
  if not config.experiment.arms:
    if config.experiment.evaluate:  # a missing descriptor file stops the run before training, not after
      validate(config, evaluation_files=True)
    return train_and_evaluate(config, workdir)
  if not config.experiment.evaluate:
    raise ConfigError("config.experiment.arms compares evaluations: set config.experiment.evaluate=True")
  arms = [parse_arm(entry) for entry in config.experiment.arms]
  names = [name for name, _ in arms]
  seeds = tuple(config.experiment.seeds) or (config.seed,)
  shared_data = os.path.join(workdir_files.absolute(workdir), "synthetic")
  # A typo in the last arm costs no run.
  run_configs = {(name, seed): arm_config(config, name, overrides, seed, shared_data)
                 for seed in seeds for name, overrides in arms}
  per_run = {}
  for (name, seed), run_config in run_configs.items():
    print(f"\n=== {name}, seed {seed} ===", flush=True)
    results = train_and_evaluate(run_config, os.path.join(workdir, f"{name}_seed{seed}"))
    per_run[(name, seed)] = headline_metrics(results["eval"])
  table = comparison_table(per_run, names, seeds)
  if jax.process_index() == 0:
    workdir_files.replace_durably(os.path.join(workdir, "comparison.json"), json.dumps(
        {f"{name}_seed{seed}": rows for (name, seed), rows in per_run.items()}, indent=1))
    workdir_files.replace_durably(os.path.join(workdir, "comparison.md"), table + "\n")
    print(f"\n{', '.join(names)} over seeds {seeds} (%):\n{table}", flush=True)
  return {"runs": per_run, "table": table}
