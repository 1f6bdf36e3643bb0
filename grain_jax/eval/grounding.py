"""Grounding: which region query (and so which box) a phrase lands on.

A phrase goes to the region query whose embedding is most similar to the phrase's, and takes that
query's box from the last decoder layer. On a set with true boxes, box recall is the fraction of
phrases whose box overlaps the truth with IoU >= threshold. GRAIN models only: the plain-CLIP
baseline has no region queries.
"""

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grain_jax.data import eval_sets
from grain_jax.data import examples
from grain_jax.eval.runner import Runner, embed_images, eval_copy, load_images
from grain_jax.ops import boxes as box_ops

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


def _pil(image) -> Image.Image:
  if isinstance(image, np.ndarray) and image.dtype == np.float32:  # preprocessed: undo the normalization
    image = np.clip((image * examples.IMAGENET_STD + examples.IMAGENET_MEAN) * 255, 0, 255).astype(np.uint8)
  if isinstance(image, np.ndarray):
    return Image.fromarray(image)
  return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)


def draw(image, boxes: np.ndarray, labels: Sequence[str], path: str,
         true_boxes: np.ndarray | None = None, size: int = 384) -> str:
  """Writes a PNG of `image` with labelled boxes; returns its path.

  Args:
    image: an image file, encoded bytes, uint8 `[h, w, 3]` or preprocessed float32 (drawn
      squashed to `size`, as the model sees it, so normalized boxes land where the model put them).
    boxes: `[N, 4]` normalized cxcywh, drawn in colour with `labels[i]` above box i.
    labels: N captions.
    path: the PNG to write (its folder is created).
    true_boxes: `[M, 4]` normalized cxcywh drawn as thin white outlines, or None.
    size: side of the picture in pixels.
  """
  canvas = _pil(image).convert("RGB").resize((size, size), Image.BICUBIC)
  pen = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  to_pixels = lambda b: (np.asarray(box_ops.cxcywh_to_xyxy(np.asarray(b, np.float32))) * size).reshape(-1, 4)
  for box in [] if true_boxes is None else to_pixels(true_boxes).tolist():
    pen.rectangle(box, outline="white", width=1)
  placed = []  # label rectangles so far: labels of boxes that coincide stack instead of hiding
  for i, (box, label) in enumerate(zip(to_pixels(boxes).tolist(), labels)):
    x1, y1, x2, y2 = box
    color = _COLORS[i % len(_COLORS)]
    pen.rectangle((x1, y1, x2, y2), outline=color, width=3)
    left, top, right, bottom = pen.textbbox((0, 0), label, font=font)
    width, height = right - left + 4, bottom - top + 4
    y = max(0, y1 - height)  # above the box, or inside it at the top edge
    while any(x1 < r[2] and r[0] < x1 + width and y < r[3] and r[1] < y + height for r in placed):
      y += height
    placed.append((x1, y, x1 + width, y + height))
    pen.rectangle(placed[-1], fill=color)
    pen.text((x1 + 2 - left, y + 2 - top), label, fill="white", font=font)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path)
  return path


def evaluate(model, runner: Runner, data: eval_sets.GroundingSet, image_size: int,
             iou_threshold: float = 0.5, picture_dir: str = "", num_pictures: int = 0) -> dict:
  """Box recall over a grounding set; draws the first `num_pictures` images into `picture_dir`.

  Returns recall (% of phrases whose box has IoU >= `iou_threshold` with the truth), the same for
  the best of all queries per phrase ("any_query_recall": how good the boxes are, whatever the
  text matching), mean IoU, and the pictures' paths. Each picture shows every region query's box,
  labelled with the image's phrase that matches it best (and that similarity), over the true
  boxes in white.
  """
  _require_regions(model)
  regions = runner.map_images(embed_images, model, data.source, image_size)
  phrase_image = np.repeat(np.arange(len(data.phrases)), [len(p) for p in data.phrases])
  phrase_embeds = runner.encode_texts(model, [p for ps in data.phrases for p in ps])
  true = np.concatenate(data.boxes).reshape(-1, 4)
  query, similarity = assign(phrase_embeds, regions["region"][phrase_image])  # all images at once
  image_boxes = regions["boxes"][phrase_image]  # [P, Q, 4]
  chosen = image_boxes[np.arange(len(true)), query]
  ious = box_iou(chosen, true)
  # The best any query does on each phrase: what a perfect phrase -> query match would give.
  best_ious = box_iou(image_boxes, true[:, None]).max(axis=1)
  pictures = []
  for i in range(min(num_pictures, len(data.phrases)) if picture_dir else 0):
    phrases, mine = data.phrases[i], phrase_image == i
    best_phrase = similarity[mine].argmax(axis=0)  # [Q]: each query's best-matching phrase
    labels = [f"{phrases[p]} ({similarity[mine][p, q]:.2f})" for q, p in enumerate(best_phrase)]
    pictures.append(draw(data.source[i]["image"], regions["boxes"][i], labels,
                         os.path.join(picture_dir, f"grounding_{i}.png"), true_boxes=data.boxes[i]))
  return {
      "iou_threshold": iou_threshold,
      "recall": 100 * float((ious >= iou_threshold).mean()),
      "any_query_recall": 100 * float((best_ious >= iou_threshold).mean()),
      "mean_iou": float(ious.mean()),
      "num_phrases": int(len(ious)),
      "pictures": pictures,
  }
