"""Every config field with the paper's defaults (B/16 backbone, 5 region queries).

Other configs start from this one and change what they need. The fields, their meanings and their
defaults are the library's (grain_jax/config/base.py: the schema `grain_jax.config.validate` checks
every config against). The argument picks the model preset (`tiny`, `small`, `b16`, `l14`; default
`b16`; grain_jax/config/models.py), optionally followed by a mesh preset (default `cpu`;
grain_jax/config/meshes.py):

  python -m grain_jax.main --config configs/base.py:tiny --workdir runs/tiny
  python -m grain_jax.main --config configs/base.py:b16,tpu_v5p_128 --workdir /gcs/BUCKET/runs/b16 \
      --config.data.train_dir=/gcs/BUCKET/shards/cc12m

--workdir (and --output-dir) may be a bucket's gs://BUCKET/PATH; the path fields are local, a bucket
read through its mount (launch/mount_bucket.sh BUCKET mounts gs://BUCKET at /gcs/BUCKET), and a URL in
one of them is refused.
"""

from grain_jax.config import base


def get_config(arg: str | None = None):
  return base.get_config(arg)
