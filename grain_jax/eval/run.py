"""The evaluation entry point: every set listed in `config.eval`, one results JSON, one table.

  results = run_evaluation(config, model, workdir, mesh)   # writes workdir/eval/results.json

Every kind of evaluation (grain_jax/eval/kinds.py: classification, retrieval, grounding, attention
maps, probes) evaluates each set its entries in `config.eval` name, one after the other on the same
runner; results.json holds them by kind and set, and the table (grain_jax/eval/table.py) lists their
rows. The results name the zero-shot protocol and the paper's head. Accuracies are in %.
"""

import json
import os

import jax

from grain_jax import files
from grain_jax.eval import heads as heads_lib
from grain_jax.eval import protocol, text_cache
from grain_jax.eval.classification import average
from grain_jax.eval.evaluator import Context
from grain_jax.eval.kinds import KINDS
from grain_jax.eval.runner import eval_copy, runner_from_config
from grain_jax.eval.table import format_table


def run_evaluation(
  config, model, workdir: str, mesh: jax.sharding.Mesh | None = None, checkpoint_id: str = "", out_dir: str = ""
) -> dict:
  """Evaluates `model` on every set in `config.eval`; writes workdir/eval/results.json and prints a table.

  Args:
    config: the full config (`eval`, `model`, `sharding_rules`, `data.synthetic`), validated with its
      evaluation files (`grain_jax.config.validate(config, evaluation_files=True)`): without a descriptor
      file an id-labelled set (CUB, ImageNet) would be prompted with its ids.
    model: a GrainModel, sharded over `mesh` when one is given (evaluated with dropout off; the
      object itself is left as it is, so training can go on with it).
    workdir: the run's directory; results go to workdir/eval.
    mesh: the mesh the model lives on, or None for the default device.
    checkpoint_id: names the weights (e.g. the step); when set, class text embeddings are cached
      under workdir/eval/text_cache, keyed by the text tower's weights (eval/text_cache.py), and
      reused by later evaluations of the same weights.
    out_dir: where results, pictures and the cache go instead of workdir/eval (a read-only workdir).

  Returns:
    {"model", "settings", "classification", "classification_average", "retrieval", "grounding", "attention",
    "probes"}.
  """
  cfg = config.eval
  settings = protocol.settings(cfg)
  model = eval_copy(model)
  runner = runner_from_config(config, mesh)
  out_dir = out_dir or os.path.join(workdir, "eval")
  writer = jax.process_index() == 0
  cache = text_cache.TextCache(
    model, heads_lib.ClassTexts, os.path.join(out_dir, "text_cache") if checkpoint_id else ""
  )
  context = Context(config, workdir, out_dir if writer else "", settings, cache)
  results = {
    "model": {"kind": model.kind, "checkpoint": checkpoint_id},
    "settings": {
      **settings,
      "paper_head": heads_lib.PAPER_HEAD,
      **{k: cfg[k] for k in ("whole_word_connectives", "max_examples", "iou_threshold")},
    },
    **{kind.section: {} for kind in KINDS},
  }
  for kind in KINDS:
    for entry in kind.entries(cfg):
      evaluator = kind(entry, context)
      results[kind.section][evaluator.name] = evaluator.run(model, runner)
  results["classification_average"] = average(results["classification"])
  if writer:
    files.replace_durably(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    print(format_table(results), flush=True)
  return results
