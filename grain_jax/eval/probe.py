"""Linear probes: how much of each attribute an embedding keeps, read off by a linear classifier.

On a probe set (one object per image, its box and attributes: the synthetic `probe` split) every
embedding a model has is probed for every attribute (size, pattern, color, shape): the global
embedding (GRAIN's image query, CLIP's CLS), and for GRAIN the region query whose box overlaps the
object most (chosen by the box, not by any text, so the probe reads what the region learned from the
image). A multinomial logistic regression is fitted on the even images and scored (top-1 %) on the odd
ones; no skill is always answering the training half's most common value. `Probes` is the evaluation
kind: one set per `config.eval.probes` entry.
"""

import json
import os

import numpy as np
from scipy import optimize

from grain_jax.eval import datasets, grounding
from grain_jax.eval.evaluator import Compared, Context, Evaluator, Row, scored_compared, scored_rows
from grain_jax.eval.runner import Runner, embed_images, model_image_size
from grain_jax.ops import boxes as box_ops

ATTRIBUTES = ("size", "pattern", "color", "shape")
# L2 weight on the standardized features, fixed for every probe (not tuned on any result).
L2 = 1e-2


def read(path: str) -> tuple[list[dict], np.ndarray, dict[str, list[str]]]:
  """A probe.json -> (sources `{"image"}`, boxes `[N, 4]` cxcywh, attribute -> N values).

  Raises:
    ValueError naming the file when an image lacks a box or an attribute.
  """
  with open(path) as f:
    images = json.load(f)["images"]
  root = os.path.dirname(path)
  try:
    boxes = np.array([image["box"] for image in images], np.float32).reshape(-1, 4)
    values = {attribute: [image["attributes"][attribute] for image in images] for attribute in ATTRIBUTES}
  except KeyError as missing:
    raise ValueError(f"{path}: an image lacks {missing}") from None
  sources = [{"image": os.path.join(root, image["file"])} for image in images]
  return sources, np.asarray(box_ops.xyxy_to_cxcywh(boxes)), values


def loss_and_gradient(flat: np.ndarray, features: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
  """Mean softmax cross-entropy + L2 * |W|^2 of weights `flat` (a raveled `[E + 1, K]`: W, then the
  bias row) on `features [n, E]` with `onehot [n, K]` targets, and its gradient (raveled)."""
  weights = flat.reshape(features.shape[1] + 1, onehot.shape[1])
  logits = features @ weights[:-1] + weights[-1]
  logits -= logits.max(1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(1, keepdims=True)
  value = -np.log(np.maximum((probs * onehot).sum(1), 1e-30)).mean() + L2 * (weights[:-1] ** 2).sum()
  gradient = np.concatenate(
    [features.T @ (probs - onehot) / len(features) + 2 * L2 * weights[:-1], (probs - onehot).mean(0, keepdims=True)]
  )
  return value, gradient.ravel()


def fit_and_score(
  train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, num_classes: int
) -> float:
  """Test top-1 (%) of a multinomial logistic regression (`loss_and_gradient`, L-BFGS) fitted on
  standardized `train [n, E]` with `train_labels [n]` ints in [0, num_classes)."""
  mean, std = train.mean(0), train.std(0) + 1e-6
  features, test_features = (train - mean) / std, (test - mean) / std
  onehot = np.eye(num_classes)[train_labels]
  start = np.zeros((features.shape[1] + 1) * num_classes)
  result = optimize.minimize(
    loss_and_gradient, start, args=(features, onehot), jac=True, method="L-BFGS-B", options={"maxiter": 500}
  )
  weights = result.x.reshape(features.shape[1] + 1, num_classes)
  predicted = (test_features @ weights[:-1] + weights[-1]).argmax(1)
  return 100 * float((predicted == test_labels).mean())


class Probes(Evaluator):
  """Probe accuracies (%) of every embedding of a model for every attribute on one probe set."""

  section = "probes"

  @staticmethod
  def entries(eval_config) -> tuple[str, ...]:
    return tuple(eval_config.probes)

  def __init__(self, entry: str, context: Context):
    self.name, self.path = datasets.probe(entry, context.config, context.workdir)

  def run(self, model, runner: Runner) -> dict:
    """{"rows": {"probe <attribute> (<embedding>)": %}, "no_skill": {same keys: %}, "num_images"}."""
    sources, true_boxes, values = read(self.path)
    outputs = runner.map_images(embed_images, model, sources, model_image_size(model))
    embeddings = {"global": outputs["global"]}
    if "region" in outputs:
      ious = grounding.box_iou(outputs["boxes"], true_boxes[:, None])  # [N, Q]
      embeddings["region"] = outputs["region"][np.arange(len(sources)), ious.argmax(1)]
    train, test = np.arange(0, len(sources), 2), np.arange(1, len(sources), 2)
    rows, no_skill = {}, {}
    for attribute in ATTRIBUTES:
      names, labels = np.unique(values[attribute], return_inverse=True)
      majority = np.bincount(labels[train], minlength=len(names)).argmax()
      for which, embeds in embeddings.items():
        key = f"probe {attribute} ({which})"
        rows[key] = fit_and_score(embeds[train], labels[train], embeds[test], labels[test], len(names))
        no_skill[key] = 100 * float((labels[test] == majority).mean())
    return {"rows": rows, "no_skill": no_skill, "num_images": len(sources)}

  @staticmethod
  def table_rows(results: dict) -> list[Row]:
    return scored_rows(results["probes"])

  @staticmethod
  def compared(results: dict) -> list[Compared]:
    """Every row (no skill: always the most common value)."""
    return scored_compared(results["probes"])
