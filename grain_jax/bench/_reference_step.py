"""The reference implementation's train step, rebuilt in PyTorch, to time ours against on the same
machine (`python -m grain_jax.bench step --reference true`; needs requirements-export.txt).

It does the work the authors' code does in one step, with its execution model:

- eager float32 PyTorch on the export's twin modules (`grain_jax/export/torch_modules.py`), started
  from the same parameters as the JAX step, decoder dropout on;
- every text (16 captions and 5 descriptions per image at batch 16) at the full 77-token context;
- the matching on the host with scipy, one `linear_sum_assignment` per image, twice for every
  decoder layer (12 solves per image with 6 layers; docs/reference_behaviour.md, "Losses"), though
  only the last layer's assignment reaches the loss;
- the three losses with the reference's effective weights, backward, AdamW (decay masked off 1-D
  parameters), logit_scale clamped to [0, ln 100].

`ReferenceStep.loss` with dropout off gives the JAX objective's value on a batch whose descriptions
are distinct texts (the reference counts duplicates as negatives, ours masks them), which the tests
check, so the two steps compute the same thing.
"""

import functools
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.nn.functional import cross_entropy

from grain_jax.export.torch_modules import GrainClipBackbone, RegionQueryDecoder
from grain_jax.torch_format import layout

MATCHINGS_PER_LAYER = 2
CHANNELS_FIRST = (0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
# Unit vectors along the last axis; norms below 1e-6 are clamped, as in our losses.
normalize = functools.partial(torch.nn.functional.normalize, dim=-1, eps=1e-6)


def _xyxy(boxes: torch.Tensor) -> torch.Tensor:
  center, size = boxes[..., :2], boxes[..., 2:]
  return torch.cat([center - size / 2, center + size / 2], -1)


def _pairwise_giou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
  """GIoU of every pair of `[N, 4]` x `[M, 4]` (x1, y1, x2, y2) boxes -> `[N, M]`."""
  area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(-1)
  area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(-1)
  inner = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
  intersection = inner.clamp_min(0).prod(-1)
  union = area1[:, None] + area2[None, :] - intersection
  hull = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:]) - torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
  hull_area = hull.clamp_min(0).prod(-1)
  return intersection / union - (hull_area - union) / hull_area


class ReferenceStep:
  """One reference-style training step on `[B, ...]` numpy batches shaped like the pipeline's.

  Args:
    config: our config (model, matching, loss and optim sections are read).
    state_dicts: our parameters in the reference's names, from `layout.to_reference`.
  """

  def __init__(self, config, state_dicts: dict[str, dict[str, np.ndarray]]):
    model_config = config.model.to_dict()
    self.backbone, self.decoder = GrainClipBackbone(model_config), RegionQueryDecoder(model_config)
    for module, key in ((self.backbone, layout.BACKBONE), (self.decoder, layout.DECODER)):
      module.load_state_dict({name: torch.from_numpy(np.array(value)) for name, value in state_dicts[key].items()})
    self.matching, self.weights = config.matching, config.loss
    parameters = [p for module in (self.backbone, self.decoder) for p in module.parameters()]
    self.optimizer = torch.optim.AdamW(
      [
        dict(params=[p for p in parameters if p.ndim > 1], weight_decay=config.optim.weight_decay),
        dict(params=[p for p in parameters if p.ndim <= 1], weight_decay=0.0),
      ],
      lr=config.optim.learning_rate,
      betas=(config.optim.b1, config.optim.b2),
      eps=config.optim.eps,
    )

  def train(self, mode: bool) -> None:
    self.backbone.train(mode)
    self.decoder.train(mode)

  def _match(
    self, boxes: torch.Tensor, targets: torch.Tensor, valid: np.ndarray
  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (query indices, target indices) of the minimum-cost assignment, solved on the host."""
    boxes, targets = boxes.detach(), targets.detach()
    cost = self.matching.cost_l1 * torch.cdist(
      boxes.flatten(0, 1), targets.flatten(0, 1), p=1
    ) - self.matching.cost_giou * _pairwise_giou(_xyxy(boxes.flatten(0, 1)), _xyxy(targets.flatten(0, 1)))
    cost = cost.view(boxes.shape[0], boxes.shape[1], -1).numpy()
    slots = targets.shape[1]
    assignments = []
    for image, image_valid in enumerate(valid):
      kept = np.flatnonzero(image_valid)
      queries, chosen = linear_sum_assignment(cost[image][:, image * slots + kept])
      assignments.append((queries, kept[chosen]))
    return assignments

  def loss(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of one batch (captions `[B, 77]`, descriptions `[B, K, 77]`) and its parts,
    named as our `losses.grain_loss` metrics."""
    images = torch.from_numpy(batch["image"]).permute(*CHANNELS_FIRST)
    global_embed, region_embed, layer_boxes = self.decoder(self.backbone.visual(images))
    caption_embed = self.backbone.encode_text(torch.from_numpy(batch["caption_ids"].astype(np.int64)))
    size, slots, length = batch["desc_ids"].shape
    desc_ids = torch.from_numpy(batch["desc_ids"].reshape(size * slots, length).astype(np.int64))
    desc_embed = self.backbone.encode_text(desc_ids).view(size, slots, -1)
    targets, valid = torch.from_numpy(batch["boxes"]), batch["box_valid"]
    # The reference's wasted work, kept so the timing is its: every layer matched twice, one used.
    for _ in range(MATCHINGS_PER_LAYER):
      assignments = [self._match(boxes, targets, valid) for boxes in layer_boxes]
    assignment = assignments[-1]

    scale = self.backbone.logit_scale.exp()
    logits = scale * normalize(global_embed) @ normalize(caption_embed).T
    labels = torch.arange(size)
    image_caption = (cross_entropy(logits, labels) + cross_entropy(logits.T, labels)) / 2

    images_index = torch.from_numpy(np.concatenate([np.full(len(q), i) for i, (q, _) in enumerate(assignment)]))
    queries = torch.from_numpy(np.concatenate([q for q, _ in assignment]))
    matched_targets = torch.from_numpy(np.concatenate([t for _, t in assignment]))
    predicted, target = layer_boxes[-1][images_index, queries], targets[images_index, matched_targets]
    num_boxes = max(int(valid.sum()), 1)
    l1 = (predicted - target).abs().sum() / num_boxes
    giou = (1 - torch.diagonal(_pairwise_giou(_xyxy(predicted), _xyxy(target)))).sum() / num_boxes

    flat_valid = torch.from_numpy(valid.reshape(-1))
    descriptions = normalize(desc_embed.reshape(size * slots, -1)[flat_valid])
    own = torch.cumsum(flat_valid.long(), 0)[images_index * slots + matched_targets] - 1
    region_logits = scale * normalize(region_embed[images_index, queries]) @ descriptions.T
    region = cross_entropy(region_logits, own) if len(own) else region_logits.sum()

    total = image_caption + self.weights.box_l1 * l1 + self.weights.box_giou * giou + self.weights.region * region
    parts = dict(loss_ic=image_caption.item(), loss_l1=l1.item(), loss_giou=giou.item(), loss_rd=region.item())
    return total, parts

  def __call__(self, batch: dict[str, np.ndarray]) -> float:
    """Forward, backward and the AdamW update; returns the loss."""
    self.train(True)
    self.optimizer.zero_grad(set_to_none=True)
    loss, _ = self.loss(batch)
    loss.backward()
    self.optimizer.step()
    with torch.no_grad():
      self.backbone.logit_scale.clamp_(0, math.log(100))
    return loss.item()
