"""Grounding: which region query (and so which box) a phrase lands on.

A phrase goes to the region query whose embedding is most similar to the phrase's, and takes that
query's box from the last decoder layer. On a set with true boxes, box recall is the fraction of
phrases whose box overlaps the truth with IoU >= threshold. Next to it stand the diagnostics a
decoder that ignores the image cannot pass (grain_jax/ops/localization.py): how much the boxes move
between images, and what the best image-blind boxes, fitted on the training targets, score.
GRAIN models only: the plain-CLIP baseline has no region queries.
"""

import collections
import io
import itertools
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grain_jax import files
from grain_jax.data import eval_sets
from grain_jax.data import examples
from grain_jax.data import quality
from grain_jax.data import records
from grain_jax.eval.runner import Runner, embed_images, eval_copy, load_images
from grain_jax.ops import boxes as box_ops
from grain_jax.ops import localization

# Box outline colours, one per region query (cycled).
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


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


def ground(model, image, phrases: Sequence[str], runner: Runner | None = None,
           picture: str = "") -> list[dict]:
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
  placed = [{"phrase": p, "query": int(q), "box": regions["boxes"][0, q].tolist(), "score": float(s[q])}
            for p, q, s in zip(phrases, query, similarity)]
  if picture:
    draw(image, np.array([p["box"] for p in placed]), [f"{p['phrase']} ({p['score']:.2f})" for p in placed],
         picture)
  return placed


def to_pil(image) -> Image.Image:
  if isinstance(image, np.ndarray) and image.dtype == np.float32:  # preprocessed: undo the normalization
    image = np.clip((image * examples.IMAGENET_STD + examples.IMAGENET_MEAN) * 255, 0, 255).astype(np.uint8)
  if isinstance(image, np.ndarray):
    return Image.fromarray(image)
  return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)


def _to_pixels(boxes: np.ndarray, size: int) -> list[list[float]]:
  return (np.asarray(box_ops.cxcywh_to_xyxy(np.asarray(boxes, np.float32))) * size).reshape(-1, 4).tolist()


def draw_labelled(canvas: Image.Image, boxes: np.ndarray, labels: Sequence[str],
                   other_boxes: np.ndarray | None = None) -> None:
  """Draws `boxes [N, 4]` cxcywh in colour i with `labels[i]` above box i, over `other_boxes` as
  thin grey outlines."""
  pen, font, size = ImageDraw.Draw(canvas), ImageFont.load_default(), canvas.size[0]
  for box in [] if other_boxes is None else _to_pixels(other_boxes, size):
    pen.rectangle(box, outline="#b0b0b0", width=1)
  placed = []  # label rectangles so far: labels of boxes that coincide stack instead of hiding
  for i, (box, label) in enumerate(zip(_to_pixels(boxes, size), labels)):
    x1, y1, x2, y2 = box
    color = _COLORS[i % len(_COLORS)]
    pen.rectangle((x1, y1, x2, y2), outline=color, width=3)
    left, top, right, bottom = pen.textbbox((0, 0), label, font=font)
    width, height = right - left + 4, bottom - top + 4
    x = max(0, min(x1, size - width))  # the label stays inside the picture
    y = max(0, y1 - height)  # above the box, or inside it at the top edge
    while any(x < r[2] and r[0] < x + width and y < r[3] and r[1] < y + height for r in placed):
      y += height
    placed.append((x, y, x + width, y + height))
    pen.rectangle(placed[-1], fill=color)
    pen.text((x + 2 - left, y + 2 - top), label, fill="white", font=font)


def draw(image, boxes: np.ndarray, labels: Sequence[str], path: str, true_boxes: np.ndarray | None = None,
         true_labels: Sequence[str] | None = None, other_boxes: np.ndarray | None = None, size: int = 384) -> str:
  """Writes a PNG of `image` with labelled boxes; returns its path.

  Args:
    image: an image file, encoded bytes, uint8 `[h, w, 3]` or preprocessed float32 (drawn
      squashed to `size`, as the model sees it, so normalized boxes land where the model put them).
    boxes: `[N, 4]` normalized cxcywh, drawn in colour with `labels[i]` above box i.
    labels: N captions.
    path: the PNG to write (its folder is created).
    true_boxes: `[N, 4]` normalized cxcywh of the same N phrases, or None. When given, the picture
      has two panels: the true boxes on the left, `boxes` on the right, each phrase in one colour.
    true_labels: N captions of the true boxes (default: `labels`).
    other_boxes: `[M, 4]` further predicted boxes (e.g. the region queries no phrase chose), drawn
      thin and grey under `boxes`.
    size: side of each panel in pixels.
  """
  source = to_pil(image).convert("RGB").resize((size, size), Image.BICUBIC)
  predicted = source.copy()
  draw_labelled(predicted, boxes, labels, other_boxes)
  if true_boxes is None:
    picture = predicted
  else:
    truth = source.copy()
    draw_labelled(truth, true_boxes, labels if true_labels is None else true_labels)
    gap = 8
    picture = Image.new("RGB", (2 * size + gap, size + 16), "white")
    for x, panel, title in ((0, truth, "true boxes"), (size + gap, predicted, "predicted (chosen query)")):
      picture.paste(panel, (x, 16))
      ImageDraw.Draw(picture).text((x + 2, 2), title, fill="black", font=ImageFont.load_default())
  files.write_through(path, lambda f: picture.save(f, format="PNG"))
  return path


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


def box_metrics(image_boxes: np.ndarray, phrase_image: np.ndarray, chosen_query: np.ndarray,
                true_boxes: np.ndarray, iou_threshold: float = 0.5,
                fixed_boxes: np.ndarray | None = None) -> dict:
  """The grounding metrics of predicted boxes (what `evaluate` reports, pictures aside).

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


def evaluate(model, runner: Runner, data: eval_sets.GroundingSet, image_size: int,
             iou_threshold: float = 0.5, picture_dir: str = "", num_pictures: int = 0,
             fixed_boxes: np.ndarray | None = None) -> dict:
  """Box recall and localization diagnostics over a grounding set (`box_metrics`), and "pictures":
  the first `num_pictures` images, true boxes beside each phrase's chosen box (the other queries'
  boxes in grey), written into `picture_dir`."""
  _require_regions(model)
  regions = runner.map_images(embed_images, model, data.source, image_size)
  phrase_image = np.repeat(np.arange(len(data.phrases)), [len(p) for p in data.phrases])
  phrase_embeds = runner.encode_texts(model, [p for ps in data.phrases for p in ps])
  query, similarity = assign(phrase_embeds, regions["region"][phrase_image])  # all images at once
  pictures = []
  for i in range(min(num_pictures, len(data.phrases)) if picture_dir else 0):
    mine = np.flatnonzero(phrase_image == i)
    unchosen = np.setdiff1d(np.arange(regions["boxes"].shape[1]), query[mine])
    labels = [f"{data.phrases[i][j]} ({similarity[p, query[p]]:.2f})" for j, p in enumerate(mine)]
    pictures.append(draw(data.source[i]["image"], regions["boxes"][i, query[mine]], labels,
                         os.path.join(picture_dir, f"grounding_{i}.png"), true_boxes=data.boxes[i],
                         true_labels=data.phrases[i], other_boxes=regions["boxes"][i, unchosen]))
  true = np.concatenate(data.boxes).reshape(-1, 4)
  return dict(box_metrics(regions["boxes"], phrase_image, query, true, iou_threshold, fixed_boxes),
              pictures=pictures)
