"""Stage 2: an open-vocabulary detector (OWLv2) boxes each description of an image.

Each image is squashed to the detector's square input, as the training input is squashed
(docs/reference_behaviour.md, "Data"), so that the detector's normalized boxes are normalized boxes of the image itself.
Every predicted box takes the one description it scores highest on and is kept when that score
is above the threshold (the reference's rule; one description can get several boxes).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from scipy import special

from grain_jax.annotate import hf
from grain_jax.data import records

DEFAULT_MODEL = "google/owlv2-base-patch16-ensemble"
DEFAULT_THRESHOLD = 0.3


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
  """`[..., 4]` (cx, cy, w, h) -> (x1, y1, x2, y2), in numpy.

  Not grain_jax.ops.boxes: a JAX call here would make JAX claim the GPU the detector runs on.
  """
  center, size = boxes[..., :2], boxes[..., 2:]
  return np.concatenate([center - size / 2, center + size / 2], axis=-1)


def select_regions(
  logits: np.ndarray, boxes: np.ndarray, descriptions: Sequence[str], threshold: float = DEFAULT_THRESHOLD
) -> list[records.Region]:
  """One image's detector output -> its regions, highest score first.

  `logits [boxes, queries]` are the detector's scores of every predicted box against every text
  query; query q < len(descriptions) is descriptions[q], later queries are the batch's padding
  and never chosen. `boxes [boxes, 4]` are normalized (cx, cy, w, h). A box is kept when the
  sigmoid of its best description's logit is above `threshold`; regions hold (x1, y1, x2, y2).
  """
  if not descriptions:
    return []
  logits = np.asarray(logits, np.float64)[:, : len(descriptions)]
  labels = logits.argmax(axis=-1)
  scores = special.expit(logits.max(axis=-1))
  kept = [i for i in np.argsort(-scores, kind="stable") if scores[i] > threshold]
  corners = cxcywh_to_xyxy(np.asarray(boxes, np.float64)[kept])
  return [
    records.Region(descriptions[labels[i]], tuple(float(v) for v in box), float(scores[i]))
    for i, box in zip(kept, corners)
  ]


class Detector:
  """Runs the detector on batches of images, each with its own descriptions as text queries."""

  def __init__(
    self, model_id: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", threshold: float = DEFAULT_THRESHOLD
  ):
    self.torch, _ = hf.import_torch_and_transformers()
    self.device, self.dtype = hf.device_and_dtype(device, dtype)
    self.processor, self.model = hf.load("AutoModelForZeroShotObjectDetection", model_id, self.device, self.dtype)
    size = self.processor.image_processor.size
    self.input_size = (size["width"], size["height"])
    self.threshold = threshold

  def detect(self, images: Sequence[Image.Image], descriptions: Sequence[Sequence[str]]) -> list[list[records.Region]]:
    """The regions of each RGB image for its descriptions; images without any are not run."""
    todo = [i for i, texts in enumerate(descriptions) if texts]
    regions: list[list[records.Region]] = [[] for _ in images]
    if not todo:
      return regions
    squashed = [images[i].resize(self.input_size, Image.BICUBIC) for i in todo]
    # The processor pads every image's query list to the longest with blank queries. Its resize
    # would be the identity on the squashed images, and costs as much as the rest of it.
    inputs: Any = self.processor(
      text=[list(descriptions[i]) for i in todo], images=squashed, truncation=True, do_resize=False, return_tensors="pt"
    )
    inputs = inputs.to(device=self.device, dtype=self.dtype)
    with self.torch.inference_mode():
      outputs = self.model(**inputs)
    logits = outputs.logits.float().cpu().numpy()
    boxes = outputs.pred_boxes.float().cpu().numpy()
    for row, i in enumerate(todo):
      regions[i] = select_regions(logits[row], boxes[row], descriptions[i], self.threshold)
    return regions
