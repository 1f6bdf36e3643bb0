"""The paper's training recipe (docs/reference_behaviour.md, "Training"), shared by configs/cc3m_b16.py
and configs/cc12m_b16.py.

B/16 backbone, 5 region queries, global batch 2048, AdamW (lr 1e-3, betas 0.9/0.98, eps 1e-8,
weight decay 0.1), one warmup epoch from 1e-6, cosine to 1e-5, 35 epochs, bfloat16 compute
(the reference trains in fp16 mixed precision; parameters stay float32 here as there).
The argument is `<kind>[,<mesh>]`: kind `grain` (the authors' decoder, trained as their code trains it:
`use_authors_training`), `grain_grounded` (with the grounding options, `base.use_grounding_options`, and
our training choices) or `clip` (the plain-CLIP baseline, trained as `grain`), mesh one of FITS
(default: gpu_2x8_h100, the paper's machine).
"""

import math

from grain_jax.config import base
from grain_jax.errors import ConfigError
from grain_jax.eval.datasets import AUTHORS_PAPER_SETS

KINDS = ("grain", "grain_grounded", "clip")
GLOBAL_BATCH = 2048
EPOCHS = 35

# Per mesh preset: what fits B/16 at the global batch in device memory (docs/performance.md, "Memory
# per device", has the table that backs these choices: python -m grain_jax.bench memory).
FITS = {
  "gpu_2x8_h100": dict(remat=False, grad_accum_steps=1),
  "tpu_v4_32": dict(remat=True, grad_accum_steps=1),
  "tpu_v5e_64": dict(remat=False, grad_accum_steps=1),
  "tpu_v5p_128": dict(remat=False, grad_accum_steps=1),
}


def use_authors_training(config):
  """The authors' choices where ours differ (docs/authors_differences.md): L_rd against each device's
  own descriptions, identical texts as negatives; box losses per device; IoU's union + 1e-4; weight
  decay by their name rule; PyTorch's default init of the ViT. Returns `config`, changed in place."""
  config.loss.update(
    region_negatives="per_device",
    mask_duplicate_descriptions=False,
    box_normalization="per_device",
    iou_union_epsilon=1e-4,
  )
  config.optim.weight_decay_exempt = "authors_name_rule"
  config.model.image.init = "pytorch_default"
  return config


def get_recipe_config(num_train_images: int, arg: str | None):
  """The full config for a dataset of `num_train_images` pairs and the `<kind>[,<mesh>]` argument."""
  kind, _, mesh = (arg or "grain").partition(",")
  mesh = mesh or "gpu_2x8_h100"
  if kind not in KINDS:
    raise ConfigError(f"recipe kind {kind!r} is unknown; choose one of {KINDS}")
  if mesh not in FITS:
    raise ConfigError(f"recipe mesh {mesh!r} is unknown; choose one of {sorted(FITS)}")
  config = base.get_config(f"b16,{mesh}")
  fit = FITS[mesh]
  config.model.update(
    kind="grain" if kind == "grain_grounded" else kind, dtype="bfloat16", scan_layers=True, remat=fit["remat"]
  )
  if kind == "grain_grounded":
    base.use_grounding_options(config)
  else:
    use_authors_training(config)

  steps_per_epoch = math.ceil(num_train_images / GLOBAL_BATCH)
  config.data.update(batch_size=GLOBAL_BATCH, mllm_caption_prob=0.5, num_workers=16, read_threads=8)
  config.optim.update(
    learning_rate=1e-3,
    warmup_init=1e-6,
    end_learning_rate=1e-5,
    warmup_steps=steps_per_epoch,
    b1=0.9,
    b2=0.98,
    eps=1e-8,
    weight_decay=0.1,
  )
  config.train.update(
    num_steps=EPOCHS * steps_per_epoch,
    grad_accum_steps=fit["grad_accum_steps"],
    log_every=100,
    checkpoint_every=500,
    keep_checkpoints=3,
  )

  # The paper's 11 zero-shot sets as the authors evaluate them (tfds, prepare them first, and Places365's
  # full-size images in config.eval.places365_dir; see docs/evaluation.md) and ImageNet, with the
  # authors' zero-shot protocol for every kind, so that they compare; retrieval needs the Karpathy files:
  # --config.eval.retrieval='("karpathy:JSON:ROOT",)'.
  config.eval.update(
    classification=(*AUTHORS_PAPER_SETS, "imagenet"), retrieval=(), grounding=(), probes=(), protocol="authors"
  )
  return config
