"""Attention maps: where a model's image embedding reads from, scored against the true boxes.

GRAIN's global embedding is its decoder's image query: its map is that query's cross-attention over
the image tokens in the last decoder layer; plain CLIP's is what the CLS token attends to in the last
ViT block. Each map is averaged over heads, the CLS token's own share is dropped and the rest
renormalized over the patch grid. On a grounding set (images with true boxes) two numbers per map:

  pointing  the map's peak patch lies inside a true box (the pointing game);
  mass      the share of the map inside the true boxes.

The global maps are scored against the union of the image's boxes; GRAIN's region queries, each
phrase's chosen query (as grounding chooses it) against that phrase's own box. A map that ignores the
image (uniform) scores the share of patches inside the boxes on both: that is the no-skill row.
A patch is inside a box when its centre is. `AttentionMaps` is the evaluation kind: one set per
`config.eval.grounding` entry when `config.eval.attention_maps`.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from grain_jax import files
from grain_jax.eval import grounding, pictures
from grain_jax.eval.evaluator import Compared, Context, Evaluator, Row, scored_compared, scored_rows
from grain_jax.eval.runner import Runner, image_embeddings, model_image_size
from grain_jax.ops import boxes as box_ops


def patch_maps(weights: jax.Array) -> jax.Array:
  """Attention weights `[B, heads, R, 1 + N]` over CLS and N patches -> `[B, R, N]` maps: mean over
  heads, CLS dropped, each renormalized to sum to 1 over the patches."""
  mean = weights.mean(axis=1)[..., 1:]
  return mean / jnp.maximum(mean.sum(axis=-1, keepdims=True), 1e-12)


@nnx.jit
def _maps(model, images: jax.Array) -> dict[str, jax.Array]:
  outputs = {"maps": patch_maps(model.image_attention(images))}
  if model.kind == "grain":
    outputs["region"] = image_embeddings(model, images)["region"]
  return outputs


def inside(boxes: np.ndarray, grid: int) -> np.ndarray:
  """`[..., 4]` normalized cxcywh boxes -> `[..., grid * grid]` bool: the patches (row-major) whose
  centre lies inside the box."""
  centres = (np.arange(grid) + 0.5) / grid
  x1, y1, x2, y2 = np.moveaxis(np.asarray(box_ops.cxcywh_to_xyxy(np.asarray(boxes, np.float32))), -1, 0)
  rows = (centres >= y1[..., None]) & (centres <= y2[..., None])  # [..., grid]
  columns = (centres >= x1[..., None]) & (centres <= x2[..., None])  # [..., grid]
  return (rows[..., :, None] & columns[..., None, :]).reshape(*rows.shape[:-1], grid * grid)


def map_scores(maps: np.ndarray, target: np.ndarray) -> dict[str, float]:
  """Pointing and mass (in %) of `maps [M, N]` against `target [M, N]` bool patches, and what a
  uniform map scores on both ("uniform": the mean share of target patches)."""
  peak = maps.argmax(axis=-1)
  share = target.mean(axis=-1)
  return {
    "pointing": 100 * float(target[np.arange(len(maps)), peak].mean()),
    "mass": 100 * float((maps * target).sum(axis=-1).mean()),
    "uniform": 100 * float(share.mean()),
  }


def _picture(image, boxes: np.ndarray, phrases, attention: np.ndarray, title: str, path: str, size: int = 384) -> str:
  """True boxes beside the attention map laid over the image, as a PNG at `path`."""
  grid = int(np.sqrt(attention.size))
  source = pictures.to_pil(image).convert("RGB").resize((size, size), Image.BICUBIC)
  truth = source.copy()
  pictures.draw_labelled(truth, boxes, phrases)
  heat = (255 * attention.reshape(grid, grid) / max(attention.max(), 1e-12)).astype(np.uint8)
  heat = Image.fromarray(heat).resize((size, size), Image.NEAREST)
  red = Image.merge("RGB", (heat, Image.new("L", heat.size), Image.new("L", heat.size)))
  overlay = Image.blend(source, red, 0.6)
  picture = Image.new("RGB", (2 * size + 8, size + 16), "white")
  for x, panel, label in ((0, truth, "true boxes"), (size + 8, overlay, title)):
    picture.paste(panel, (x, 16))
    ImageDraw.Draw(picture).text((x + 2, 2), label, fill="black", font=ImageFont.load_default())
  files.write_through(path, lambda f: picture.save(f, format="PNG"))
  return path


class AttentionMaps(Evaluator):
  """Pointing and mass of the global embedding's map (and of each phrase's chosen region query for
  GRAIN) over one grounding set, in %."""

  section = "attention"

  @staticmethod
  def entries(eval_config) -> tuple[str, ...]:
    return tuple(eval_config.grounding) if eval_config.attention_maps else ()

  def __init__(self, entry: str, context: Context):
    self.context = context
    self.name, self.data = grounding.grounding_set(entry, context)

  def run(self, model, runner: Runner) -> dict:
    """{"rows": {metric: %}, "no_skill": {metric: % of a uniform map}, "grid", "num_images",
    "num_phrases", "pictures"}: pictures of the first `config.eval.num_pictures` images (true boxes
    beside the global map)."""
    data = self.data
    outputs = runner.map_images(_maps, model, data.source, model_image_size(model))
    maps = outputs["maps"]  # [N, R, P]
    grid = int(round(np.sqrt(maps.shape[-1])))
    union = np.stack([inside(b, grid).any(axis=0) for b in data.boxes])  # [N, P]
    global_maps = maps[:, -1]  # GRAIN's image query is its last row; CLIP has one row
    scores = {"global": map_scores(global_maps, union)}
    if model.kind == "grain":
      phrase_image = np.repeat(np.arange(len(data.phrases)), [len(p) for p in data.phrases])
      phrase_embeds = runner.encode_texts(model, [p for ps in data.phrases for p in ps])
      query, _ = grounding.assign(phrase_embeds, outputs["region"][phrase_image])
      own = inside(np.concatenate(data.boxes).reshape(-1, 4), grid)
      scores["chosen query"] = map_scores(maps[phrase_image, query], own)
    title = "where the image query reads" if model.kind == "grain" else "where CLS reads"
    picture_dir = self.context.picture_dir(self.section, self.name)
    num_pictures = min(self.context.config.eval.num_pictures, len(data.phrases)) if picture_dir else 0
    drawn = [
      _picture(
        data.source[i]["image"],
        data.boxes[i],
        data.phrases[i],
        global_maps[i],
        title,
        os.path.join(picture_dir, f"attention_{i}.png"),
      )
      for i in range(num_pictures)
    ]
    target = {"global": "true boxes", "chosen query": "own box"}
    rows = {
      f"attention {key} in {target[which]} ({which})": values[key]
      for which, values in scores.items()
      for key in ("pointing", "mass")
    }
    uniform = {
      f"attention {key} in {target[which]} ({which})": values["uniform"]
      for which, values in scores.items()
      for key in ("pointing", "mass")
    }
    return {
      "rows": rows,
      "no_skill": uniform,
      "grid": grid,
      "num_images": len(data.source),
      "num_phrases": int(sum(len(p) for p in data.phrases)),
      "pictures": drawn,
    }

  @staticmethod
  def table_rows(results: dict) -> list[Row]:
    return scored_rows(results["attention"])

  @staticmethod
  def compared(results: dict) -> list[Compared]:
    """Every row (no skill: a uniform map)."""
    return scored_compared(results["attention"])
