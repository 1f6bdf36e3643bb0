"""The CPU demo: tiny GRAIN vs the plain-CLIP baseline on the built-in synthetic scenes.

  python -m grain_jax.main --config configs/demo.py --workdir runs/demo

Generates the synthetic dataset (seconds), trains both models for the same steps on the same data,
evaluates zero-shot classification (attribute classes; novel concepts, names only vs with
descriptions), retrieval and grounding, and prints one table. `configs/demo.py:3` runs 3 seeds.
"""

from configs import base


def get_config(arg: str | None = None):
  config = base.get_config("tiny")
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.experiment.kinds = ("grain", "clip")
  config.experiment.seeds = tuple(range(int(arg or 1)))

  config.data.batch_size = 64
  config.data.synthetic.update(image_size=64, num_train=4096)
  config.optim.update(learning_rate=1e-3, warmup_steps=50, weight_decay=0.05)
  config.train.update(num_steps=600, log_every=50, checkpoint_every=600)

  config.eval.templates = "photo"
  return config
