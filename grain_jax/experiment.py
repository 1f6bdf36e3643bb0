"""What `main` runs: one training run (+ evaluation), or one recipe for several model kinds and seeds.

With `config.experiment.kinds` set (e.g. GRAIN and the plain-CLIP baseline) every kind is trained
with every seed of `config.experiment.seeds` on the same data for the same steps, each run in
`workdir/<kind>_seed<seed>`, and the evaluations are compared in one table (mean +- std over seeds),
printed and written to `workdir/comparison.json` and `workdir/comparison.md`.
"""

import json
import os

import jax
import numpy as np

from grain_jax import sharding
from grain_jax.config import validate
from grain_jax.eval.run import run_evaluation
from grain_jax.train import trainer


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, then evaluates it when `config.experiment.evaluate`."""
  model, metrics = trainer.train(config, workdir)
  if not config.experiment.evaluate:
    return {"train": metrics}
  evaluation = run_evaluation(config, model, workdir, sharding.make_mesh(config.mesh),
                              checkpoint_id=f"step{config.train.num_steps}")
  return {"train": metrics, "eval": evaluation}


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Evaluates the newest checkpoint in `workdir` on every set of `config.eval` (`--mode eval`)."""
  validate(config, num_devices=jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    model, step = trainer.restore_model(config, workdir, mesh)
  return run_evaluation(config, model, workdir, mesh, checkpoint_id=f"step{step}")


def headline_metrics(evaluation: dict) -> dict[str, float]:
  """The comparison's rows: top-1 per set and head, retrieval R@1 both ways, grounding recall (%)."""
  rows = {}
  for name, result in evaluation["classification"].items():
    for head, metrics in result["heads"].items():
      rows[f"{name} top-1 ({head})"] = metrics["top1"]
  for name, result in evaluation["retrieval"].items():
    rows[f"{name} image->text R@1"] = next(iter(result["image_to_text"].values()))
    rows[f"{name} text->image R@1"] = next(iter(result["text_to_image"].values()))
  for name, result in evaluation["grounding"].items():
    if "recall" in result:
      rows[f"{name} grounding recall@{result['iou_threshold']:g}"] = result["recall"]
  return rows


def comparison_table(per_run: dict[tuple[str, int], dict[str, float]], kinds, seeds) -> str:
  """Markdown table: one row per metric, one column per kind, `mean +- std` over seeds."""
  metrics = list(dict.fromkeys(name for rows in per_run.values() for name in rows))
  header = f"| metric | {' | '.join(kinds)} |\n|---|{'---|' * len(kinds)}"
  lines = [header]
  for metric in metrics:
    cells = []
    for kind in kinds:
      values = [per_run[(kind, seed)][metric] for seed in seeds if metric in per_run[(kind, seed)]]
      cells.append("n/a" if not values else
                    f"{np.mean(values):.1f}" + (f" +- {np.std(values):.1f}" if len(values) > 1 else ""))
    lines.append(f"| {metric} | {' | '.join(cells)} |")
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  """Runs what `config.experiment` asks for; returns the results."""
  kinds, seeds = tuple(config.experiment.kinds), tuple(config.experiment.seeds)
  if not kinds:
    return train_and_evaluate(config, workdir)
  if not config.experiment.evaluate:
    raise ValueError("config.experiment.kinds compares evaluations: set config.experiment.evaluate=True")
  seeds = seeds or (config.seed,)
  shared_data = os.path.join(os.path.abspath(workdir), "synthetic")
  per_run = {}
  for seed in seeds:
    for kind in kinds:
      run_config = config.copy_and_resolve_references()
      with run_config.unlocked():
        run_config.model.kind = kind
        run_config.seed = seed
        run_config.experiment.kinds = ()
        run_config.data.synthetic_dir = run_config.data.synthetic_dir or shared_data
      print(f"\n=== {kind}, seed {seed} ===", flush=True)
      results = train_and_evaluate(run_config, os.path.join(workdir, f"{kind}_seed{seed}"))
      per_run[(kind, seed)] = headline_metrics(results["eval"])
  table = comparison_table(per_run, kinds, seeds)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
      json.dump({f"{kind}_seed{seed}": rows for (kind, seed), rows in per_run.items()}, f, indent=1)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
      f.write(table + "\n")
    print(f"\n{', '.join(kinds)} over seeds {seeds} (%):\n{table}", flush=True)
  return {"runs": per_run, "table": table}
