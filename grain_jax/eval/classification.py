"""Zero-shot classification as an evaluation kind: one set per `config.eval.classification` entry.

Each set runs the heads of the evaluation protocol (`config.eval.protocol`, grain_jax/eval/protocol.py)
that the model and the set allow: region heads need a GRAIN model, every head but "names/global" a
descriptor file (grain_jax/eval/heads.py). Accuracies are in %. `average` is the paper's number: the
mean over its 11 datasets.
"""

import collections
import logging

import numpy as np

from grain_jax.eval import datasets, prompts, zeroshot
from grain_jax.eval import heads as heads_lib
from grain_jax.eval.evaluator import Compared, Context, Evaluator, Row
from grain_jax.eval.runner import Runner, Subset, model_image_size, spread


class Classification(Evaluator):
  """Top-1, top-5, per-class accuracy and confusions of every runnable head on one set."""

  section = "classification"

  @staticmethod
  def entries(eval_config) -> tuple[str, ...]:
    return tuple(eval_config.classification)

  def __init__(self, entry: str, context: Context):
    self.dataset = datasets.classification(entry, context.config, context.workdir)
    self.name, self.context = self.dataset.name, context
    if self.dataset.alignment in ("mixed", "partial"):
      hows = collections.Counter(p["how"] for p in self.dataset.descriptors["pairing"])
      logging.warning(
        "%s: descriptors paired with classes %s (results.json lists each class's pairing)",
        self.name,
        ", ".join(f"{n} by {how}" for how, n in hows.items()),
      )
    data = self.dataset.data
    self.source = Subset(data.source, spread(len(data.source), context.config.eval.max_examples))

  def run(self, model, runner: Runner) -> dict:
    data, cfg, settings = self.dataset.data, self.context.config.eval, self.context.settings
    runnable = [
      head
      for head in settings["heads"]
      if (data.descriptors or not heads_lib.needs_descriptors(head))
      and (model.kind == "grain" or not heads_lib.needs_regions(head))
    ]
    texts = zeroshot.texts_for_heads(
      model,
      runner,
      runnable,
      data.class_names,
      data.descriptors,
      prompts.templates(settings["templates"]),
      renormalize=settings["renormalize"],
      whole_words=cfg.whole_word_connectives,
      cache=self.context.text_cache,
    )
    metrics = zeroshot.evaluate(
      model,
      runner,
      self.source,
      model_image_size(model),
      texts,
      runnable,
      data.class_names,
      settings["alpha"],
      cfg.num_confusions,
    )
    undescribed = [c for c in data.class_names if not data.descriptors.get(c)] if data.descriptors else []
    return {
      "name": self.name,
      "in_average": self.dataset.in_average,
      "alignment": self.dataset.alignment,
      "num_classes": len(data.class_names),
      "num_examples": len(self.source),
      "chance_top1": 100 / len(data.class_names),
      "classes_without_descriptors": undescribed,
      "descriptors": self.dataset.descriptors,
      "heads": metrics,
    }

  @staticmethod
  def table_rows(results: dict) -> list[Row]:
    """Top-1 of every head and chance per set, then the means over the paper's datasets."""
    paper_head = results["settings"]["paper_head"]
    rows = []
    for name, result in results["classification"].items():
      for head, m in result["heads"].items():
        rows.append(Row(name, f"top1 {head}{' (paper)' if head == paper_head else ''}", f"{m['top1']:.2f}"))
      rows.append(Row(name, "top1 chance", f"{result['chance_top1']:.2f}"))
    average = results.get("classification_average")
    for head, value in (average or {}).get("top1", {}).items():
      label = (
        f"paper mean of {average['of']}"
        if head in average["paper_metric"]
        else f"partial mean ({len(average['covers'][head])} of {average['of']})"
      )
      rows.append(Row(label, f"top1 {head}", f"{value:.2f}"))
    return rows

  @staticmethod
  def compared(results: dict) -> list[Compared]:
    """Top-1 per set and head, the paper's head first (no skill: chance)."""
    return [
      Compared(f"{name} top-1 ({head})", result["heads"][head]["top1"], result["chance_top1"])
      for name, result in results["classification"].items()
      for head in sorted(result["heads"], key=_head_rank)
    ]


def _head_rank(head: str) -> tuple:
  """The paper's head first, then the heads every model can run, then those that need region queries."""
  return head != heads_lib.PAPER_HEAD, heads_lib.needs_regions(head), heads_lib.HEADS.index(head)


def average(classification: dict) -> dict:
  """Mean top-1 per head over the paper's 11 datasets that were evaluated with that head.

  A set counts as the registry set it stands for ("sun397:all" as "sun397"). A set whose descriptor
  file leaves classes unpaired (alignment "partial") is left out of the descriptions heads' means and
  listed in `partially_paired`. `covers` names the sets behind each head's mean; `paper_metric` lists
  the heads whose mean covers all 11 (only these are the paper's number; a head missing on some set is
  averaged over the rest).
  """
  members = [r for r in classification.values() if r["in_average"]]
  partial = [r["name"] for r in members if r.get("alignment") == "partial"]
  counted = lambda r, h: h in r["heads"] and not (h.startswith("descriptions/") and r["name"] in partial)
  heads = list(dict.fromkeys(h for r in members for h in r["heads"]))
  covers = {h: [r["name"] for r in members if counted(r, h)] for h in heads}
  top1 = {h: float(np.mean([r["heads"][h]["top1"] for r in members if counted(r, h)])) for h in heads if covers[h]}
  evaluated = {datasets.paper_set(r["name"]) for r in members}
  paper = set(datasets.PAPER_AVERAGE)
  return {
    "datasets": [r["name"] for r in members],
    "of": len(datasets.PAPER_AVERAGE),
    "missing": [n for n in datasets.PAPER_AVERAGE if n not in evaluated],
    "covers": covers,
    "top1": top1,
    "partially_paired": partial,
    "paper_metric": [h for h in heads if {datasets.paper_set(n) for n in covers[h]} >= paper],
  }
