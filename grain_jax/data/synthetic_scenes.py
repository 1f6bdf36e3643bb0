"""Scenes of colored, patterned shapes: sampling, drawing and describing them.

Built for a tiny model to learn in a few hundred steps: few, strongly contrasting colors, shapes
that stay distinct at 32 px, and descriptions that name every attribute ("a large striped red
triangle"). Every function takes a numpy Generator, so a scene is a pure function of its seed.
"""

import dataclasses
import io
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS = {
  "red": (220, 30, 30),
  "green": (30, 170, 50),
  "blue": (40, 80, 230),
  "yellow": (245, 215, 30),
  "purple": (150, 50, 200),
  "orange": (250, 130, 20),
  "white": (245, 245, 245),
  "black": (15, 15, 15),
}
PATTERNS = ("solid", "striped", "dotted")
ATTRIBUTES = ("size", "pattern", "color", "shape")  # in the order a description names them
SIZES = {"small": (0.2, 0.3), "large": (0.38, 0.52)}  # side as a fraction of the image side
_DARK = ("blue", "purple", "black", "red", "green")


@dataclasses.dataclass(frozen=True)
class Thing:
  """One object: attributes and its exact box, normalized (x1, y1, x2, y2)."""

  shape: str
  color: str
  pattern: str
  size: str
  box: tuple[float, float, float, float]

  @property
  def description(self) -> str:
    return f"a {self.size} {self.pattern} {self.color} {self.shape}"

  @property
  def name(self) -> str:
    """The attribute-class name, without the size: "striped red triangle"."""
    return f"{self.pattern} {self.color} {self.shape}"


def _iou(a, b) -> float:
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def sample_box(rng: np.random.Generator, size: str) -> tuple[float, float, float, float]:
  side = rng.uniform(*SIZES[size])
  x1, y1 = rng.uniform(0.02, 0.98 - side, size=2)
  return (float(x1), float(y1), float(x1 + side), float(y1 + side))


def sample_scene(
  rng: np.random.Generator, num_things: int, max_overlap: float = 0.25, attributes: tuple[str, str, str] | None = None
) -> list[Thing]:
  """`num_things` objects with distinct descriptions, overlapping (occluding) at most a little.

  `attributes` = (pattern, color, shape) fixes those of the first object (eval splits).
  """
  things = []
  for _ in range(50 * num_things):
    if len(things) == num_things:
      break
    pattern, color, shape = (
      attributes if attributes and not things else (rng.choice(PATTERNS), rng.choice(list(COLORS)), rng.choice(SHAPES))
    )
    size = str(rng.choice(list(SIZES)))
    box = sample_box(rng, size)
    thing = Thing(str(shape), str(color), str(pattern), size, box)
    if all(t.description != thing.description and _iou(t.box, box) <= max_overlap for t in things):
      things.append(thing)
  return things


def _shape_polygon(shape: str, box: np.ndarray) -> list[tuple[float, float]] | None:
  """Vertices of `shape` inscribed in pixel `box`; None for the circle (drawn as an ellipse)."""
  x1, y1, x2, y2 = box
  cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
  if shape == "circle":
    return None
  if shape == "square":
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
  if shape == "triangle":
    return [(cx, y1), (x2, y2), (x1, y2)]
  if shape == "diamond":
    return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
  if shape == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2, 0.45, 1.0)
    return list(zip(cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)))
  t = 0.3  # cross: arms 40% of the side wide
  a, b = (x1 + t * 2 * rx, x2 - t * 2 * rx), (y1 + t * 2 * ry, y2 - t * 2 * ry)
  return [
    (a[0], y1),
    (a[1], y1),
    (a[1], b[0]),
    (x2, b[0]),
    (x2, b[1]),
    (a[1], b[1]),
    (a[1], y2),
    (a[0], y2),
    (a[0], b[1]),
    (x1, b[1]),
    (x1, b[0]),
    (a[0], b[0]),
  ]


def _pattern_mask(pattern: str, size: int) -> np.ndarray:
  """`[size, size]` bool: where the pattern's second color shows.

  The period is 1/8 of the image, so a pattern stays visible (not aliased into a tint) when the
  pipeline squashes the image down to as little as 32 px.
  """
  period = max(4, size // 8)
  y, x = np.mgrid[:size, :size]
  if pattern == "striped":
    return ((x + y) // (period // 2)) % 2 == 1
  if pattern == "dotted":
    return ((x % period) < period // 2) & ((y % period) < period // 2)
  return np.zeros((size, size), bool)


def render(rng: np.random.Generator, things: list[Thing], size: int) -> np.ndarray:
  """`[size, size, 3]` uint8: a muted background, faint clutter, then the objects in order."""
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[:] = rng.integers(90, 150, size=3)
  clutter = Image.fromarray(canvas)
  draw = ImageDraw.Draw(clutter)
  for _ in range(rng.integers(2, 6)):  # thin low-contrast lines no description mentions
    tone = tuple(int(v) for v in rng.integers(70, 170, size=3))
    draw.line([tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))], fill=tone, width=1)
  canvas = np.array(clutter)
  canvas = np.clip(canvas + rng.normal(0, 6, canvas.shape), 0, 255).astype(np.uint8)
  for thing in things:
    mask_image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_image)
    pixels = np.array(thing.box) * size
    polygon = _shape_polygon(thing.shape, pixels)
    if polygon is None:
      draw.ellipse(list(pixels), fill=255)
    else:
      draw.polygon(polygon, fill=255)
    mask = np.array(mask_image) > 127
    second = (235, 235, 235) if thing.color in _DARK else (25, 25, 25)
    pattern = _pattern_mask(thing.pattern, size)
    canvas[mask & ~pattern] = COLORS[thing.color]
    canvas[mask & pattern] = second
  return canvas


def encode_png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "PNG", compress_level=1)
  return out.getvalue()


def encode_jpeg(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", quality=90)
  return out.getvalue()


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def mention(thing: Thing, named) -> str:
  """`thing` by the attributes in `named` (ATTRIBUTES), in a description's order: "a striped shape"
  when only the pattern is named, `thing.description` when all are."""
  words = [getattr(thing, attribute) for attribute in ATTRIBUTES[:-1] if attribute in named]
  return " ".join(["a", *words, thing.shape if "shape" in named else "shape"])


def rich_caption(
  things: list[Thing], rng: np.random.Generator, object_share: float = 1.0, attribute_share: float = 1.0
) -> str:
  """What an MLLM would say, in a random order: ceil(object_share x objects) of the objects, each by
  ceil(attribute_share x 4) of its attributes: what it is (its shape) first, then adjectives drawn at
  random. By default every object with all its attributes, drawing nothing beyond the order."""
  order = rng.permutation(len(things))[: math.ceil(object_share * len(things))]
  count = math.ceil(attribute_share * len(ATTRIBUTES))
  adjectives = ATTRIBUTES[:-1]
  parts = [
    mention(
      things[i],
      ATTRIBUTES
      if count >= len(ATTRIBUTES)
      else {"shape", *rng.choice(adjectives, count - 1, replace=False)}
      if count
      else (),
    )
    for i in order
  ]
  return (_join(parts) if parts else "some shapes") + " on a gray background"


def weak_caption(things: list[Thing], rng: np.random.Generator) -> str:
  """Alt-text-like: noisy, mentions one attribute of one object or just the count."""
  thing = things[rng.integers(len(things))]
  templates = (
    f"a picture with {len(things)} shapes",
    f"{thing.color} stuff",
    f"a {thing.shape} and more",
    f"clip art, {thing.pattern} {thing.shape}",
  )
  return templates[rng.integers(len(templates))]


def detections(
  things: list[Thing], rng: np.random.Generator, miss_prob: float = 0.1, jitter: float = 0.02
) -> list[tuple[str, tuple[float, ...], float]]:
  """Detector-like regions: (description, jittered box, score); misses some objects."""
  out = []
  for thing in things:
    if rng.random() < miss_prob:
      continue
    box = np.clip(np.array(thing.box) + rng.normal(0, jitter, 4), 0.0, 1.0)
    score = float(np.clip(rng.normal(0.55 if thing.size == "small" else 0.75, 0.12), 0.3, 0.99))
    out.append((thing.description, tuple(float(v) for v in box), score))
  return out
