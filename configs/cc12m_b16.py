"""GRAIN B/16 on CC12M with the paper's recipe; `:clip` trains the plain-CLIP baseline.

  python -m grain_jax.main --config configs/cc12m_b16.py:grain,tpu_v5p_128 --workdir /gcs/BUCKET/runs/cc12m_grain \
      --config.data.train_dir=/gcs/BUCKET/shards/cc12m \
      --config.eval.tfds_data_dir=/gcs/BUCKET/tfds --config.eval.descriptors_dir=/gcs/BUCKET/descriptors \
      --config.eval.places365_dir=/gcs/BUCKET/places365

The argument is `<grain|grain_grounded|clip>[,<mesh>]` (see grain_jax/config/recipe.py) with mesh
gpu_2x8_h100 (default), tpu_v4_32, tpu_v5e_64 or tpu_v5p_128. Epochs are counted on the 12,423,374
pairs CC12M lists; with fewer downloaded images set `--config.train.num_steps` (35 epochs) and
`--config.optim.warmup_steps` (1). The run evaluates on the tfds sets prepared in
`config.eval.tfds_data_dir` with the descriptor files of `config.eval.descriptors_dir` and Places365's
full-size images in `config.eval.places365_dir` (see docs/evaluation.md), and stops before
training when one is missing;
`--config.experiment.evaluate=False` trains without them.
"""

from grain_jax.config import recipe

NUM_TRAIN_IMAGES = 12_423_374


def get_config(arg: str | None = None):
  return recipe.get_recipe_config(NUM_TRAIN_IMAGES, arg)
