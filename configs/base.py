"""Every config field, documented, with the paper's defaults (B/16 backbone, 5 region queries).

Other configs start from this one and change what they need. The argument picks the model preset
(`tiny`, `small`, `b16`, `l14`; default `b16`):

  python -m grain_jax.main --config configs/base.py:small --workdir runs/small

(the training entry point arrives with the training issue; until then this file is what the models,
validation and tests read).
"""

import ml_collections

from configs import models


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Seed of parameter initialization, dropout and data order.
  config.seed = 0

  config.model = models.get_model_config(arg or "b16")

  # Device mesh. Sizes multiply to the number of devices; one size may be -1 ("the rest").
  # `data`: pure data parallelism; `fsdp`: data parallelism with parameters and optimizer state
  # sharded over it; `tensor`: model (head / MLP) parallelism.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Logical axis name -> mesh axis (or axes, or None = replicated). The one place where the
  # sharding policy lives: every parameter and activation is annotated with logical names only.
  config.sharding_rules = (
      ("batch", ("data", "fsdp")),   # examples in a batch
      ("embed", "fsdp"),             # residual stream width of a tower
      ("mlp", "tensor"),             # hidden units of an MLP
      ("heads", "tensor"),           # attention heads
      ("kv", None),                  # per-head width
      ("vocab", "tensor"),           # token vocabulary
      ("joint", None),               # the shared image-text embedding
      ("length", None),              # token / patch / query positions
      ("qkv", None),                 # the q, k, v stack of an attention projection
      ("patch", None),               # pixels of a patch (the patch-embedding input)
      ("box", None),                 # the 4 box coordinates
      ("layers", None),              # the stacked blocks of a tower (see LayerStack)
  )

  # Region-to-box matching (see grain_jax/ops/matching.py). Cost = l1 * L1(cxcywh) - giou * GIoU.
  config.matching = ml_collections.ConfigDict(dict(
      method="hungarian",        # "hungarian" (exact) | "sinkhorn" (entropic OT, rounded) | "greedy"
      cost_l1=5.0,
      cost_giou=2.0,
      sinkhorn_epsilon=0.05,     # entropic regularization, in units of the cost
      sinkhorn_iterations=50,
  ))

  # Loss weights and variants: L = L_ic + box_l1 * L1 + box_giou * (1 - GIoU) + region * L_rd.
  config.loss = ml_collections.ConfigDict(dict(
      box_l1=1.5,                # the reference's effective weight (a hidden 1.5 factor in its code)
      box_giou=1.5,
      region=1.0,
      aux_layers=False,          # also supervise boxes of every intermediate decoder layer
      region_negatives="global",  # "global" batch or "per_device" (the reference's behaviour)
      mask_duplicate_descriptions=True,  # identical description texts are not negatives
  ))

  # Input pipeline (see grain_jax/data/pipeline.py). Image size and the number of regions per
  # image come from config.model (image.image_size, decoder.num_region_queries).
  config.data = ml_collections.ConfigDict(dict(
      train_dir="",              # record shards + manifest.json; "" = the built-in synthetic data
      batch_size=2048,           # global batch; each host reads batch_size / process_count
      mllm_caption_prob=0.5,     # chance of training on the MLLM caption instead of the alt-text
      # None = repeat forever (training length is counted in steps).
      num_epochs=ml_collections.config_dict.placeholder(int),
      num_workers=0,             # Grain worker processes decoding images; 0 = in this process
      worker_buffer_size=2,      # examples each worker keeps ready
      read_threads=4,            # threads reading and decoding records in each process
      max_bad_fraction=0.05,     # stop with an error when more records than this are skipped
      # The built-in synthetic dataset (grain_jax/data/synthetic.py), written under the workdir
      # when train_dir is "".
      synthetic=dict(
          seed=0,                # every image and caption is a function of this seed
          num_train=2048,        # training scenes
          image_size=64,         # side of the stored images (the pipeline resizes them)
          image_format="png",    # "png" | "jpeg"
          num_attribute_classes=12,  # eval: classes like "striped red triangle"
          num_novel_classes=8,   # eval: classes with invented names, known by descriptors only
          images_per_class=10,   # eval images per attribute / novel class
          num_retrieval=100,     # eval: images with two captions each
          num_grounding=100,     # eval: images with phrase -> box pairs
      ),
  ))

  return config
