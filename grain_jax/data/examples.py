"""From a record to the arrays the model reads: image, tokens, top-k boxes and their masks.

Shared by the training pipeline and the eval pipelines, so that images are decoded, squashed and
normalized one way, boxes are converted xyxy -> cxcywh in one place, and text is tokenized in one
place.
"""

import hashlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from grain_jax.data import quality, records, tokenizer

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Description id of a padding slot; real ids are non-negative.
NO_TEXT_ID = -1


def load_image(image: bytes | str | np.ndarray, size: int) -> np.ndarray:
  """Decodes and squashes an image to `[size, size, 3]` float32, ImageNet-normalized.

  `image` is encoded bytes, a file path, or a uint8 `[h, w, 3]` / `[h, w]` array. The aspect ratio
  is not kept (as the reference, whose detector boxes were made on the same squash), so
  normalized boxes stay valid. Raises quality.BadRecordError for missing or corrupt images.
  """
  try:
    if isinstance(image, np.ndarray):
      pil = Image.fromarray(image)
    else:
      pil = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
      # JPEG decodes at a reduced scale directly when the image is much larger than `size`.
      pil.draft("RGB", (size, size))
    pil = pil.convert("RGB").resize((size, size), Image.BICUBIC)
  except FileNotFoundError as e:
    raise quality.BadRecordError(quality.MISSING_IMAGE, str(image)) from e
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise quality.BadRecordError(quality.CORRUPT_IMAGE, str(e)) from e
  pixels = np.asarray(pil, np.float32) / 255.0
  return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
  """`[..., 4]` (x1, y1, x2, y2) -> (cx, cy, w, h): the project's one conversion of records."""
  x1, y1, x2, y2 = np.moveaxis(np.asarray(boxes, np.float32), -1, 0)
  return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def tokenize(texts: Sequence[str]) -> np.ndarray:
  """`[n, 77]` int32 token ids: the data code's one call into the tokenizer."""
  return tokenizer.tokenize(list(texts)).astype(np.int32)


def text_ids(token_ids: np.ndarray) -> np.ndarray:
  """`[n, 77]` tokens -> `[n]` int32 ids, equal exactly when the tokens are.

  Tokens equal <=> texts equal after the tokenizer's normalization (case, whitespace, html). A
  31-bit digest (not Python's salted hash()) is the same on every host and in every run.
  """
  rows = np.ascontiguousarray(token_ids, np.int32)
  return np.array(
    [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=4).digest(), "little") & 0x7FFFFFFF for row in rows],
    np.int32,
  ).reshape(rows.shape[:-1])


def choose_caption(record: records.Record, rng: np.random.Generator, mllm_prob: float) -> tuple[str, list[str]]:
  """The alt-text or, with probability `mllm_prob`, the MLLM caption; returns (caption, repairs)."""
  caption = quality.clean_text(record.caption)
  mllm = quality.clean_text(record.mllm_caption)
  use_mllm = rng.random() < mllm_prob  # drawn always, so the stream doesn't depend on the text
  if mllm and (use_mllm or not caption):
    return mllm, [] if caption else [quality.CAPTION_FROM_MLLM]
  if not caption:
    raise quality.BadRecordError(quality.EMPTY_CAPTION, record.key)
  return caption, []


def top_regions(record: records.Record, num_regions: int) -> tuple[list[records.Region], list[str]]:
  """The record's `num_regions` best regions by detector score (what training supervises), after
  quality repairs; returns (regions, repairs). Raises quality.BadRecordError to skip."""
  regions, repairs = quality.clean_regions(record.regions)
  return sorted(regions, key=lambda r: -r.score)[:num_regions], repairs


def make_example(
  record: records.Record, rng: np.random.Generator, image_size: int, num_regions: int, mllm_prob: float = 0.5
) -> tuple[dict[str, np.ndarray], list[str]]:
  """One training example and the repairs it needed. Raises quality.BadRecordError to skip.

  Returns `image [H, W, 3] float32`, `caption_ids [77] int32`, `boxes [k, 4] float32` cxcywh,
  `box_valid [k] bool`, `desc_ids [k, 77] int32`, `desc_text_id [k] int32` (NO_TEXT_ID on padding),
  with H = W = `image_size` and k = `num_regions`; regions are the top-k by detector score.
  """
  caption, repairs = choose_caption(record, rng, mllm_prob)
  regions, region_repairs = top_regions(record, num_regions)
  image = load_image(record.image, image_size)

  tokens = tokenize([caption] + [r.description for r in regions])
  n = len(regions)
  boxes = np.zeros((num_regions, 4), np.float32)
  desc_ids = np.zeros((num_regions, tokens.shape[1]), np.int32)
  desc_text_id = np.full((num_regions,), NO_TEXT_ID, np.int32)
  if n:
    boxes[:n] = xyxy_to_cxcywh(np.array([r.box for r in regions]))
    desc_ids[:n] = tokens[1:]
    desc_text_id[:n] = text_ids(tokens[1:])
  example = {
    "image": image,
    "caption_ids": tokens[0],
    "boxes": boxes,
    "box_valid": np.arange(num_regions) < n,
    "desc_ids": desc_ids,
    "desc_text_id": desc_text_id,
  }
  return example, repairs + region_repairs


def prepare(data: bytes, rng: np.random.Generator, **kwargs: Any):
  """Serialized record -> (example or None when skipped, reasons). `kwargs` go to make_example."""
  try:
    return make_example(records.deserialize(data), rng, **kwargs)
  except quality.BadRecordError as e:
    return None, [e.reason]
