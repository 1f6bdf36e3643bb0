"""Every config field, documented, with the paper's defaults (B/16 backbone, 5 region queries).

The schema `grain_jax.config.validate` checks a config against: a field missing here is unknown. The
config files in configs/ start from `get_config` and change what they need (configs/base.py is this
one as a config file). The argument picks the model preset (`tiny`, `small`, `b16`, `l14`; default
`b16`; models.py), optionally followed by a mesh preset from meshes.py (default `cpu`): "b16,tpu_v5p_128".
"""

import ml_collections

from grain_jax.config import meshes, models


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _, mesh = (arg or "b16").partition(",")
  config = ml_collections.ConfigDict()

  # Seed of parameter initialization, dropout and data order.
  config.seed = 0

  config.model = models.get_model_config(preset)

  # Device mesh. Sizes multiply to the number of devices; one size may be -1 ("the rest").
  # `data`: pure data parallelism; `fsdp`: data parallelism with parameters and optimizer state
  # sharded over it; `tensor`: model (head / MLP) parallelism.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  # Logical axis name -> mesh axis (or axes, or None = replicated). The one place where the
  # sharding policy lives: every parameter and activation is annotated with logical names only.
  config.sharding_rules = (
    ("batch", ("data", "fsdp")),  # examples in a batch
    ("embed", "fsdp"),  # residual stream width of a tower
    ("mlp", "tensor"),  # hidden units of an MLP
    ("heads", "tensor"),  # attention heads
    ("kv", None),  # per-head width
    ("vocab", "tensor"),  # token vocabulary
    ("joint", None),  # the shared image-text embedding
    ("length", None),  # token / patch / query positions
    ("qkv", None),  # the q, k, v stack of an attention projection
    ("patch", None),  # pixels of a patch (the patch-embedding input)
    ("box", None),  # the 4 box coordinates
    ("layers", None),  # the stacked blocks of a tower (see LayerStack)
    # Activations have names of their own: the residual stream stays whole on every device of
    # a batch shard (FSDP gathers weights, not activations); tensor parallelism splits the
    # heads and the MLP's hidden units, as it splits their weights.
    ("activation_length", None),  # token / patch / query positions of an activation
    ("activation_embed", None),  # residual stream width of an activation
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
  )

  # Region-to-box matching (see grain_jax/ops/matching.py). Cost = l1 * L1(cxcywh) - giou * GIoU.
  config.matching = ml_collections.ConfigDict(
    dict(
      method="hungarian",  # "hungarian" (exact) | "sinkhorn" (entropic OT, rounded) | "greedy"
      cost_l1=5.0,  # weight of the L1 distance summed over (cx, cy, w, h)
      cost_giou=2.0,  # weight of the generalized IoU (subtracted)
      sinkhorn_epsilon=0.05,  # final entropic regularization, in cost units (annealed down to it)
      sinkhorn_iterations=50,  # fixed number of Sinkhorn iterations
    )
  )

  # Loss weights and variants:
  # L = L_ic + box_l1 * L1 + box_giou * (1 - GIoU) + region * L_rd + description_to_query * L_dq.
  config.loss = ml_collections.ConfigDict(
    dict(
      box_l1=1.5,  # the reference's effective weight (a hidden 1.5 factor in its code)
      box_giou=1.5,
      region=1.0,
      aux_layers=False,  # also supervise boxes of every intermediate decoder layer
      # Where L_rd's negatives come from: "global" (every description of the global batch; mean over
      # all matched regions) or "per_device" (the authors': each device's own descriptions, computed
      # on that device; each device's mean, averaged over devices). Devices = the batch shards.
      region_negatives="global",
      # L_rd: descriptions whose text equals the target's are not negatives (True) or are (False,
      # the authors').
      mask_duplicate_descriptions=True,
      # Box losses divided by the valid boxes of the "global" batch, or "per_device": each device's
      # by its own, averaged over devices (the authors'). Either way a count of 0 counts as 1.
      box_normalization="global",
      # Added to the union where IoU divides by it, in the matching cost's and the loss's GIoU:
      # 0 = the exact ratio; the authors' code adds 1e-4.
      iou_union_epsilon=0.0,
      # Weight of L_dq, the description -> query direction among an image's own queries (each matched
      # description picks its region query; grounding makes that choice at evaluation). 0 = off, as
      # the reference.
      description_to_query=0.0,
    )
  )

  # AdamW with linear warmup then cosine decay (the reference's recipe).
  config.optim = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-3,  # peak, reached at the end of warmup
      warmup_init=1e-6,  # learning rate at step 0
      end_learning_rate=1e-5,  # at the last step
      warmup_steps=1000,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=0.1,  # decoupled, scaled by the learning rate (PyTorch's AdamW)
      # Parameters weight decay leaves alone: "rank_below_2" (ours: biases, norm weights, logit_scale
      # and every other parameter with fewer than 2 dimensions per layer) or "authors_name_rule" (the
      # authors': by the names the export gives them (grain_jax/torch_format/layout.py): in the
      # decoder those containing ".ln_", ".bn", ".bias" or ".logit_scale", so its LayerNorm weights
      # and attention in_proj_bias are decayed; in the towers 1-D ones and names containing "bias",
      # "ln" or "bn").
      weight_decay_exempt="rank_below_2",
      grad_clip_norm=0.0,  # global-norm clipping; 0 = off
    )
  )

  # The training loop (see grain_jax/train/trainer.py).
  config.train = ml_collections.ConfigDict(
    dict(
      num_steps=100_000,
      grad_accum_steps=1,  # micro-batches per step; contrastive negatives come from one micro-batch
      log_every=50,  # steps between console / TensorBoard scalars
      checkpoint_every=1000,  # steps between checkpoints (one is always written at the end)
      keep_checkpoints=3,  # the newest k are kept
      async_checkpointing=True,  # saves commit while training goes on: a kill loses <= 2 x checkpoint_every
      # steps (<= 1 x when False)
      profile_steps=(),  # (first, last) step of a profiler trace written to workdir/profile; () = off
      # bf16 peak FLOP/s of one device, for the mfu metric; 0 = from the table of known devices
      # (grain_jax/hardware.py: TPU v4/v5e/v5p/v6e, H100 SXM, H200); neither: no mfu.
      peak_flops_per_device=0.0,
      multiprocess=False,  # call jax.distributed.initialize() (auto-detected on TPU and SLURM)
      coordinator_address="",  # host:port of process 0 when not auto-detected
      num_processes=0,  # with coordinator_address
      process_id=-1,  # with coordinator_address
      # Seconds without a heartbeat after which a process counts as dead and the others stop (JAX's
      # default: 100). Heartbeats come from a background thread: long compilations and saves do not
      # delay them.
      heartbeat_timeout_s=20,
      # Seconds jax.distributed.initialize() waits for every process to join (JAX's default): the
      # processes of a job that start further apart than this (slow image pulls, installs) fail.
      initialization_timeout_s=300,
    )
  )

  # What `python -m grain_jax.main` runs (see grain_jax/experiment.py).
  config.experiment = ml_collections.ConfigDict(
    dict(
      evaluate=True,  # evaluate (config.eval) after training
      # Runs to compare, each "name" or "name: field=value; field=value" (overrides of this config,
      # e.g. "clip: model.kind=clip"), trained with every seed in <workdir>/<name>_seed<seed> on the
      # same data and compared in one table; () = just this config.
      arms=(),
      seeds=(),  # seeds of the comparison; () = (config.seed,)
      worlds=(),  # synthetic worlds (data.synthetic.seed) of the comparison; () = the config's
      # Variants every arm runs under, each "name: field=value; ..." like an arm (e.g. how much the
      # captions say: "sparse: data.synthetic.caption_attributes=0.25"), one table each; () = none.
      settings=(),
    )
  )

  meshes.apply(config, mesh or "cpu")

  # Input pipeline (see grain_jax/data/pipeline.py). Image size and the number of regions per
  # image come from config.model (image.image_size, decoder.num_region_queries).
  config.data = ml_collections.ConfigDict(
    dict(
      train_dir="",  # record shards + manifest.json; "" = the built-in synthetic data
      synthetic_dir="",  # where the built-in synthetic splits live; "" = <workdir>/synthetic
      batch_size=2048,  # global batch; each host reads batch_size / process_count
      mllm_caption_prob=0.5,  # chance of training on the MLLM caption instead of the alt-text
      # None = repeat forever (training length is counted in steps).
      num_epochs=ml_collections.config_dict.placeholder(int),
      num_workers=0,  # Grain worker processes decoding images; 0 = in this process
      worker_buffer_size=2,  # batches each worker keeps ready
      read_threads=4,  # threads reading and decoding records in each process
      max_bad_fraction=0.05,  # stop with an error when more records than this are skipped; in [0, 1)
      # The built-in synthetic dataset (grain_jax/data/synthetic.py), written under the workdir
      # when train_dir is "".
      synthetic=dict(
        seed=0,  # every image and caption is a function of this seed
        num_train=2048,  # training scenes
        image_size=64,  # side of the stored images (the pipeline resizes them)
        image_format="png",  # "png" | "jpeg"
        # How much the MLLM caption says (the alt-text names one attribute of one object or the
        # count; `mllm_caption_prob` picks between them): the share of a scene's objects it
        # mentions and the share of their 4 attributes (size, pattern, color, shape) it names,
        # rounded up. The regions always describe every object found with all 4.
        caption_objects=1.0,
        caption_attributes=1.0,
        num_attribute_classes=12,  # eval: classes like "striped red triangle"
        num_novel_classes=8,  # eval: classes with invented names, known by descriptors only
        images_per_class=10,  # eval images per attribute / novel class
        num_retrieval=100,  # eval: images with two captions each
        num_grounding=100,  # eval: images with phrase -> box pairs
        num_probe=200,  # eval: one-object images with their attributes (linear probes)
      ),
    )
  )

  # Evaluation (see grain_jax/eval/run.py; entry syntax in grain_jax/eval/datasets.py).
  config.eval = ml_collections.ConfigDict(
    dict(
      # Zero-shot classification sets: registry names ("cifar10", ..., "imagenet"; tfds), the
      # authors' protocols of two of them ("sun397:all": all of SUN397's images; "places365:full": the
      # full-size images from places365_dir), "synthetic/attributes", "synthetic/novel", or
      # "folder:PATH" (PATH/<class>/<image>).
      classification=("synthetic/attributes", "synthetic/novel"),
      retrieval=("synthetic",),  # "synthetic" or "karpathy:JSON:IMAGE_ROOT"
      grounding=("synthetic",),  # "synthetic" or "json:PATH"
      tfds_data_dir="",  # where `tfds build` prepared the tfds sets; "" = tfds's default
      places365_dir="",  # torchvision's Places365 download (small=False) that places365:full reads
      descriptors_dir="",  # Menon & Vondrick descriptor JSONs (descriptors_cifar10.json, ...;
      # docs/evaluation.md says where each comes from)
      allow_missing_descriptors=False,  # a tfds set without its descriptor file: False = refuse before
      # training; True = evaluate it with class names only (no description
      # heads, so the paper's mean of 11 is not reported)
      # The zero-shot protocol (grain_jax/eval/protocol.py): "ours" (OpenAI's 80 templates, renormalized
      # class vectors, every head a model can run) or "authors" (their 46 templates, class vectors not
      # renormalized, their global score as the reported number). The four fields below override it;
      # None = the protocol's value.
      protocol="ours",
      templates=ml_collections.config_dict.placeholder(str),  # "clip" (OpenAI's 80), "birds" (the authors' 46), "photo"
      renormalize=ml_collections.config_dict.placeholder(bool),  # re-normalize each class vector
      heads=ml_collections.config_dict.placeholder(tuple),  # classification heads (grain_jax/eval/heads.py)
      alpha=ml_collections.config_dict.placeholder(float),  # weight of the global score in the mixed heads
      whole_word_connectives=False,  # pick " which is/has" by the first word, not the reference's raw prefix
      batch_size=256,  # images per global batch (rounded up to the batch shards)
      text_batch_size=1024,  # prompts per global batch
      num_threads=4,  # image decoding threads per host
      max_examples=0,  # images per set, spread evenly over it; 0 = all
      num_confusions=10,  # most frequent (true, predicted) class pairs listed per head
      iou_threshold=0.5,  # grounding: a box counts when IoU >= this
      num_pictures=4,  # grounding and attention pictures written to <workdir>/eval/{grounding,attention}/<set>/
      # Attention maps on the grounding sets (grain_jax/eval/attention.py), for every model kind:
      # where the global embedding reads from, scored against the true boxes.
      attention_maps=True,
      # Linear probes of each attribute on every embedding (grain_jax/eval/probe.py): "synthetic" or
      # "json:PATH" (a probe.json as the synthetic `probe` split writes it).
      probes=("synthetic",),
      fixed_box_records=5000,  # grounding: training records the image-blind fixed-box baseline is
      # fitted on (the first ones; needs data.train_dir unless the set is
      # the synthetic one); 0 = no baseline
    )
  )

  return config


def use_grounding_options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Sets the decoder options and losses that make the region queries localize (docs/grounding.md):
  a learned position code on the image tokens the decoder reads, in its keys and values; no decoder
  dropout; every decoder layer's boxes supervised; each description trained to pick its own query.
  The reference decoder has none of them. Returns `config`, changed in place."""
  config.model.decoder.update(memory_position="learned", position_in_values=True, dropout=0.0)
  config.loss.update(aux_layers=True, description_to_query=1.0)
  return config
