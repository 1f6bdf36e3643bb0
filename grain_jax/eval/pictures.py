"""Pictures of boxes on images: the grounding and attention evaluations' PNGs, and `ground`'s."""

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from grain_jax import files
from grain_jax.data import examples
from grain_jax.ops import boxes as box_ops

# Box outline colours, one per region query (cycled).
_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def to_pil(image) -> Image.Image:
  """An image file, encoded bytes, uint8 `[h, w, 3]` or preprocessed float32 `[H, W, 3]` as a PIL image."""
  if isinstance(image, np.ndarray) and image.dtype == np.float32:  # preprocessed: undo the normalization
    image = np.clip((image * examples.IMAGENET_STD + examples.IMAGENET_MEAN) * 255, 0, 255).astype(np.uint8)
  if isinstance(image, np.ndarray):
    return Image.fromarray(image)
  return Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)


def _to_pixels(boxes: np.ndarray, size: int) -> list[list[float]]:
  return (np.asarray(box_ops.cxcywh_to_xyxy(np.asarray(boxes, np.float32))) * size).reshape(-1, 4).tolist()


def draw_labelled(
  canvas: Image.Image, boxes: np.ndarray, labels: Sequence[str], other_boxes: np.ndarray | None = None
) -> None:
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


def draw(
  image,
  boxes: np.ndarray,
  labels: Sequence[str],
  path: str,
  true_boxes: np.ndarray | None = None,
  true_labels: Sequence[str] | None = None,
  other_boxes: np.ndarray | None = None,
  size: int = 384,
) -> str:
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
