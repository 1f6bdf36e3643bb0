"""Grounding: which region query (and so which box) a phrase lands on.

A phrase goes to the region query whose embedding is most similar to the phrase's, and takes that
query's box from the last decoder layer. On a set with true boxes, box recall is the fraction of
phrases whose box overlaps the truth with IoU >= threshold. Next to it stand the diagnostics a
decoder that ignores the image cannot pass (grain_jax/ops/localization.py): how much the boxes move
between images, and what the best image-blind boxes, fitted on the training targets, score.
GRAIN models only: the plain-CLIP baseline has no region queries. `Grounding` is the evaluation kind:
one set per `config.eval.grounding` entry.
"""

import collections
import itertools
import logging
import os
from collections.abc import Sequence

import numpy as np

from grain_jax.data import examples, pipeline, quality, records
from grain_jax.eval import datasets, pictures, sets
from grain_jax.eval.evaluator import Compared, Context, Evaluator, Row
from grain_jax.eval.runner import Runner, Subset, embed_images, eval_copy, load_images, model_image_size, spread
from grain_jax.ops import boxes as box_ops
from grain_jax.ops import localization


def assign(phrase_embeds: np.ndarray, region_embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The best region query `[P]` of each phrase, and all similarities `[P, Q]`.

  Args:
    phrase_embeds: `[P, E]` normalized.
    region_embeds: `[Q, E]` normalized region queries of one image, or `[P, Q, E]`: those of
      each phrase's image.
  """
  similarity = np.matmul(region_embeds, phrase_embeds[..., None])[..., 0]
  return similarity.argmax(axis=1), similarity


def box_iou(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
  """IoU of paired cxcywh boxes `[..., 4]` (leading shapes broadcast) -> `[...]`."""
  return np.asarray(box_ops.iou(box_ops.cxcywh_to_xyxy(predicted), box_ops.cxcywh_to_xyxy(true)))


def _require_regions(model) -> None:
  if model.kind != "grain":
    raise ValueError("grounding needs region queries; the plain-CLIP baseline (model.kind='clip') has none")


def ground(model, image, phrases: Sequence[str], runner: Runner | None = None, picture: str = "") -> list[dict]:
  """Where each phrase lands in one image.

  Args:
    model: a GRAIN model (kind "grain"); run with dropout off.
    image: an image file, encoded bytes, uint8 `[h, w, 3]`, or preprocessed float32 `[H, W, 3]`.
    phrases: texts to place.
    runner: where to run (default: the default device).
    picture: when set, a PNG written there of the image with each phrase's box.

  Returns:
    Per phrase: {"phrase", "query" (region query index), "box" (normalized cx, cy, w, h),
    "score" (cosine similarity)}.
  """
  _require_regions(model)
  runner, model = runner or Runner(), eval_copy(model)
  single = image[None] if isinstance(image, np.ndarray) and image.dtype == np.float32 else [image]
  regions = runner.map_image_array(embed_images, model, load_images(model, single))
  query, similarity = assign(runner.encode_texts(model, phrases), regions["region"][0])
  placed = [
    {"phrase": p, "query": int(q), "box": regions["boxes"][0, q].tolist(), "score": float(s[q])}
    for p, q, s in zip(phrases, query, similarity)
  ]
  if picture:
    pictures.draw(
      image, np.array([p["box"] for p in placed]), [f"{p['phrase']} ({p['score']:.2f})" for p in placed], picture
    )
  return placed


def training_boxes(data_dir: str, num_regions: int, max_records: int) -> np.ndarray:
  """`[M, 4]` cxcywh: the boxes training supervises (each record's top `num_regions` regions by
  score) of the first `max_records` records of the dataset in `data_dir`; records training would
  skip are skipped here too, counted and logged."""
  boxes, skipped = [], collections.Counter()
  for record in itertools.islice(records.read_records(data_dir), max_records):
    try:
      regions, _ = examples.top_regions(record, num_regions)
    except quality.BadRecordError as error:
      skipped[error.reason] += 1
      continue
    boxes += [region.box for region in regions]
  if skipped:
    logging.warning("fixed-box baseline: skipped bad records of %s: %s", data_dir, dict(skipped))
  return examples.xyxy_to_cxcywh(np.array(boxes, np.float32).reshape(-1, 4))


def fixed_box_baseline(fixed_boxes: np.ndarray, true_boxes: np.ndarray, iou_threshold: float) -> dict:
  """What boxes that ignore the image score on `true_boxes [P, 4]`, in %: the K fixed boxes
  (`localization.fit_fixed_boxes`, best first) as "best_of_k_recall" (some box hits: the bar for the
  best query) and the first of them alone as "single_box_recall" (the bar for the chosen query)."""
  return {
    "boxes": np.asarray(fixed_boxes).tolist(),
    "best_of_k_recall": localization.best_of_k_recall(fixed_boxes, true_boxes, iou_threshold),
    "single_box_recall": localization.best_of_k_recall(fixed_boxes[:1], true_boxes, iou_threshold),
  }


def box_metrics(
  image_boxes: np.ndarray,
  phrase_image: np.ndarray,
  chosen_query: np.ndarray,
  true_boxes: np.ndarray,
  iou_threshold: float = 0.5,
  fixed_boxes: np.ndarray | None = None,
) -> dict:
  """The grounding metrics of predicted boxes (what `Grounding.run` reports, pictures aside).

  Args:
    image_boxes: `[N, Q, 4]` every region query's box on each of N images (cxcywh).
    phrase_image: `[P]` the image of each phrase.
    chosen_query: `[P]` the query each phrase chose.
    true_boxes: `[P, 4]` each phrase's true box.
    iou_threshold: a box counts when IoU >= this.
    fixed_boxes: `[K, 4]` image-blind boxes fitted on the training targets, best first
      (`localization.fit_fixed_boxes`), or None (no baseline).

  Returns (recalls in %):
    recall: phrases whose chosen query's box hits (IoU >= threshold) the truth;
    any_query_recall: phrases some query of their image hits (how good the boxes are, whatever
      the text matching);
    mean_iou: of the chosen boxes;
    query_choice_accuracy: of the phrases some query hits, those whose chosen query hits too (how
      well the text picks among good boxes);
    conditioning_ratio: `localization.conditioning_ratio` of the boxes over the images against the
      true boxes (0 = the same boxes for every image);
    num_phrases; and fixed_box_baseline (`fixed_box_baseline`) when `fixed_boxes` are given.
  """
  per_phrase = image_boxes[phrase_image]  # [P, Q, 4]
  all_ious = box_iou(per_phrase, true_boxes[:, None])  # [P, Q]
  ious = all_ious[np.arange(len(true_boxes)), chosen_query]
  hit, localizable = ious >= iou_threshold, all_ious.max(axis=1) >= iou_threshold
  results = {
    "iou_threshold": iou_threshold,
    "recall": 100 * float(hit.mean()),
    "any_query_recall": 100 * float(localizable.mean()),
    "mean_iou": float(ious.mean()),
    "query_choice_accuracy": 100 * float(hit[localizable].mean()) if localizable.any() else 0.0,
    "conditioning_ratio": float(localization.conditioning_ratio(image_boxes, true_boxes)),
    "num_phrases": int(len(ious)),
  }
  if fixed_boxes is not None:
    results["fixed_box_baseline"] = fixed_box_baseline(fixed_boxes, true_boxes, iou_threshold)
  return results


def subset(data: sets.GroundingSet, keep: np.ndarray) -> sets.GroundingSet:
  """The images `keep` of a grounding set."""
  return sets.GroundingSet(Subset(data.source, keep), [data.phrases[i] for i in keep], [data.boxes[i] for i in keep])


def fitted_fixed_boxes(config, workdir: str, entry: str, fitted: dict) -> dict | None:
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
    num_regions = config.model.decoder.num_region_queries
    try:
      boxes = training_boxes(data_dir, num_regions, cfg.fixed_box_records)
    except (OSError, ValueError) as error:
      logging.warning("grounding: no fixed-box baseline, the training data in %s cannot be read: %s", data_dir, error)
      boxes = np.zeros((0, 4), np.float32)
    if not len(boxes):
      logging.warning("grounding: no fixed-box baseline, %s holds no region boxes", data_dir)
    fitted[data_dir] = (
      None
      if not len(boxes)
      else {
        "boxes": localization.fit_fixed_boxes(boxes, num_regions, cfg.iou_threshold),
        "fitted_on_boxes": int(len(boxes)),
        "data_dir": data_dir,
      }
    )
  return fitted[data_dir]


def grounding_set(entry: str, context: Context) -> tuple[str, sets.GroundingSet]:
  """(name, set) of the grounding set `entry` names, at most `config.eval.max_examples` of its images
  spread over it; read once per evaluation for every kind that scores it (grounding, attention maps)."""
  if entry not in context.grounding_sets:
    name, data = datasets.grounding(entry, context.config, context.workdir)
    context.grounding_sets[entry] = name, subset(data, spread(len(data.source), context.config.eval.max_examples))
  return context.grounding_sets[entry]


class Grounding(Evaluator):
  """Box recall and localization diagnostics (`box_metrics`) over one grounding set, beside the
  image-blind fixed boxes fitted on the training data; GRAIN models only (the plain-CLIP baseline's
  result says it was skipped)."""

  section = "grounding"

  @staticmethod
  def entries(eval_config) -> tuple[str, ...]:
    return tuple(eval_config.grounding)

  def __init__(self, entry: str, context: Context):
    self.entry, self.context = entry, context
    self.name, self.data = grounding_set(entry, context)

  def run(self, model, runner: Runner) -> dict:
    """`box_metrics`, with "fixed_box_baseline" (where fitted) and "pictures": the first
    `config.eval.num_pictures` images, true boxes beside each phrase's chosen box (the other queries'
    boxes in grey)."""
    if model.kind != "grain":
      return {"skipped": "the plain-CLIP baseline has no region queries"}
    context, data = self.context, self.data
    cfg = context.config.eval
    fixed = fitted_fixed_boxes(context.config, context.workdir, self.entry, context.fitted_boxes)
    regions = runner.map_images(embed_images, model, data.source, model_image_size(model))
    phrase_image = np.repeat(np.arange(len(data.phrases)), [len(p) for p in data.phrases])
    phrase_embeds = runner.encode_texts(model, [p for ps in data.phrases for p in ps])
    query, similarity = assign(phrase_embeds, regions["region"][phrase_image])  # all images at once
    picture_dir = context.picture_dir(self.section, self.name)
    drawn = []
    for i in range(min(cfg.num_pictures, len(data.phrases)) if picture_dir else 0):
      mine = np.flatnonzero(phrase_image == i)
      unchosen = np.setdiff1d(np.arange(regions["boxes"].shape[1]), query[mine])
      labels = [f"{data.phrases[i][j]} ({similarity[p, query[p]]:.2f})" for j, p in enumerate(mine)]
      drawn.append(
        pictures.draw(
          data.source[i]["image"],
          regions["boxes"][i, query[mine]],
          labels,
          os.path.join(picture_dir, f"grounding_{i}.png"),
          true_boxes=data.boxes[i],
          true_labels=data.phrases[i],
          other_boxes=regions["boxes"][i, unchosen],
        )
      )
    true = np.concatenate(data.boxes).reshape(-1, 4)
    result = dict(
      box_metrics(
        regions["boxes"], phrase_image, query, true, cfg.iou_threshold, None if fixed is None else fixed["boxes"]
      ),
      pictures=drawn,
    )
    if fixed is not None:
      result["fixed_box_baseline"].update(fitted_on_boxes=fixed["fitted_on_boxes"], data_dir=fixed["data_dir"])
    return result

  @staticmethod
  def table_rows(results: dict) -> list[Row]:
    rows = []
    for name, r in results["grounding"].items():
      if "skipped" in r:
        rows.append(Row(name, "grounding", r["skipped"]))
        continue
      rows.append(
        Row(name, f"box recall@{r['iou_threshold']:g} (any query)", f"{r['recall']:.1f} ({r['any_query_recall']:.1f})")
      )
      rows.append(Row(name, "box conditioning ratio", f"{r['conditioning_ratio']:.2f}"))
      if "fixed_box_baseline" in r:
        fixed = r["fixed_box_baseline"]
        rows.append(
          Row(
            name,
            "fixed boxes recall (best of k)",
            f"{fixed['single_box_recall']:.1f} ({fixed['best_of_k_recall']:.1f})",
          )
        )
    return rows

  @staticmethod
  def compared(results: dict) -> list[Compared]:
    """Recall of the chosen and the best query (no skill: the image-blind fixed boxes, where fitted)
    and the boxes' spread across images (no skill: 0)."""
    rows = []
    for name, r in results["grounding"].items():
      if "recall" not in r:
        continue
      at, fixed = f"@{r['iou_threshold']:g}", r.get("fixed_box_baseline")
      rows += [
        Compared(
          f"{name} grounding recall{at} (chosen query)", r["recall"], fixed["single_box_recall"] if fixed else None
        ),
        Compared(
          f"{name} grounding recall{at} (best query)",
          r["any_query_recall"],
          fixed["best_of_k_recall"] if fixed else None,
        ),
        Compared(f"{name} grounding box spread (% of the true boxes')", 100 * r["conditioning_ratio"], 0.0),
      ]
    return rows
