"""The evaluation entry point: every set listed in `config.eval`, one results JSON, one table.

  results = run_evaluation(config, model, workdir, mesh)   # writes workdir/eval/results.json

Classification runs the heads of the evaluation protocol (`config.eval.protocol`, grain_jax/eval/
protocol.py) that the model and the set allow: region heads need a GRAIN model, every head but
"names/global" a descriptor file (grain_jax/eval/heads.py). The results name the protocol and the
paper's head. Accuracies are in %.
"""

import collections
import json
import logging
import os

import jax
import numpy as np

from grain_jax import files
from grain_jax.data import eval_sets
from grain_jax.data import pipeline
from grain_jax.data import prompts
from grain_jax.eval import attention
from grain_jax.eval import datasets
from grain_jax.eval import grounding
from grain_jax.eval import heads as heads_lib
from grain_jax.eval import probe
from grain_jax.eval import protocol
from grain_jax.eval import retrieval
from grain_jax.eval import text_cache
from grain_jax.eval import zeroshot
from grain_jax.eval.runner import Runner, Subset, eval_copy, model_image_size, runner_from_config, spread
from grain_jax.ops import localization


def _subset_retrieval(data: eval_sets.RetrievalSet, keep: np.ndarray) -> eval_sets.RetrievalSet:
  """The images `keep` of a retrieval set with their captions (images renumbered)."""
  new_index = np.full(len(data.source), -1, np.int32)
  new_index[keep] = np.arange(len(keep))
  captions = [(c, new_index[i]) for c, i in zip(data.captions, data.caption_image) if new_index[i] >= 0]
  return eval_sets.RetrievalSet(Subset(data.source, keep), [c for c, _ in captions],
                                np.array([i for _, i in captions], np.int32))


def _subset_grounding(data: eval_sets.GroundingSet, keep: np.ndarray) -> eval_sets.GroundingSet:
  """The images `keep` of a grounding set."""
  return eval_sets.GroundingSet(Subset(data.source, keep), [data.phrases[i] for i in keep],
                                [data.boxes[i] for i in keep])


def _fixed_boxes(config, workdir: str, entry: str, fitted: dict) -> dict | None:
  """The grounding set `entry`'s image-blind baseline boxes, fitted on the training data's boxes
  (once per data directory, kept in `fitted`): {"boxes" [K, 4], "fitted_on_boxes", "data_dir"}, or
  None (logged) when `config.eval.fixed_box_records` is 0 or there is no training data to fit on."""
  cfg = config.eval
  if not cfg.fixed_box_records:
    return None
  if not config.data.train_dir and entry != "synthetic":
    logging.warning("grounding %s: no fixed-box baseline without config.data.train_dir (the training data)", entry)
    return None
  data_dir = pipeline.training_data_dir(config, workdir)
  if data_dir not in fitted:
    try:
      boxes = grounding.training_boxes(data_dir, config.model.decoder.num_region_queries, cfg.fixed_box_records)
    except (OSError, ValueError) as error:
      logging.warning("grounding: no fixed-box baseline, the training data in %s cannot be read: %s", data_dir, error)
      boxes = np.zeros((0, 4), np.float32)
    if not len(boxes):
      logging.warning("grounding: no fixed-box baseline, %s holds no region boxes", data_dir)
    fitted[data_dir] = None if not len(boxes) else {
        "boxes": localization.fit_fixed_boxes(boxes, config.model.decoder.num_region_queries, cfg.iou_threshold),
        "fitted_on_boxes": int(len(boxes)), "data_dir": data_dir}
  return fitted[data_dir]


def _classification(model, runner: Runner, entry: str, config, workdir: str, settings: dict,
                    cache: text_cache.TextCache) -> dict:
  dataset = datasets.classification(entry, config, workdir)
  data, cfg = dataset.data, config.eval
  if dataset.alignment in ("mixed", "partial"):
    hows = collections.Counter(p["how"] for p in dataset.descriptors["pairing"])
    logging.warning("%s: descriptors paired with classes %s (results.json lists each class's pairing)",
                    dataset.name, ", ".join(f"{n} by {how}" for how, n in hows.items()))
  runnable = [head for head in settings["heads"]
              if (data.descriptors or not heads_lib.needs_descriptors(head))
              and (model.kind == "grain" or not heads_lib.needs_regions(head))]
  texts = zeroshot.texts_for_heads(model, runner, runnable, data.class_names, data.descriptors,
                                   prompts.templates(settings["templates"]), renormalize=settings["renormalize"],
                                   whole_words=cfg.whole_word_connectives, cache=cache)
  source = Subset(data.source, spread(len(data.source), cfg.max_examples))
  metrics = zeroshot.evaluate(model, runner, source, model_image_size(model), texts, runnable,
                              data.class_names, settings["alpha"], cfg.num_confusions)
  undescribed = [c for c in data.class_names if not data.descriptors.get(c)] if data.descriptors else []
  return {"name": dataset.name, "in_average": dataset.in_average, "alignment": dataset.alignment,
          "num_classes": len(data.class_names), "num_examples": len(source), "chance_top1": 100 / len(data.class_names),
          "classes_without_descriptors": undescribed, "descriptors": dataset.descriptors, "heads": metrics}


def _average(classification: dict) -> dict:
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
  return {"datasets": [r["name"] for r in members], "of": len(datasets.PAPER_AVERAGE),
          "missing": [n for n in datasets.PAPER_AVERAGE if n not in evaluated], "covers": covers, "top1": top1,
          "partially_paired": partial,
          "paper_metric": [h for h in heads if {datasets.paper_set(n) for n in covers[h]} >= set(datasets.PAPER_AVERAGE)]}


def format_table(results: dict) -> str:
  """The results as an aligned plain-text table (top-1 %, R@1 %, box recall %)."""
  settings = results["settings"]
  departures = "".join(f", {k}={v}" for k, v in settings["departures"].items())
  header = f"protocol {settings['protocol']}{departures}; the paper's number is {settings['paper_head']} (paper)"
  rows = [("set", "metric", "value")]
  for name, result in results["classification"].items():
    for head, m in result["heads"].items():
      mark = " (paper)" if head == settings["paper_head"] else ""
      rows.append((name, f"top1 {head}{mark}", f"{m['top1']:.2f}"))
    rows.append((name, "top1 chance", f"{result['chance_top1']:.2f}"))
  average = results.get("classification_average")
  for head, value in (average or {}).get("top1", {}).items():
    covered = len(average["covers"][head])
    label = (f"paper mean of {average['of']}" if head in average["paper_metric"] else
             f"partial mean ({covered} of {average['of']})")
    rows.append((label, f"top1 {head}", f"{value:.2f}"))
  for name, r in results["retrieval"].items():
    rows.append((name, "i->t R@1/5/10", "/".join(f"{v:.1f}" for v in r["image_to_text"].values())))
    rows.append((name, "t->i R@1/5/10", "/".join(f"{v:.1f}" for v in r["text_to_image"].values())))
  for section in ("attention", "probes"):
    for name, r in results.get(section, {}).items():
      for metric, value in r["rows"].items():
        rows.append((name, metric, f"{value:.1f} (no skill {r['no_skill'][metric]:.1f})"))
  for name, r in results["grounding"].items():
    if "skipped" in r:
      rows.append((name, "grounding", r["skipped"]))
    else:
      rows.append((name, f"box recall@{r['iou_threshold']:g} (any query)",
                   f"{r['recall']:.1f} ({r['any_query_recall']:.1f})"))
      rows.append((name, "box conditioning ratio", f"{r['conditioning_ratio']:.2f}"))
      if "fixed_box_baseline" in r:
        fixed = r["fixed_box_baseline"]
        rows.append((name, "fixed boxes recall (best of k)",
                     f"{fixed['single_box_recall']:.1f} ({fixed['best_of_k_recall']:.1f})"))
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  return header + "\n" + "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def check_settings(cfg) -> None:
  """Raises ValueError naming the field unless the protocol, every head and entry and the template set
  exist; reads no data (config.validate runs this before training)."""
  settings = protocol.settings(cfg)
  if settings["templates"] not in prompts.TEMPLATE_SETS:
    raise ValueError(f"config.eval.templates={settings['templates']!r} must be one of {sorted(prompts.TEMPLATE_SETS)}")
  for entries, check in ((cfg.classification, datasets.check_classification), (cfg.retrieval, datasets.check_retrieval),
                         (cfg.grounding, datasets.check_grounding), (cfg.probes, datasets.check_probe)):
    for entry in entries:
      check(entry)


def run_evaluation(config, model, workdir: str, mesh: jax.sharding.Mesh | None = None,
                   checkpoint_id: str = "", out_dir: str = "") -> dict:
  """Evaluates `model` on every set in `config.eval`; writes workdir/eval/results.json and prints a table.

  Args:
    config: the full config (`eval`, `model`, `sharding_rules`, `data.synthetic`), its descriptor files
      checked by `config.validate(config, evaluation_files=True)`: without a file an id-labelled set
      (CUB, ImageNet) would be prompted with its ids.
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
  check_settings(cfg)  # fail on a bad setting before any work
  settings = protocol.settings(cfg)
  model = eval_copy(model)
  runner = runner_from_config(config, mesh)
  out_dir = out_dir or os.path.join(workdir, "eval")
  writer = jax.process_index() == 0
  cache = text_cache.TextCache(model, heads_lib.ClassTexts,
                               os.path.join(out_dir, "text_cache") if checkpoint_id else "")
  image_size = model_image_size(model)
  results = {
      "model": {"kind": model.kind, "checkpoint": checkpoint_id},
      "settings": {**settings, "paper_head": heads_lib.PAPER_HEAD,
                   **{k: cfg[k] for k in ("whole_word_connectives", "max_examples", "iou_threshold")}},
      "classification": {}, "retrieval": {}, "grounding": {}, "attention": {}, "probes": {},
  }
  for entry in cfg.classification:
    result = _classification(model, runner, entry, config, workdir, settings, cache)
    results["classification"][result["name"]] = result
  results["classification_average"] = _average(results["classification"])
  for entry in cfg.retrieval:
    name, data = datasets.retrieval(entry, config, workdir)
    data = _subset_retrieval(data, spread(len(data.source), cfg.max_examples))
    results["retrieval"][name] = retrieval.evaluate(model, runner, data, image_size)
  fitted = {}
  for entry in cfg.grounding:
    name, data = datasets.grounding(entry, config, workdir)
    data = _subset_grounding(data, spread(len(data.source), cfg.max_examples))
    if cfg.attention_maps:
      results["attention"][name] = attention.evaluate(model, runner, data, image_size,
                                                      os.path.join(out_dir, "attention", name) if writer else "",
                                                      cfg.num_pictures)
    if model.kind != "grain":
      results["grounding"][name] = {"skipped": "the plain-CLIP baseline has no region queries"}
      continue
    picture_dir = os.path.join(out_dir, "grounding", name) if writer else ""
    fixed = _fixed_boxes(config, workdir, entry, fitted)
    result = grounding.evaluate(model, runner, data, image_size, cfg.iou_threshold, picture_dir, cfg.num_pictures,
                                None if fixed is None else fixed["boxes"])
    if fixed is not None:
      result["fixed_box_baseline"].update(fitted_on_boxes=fixed["fitted_on_boxes"], data_dir=fixed["data_dir"])
    results["grounding"][name] = result
  for entry in cfg.probes:
    name, path = datasets.probe(entry, config, workdir)
    results["probes"][name] = probe.evaluate(model, runner, path, image_size)
  if writer:
    files.replace_durably(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1))
    print(format_table(results), flush=True)
  return results

