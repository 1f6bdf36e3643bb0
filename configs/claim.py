"""The paper's claim on the synthetic scenes: does grounding descriptions help when captions say little?

  python -m grain_jax.main --config configs/claim.py:sweep --workdir runs/claim_sweep
  python -m grain_jax.main --config configs/claim.py:final --workdir runs/claim

The demo's GRAIN and plain CLIP, trained on the same captions (only GRAIN also reads the regions, which
describe every object found with all its attributes), scored with the same texts and rules.
`sweep`: every caption setting below x worlds 0-1 x seeds 0-1, 500 steps (half the demo's). `final`:
the demo's caption setting (`half_by_shape`), worlds 0-2 x seeds 0-2, 1000 steps. Each writes one table per setting to
`comparison.md` (docs/results.md has the measured tables and what they show).
"""

import pathlib

from grain_jax.config import load_config

# The demo's config file, beside this one (loaded by path: configs/ is a folder of files, no package).
DEMO = pathlib.Path(__file__).with_name("demo.py")

# How much the MLLM caption says (data.synthetic.caption_objects / caption_attributes); the alt-text
# (data.mllm_caption_prob of the steps use the MLLM caption instead) is the same in all.
CAPTION_SETTINGS = {
  "rich": "data.synthetic.caption_objects=1.0; data.synthetic.caption_attributes=1.0",
  "shape_and_one": "data.synthetic.caption_objects=1.0; data.synthetic.caption_attributes=0.5",
  "half_by_shape": "data.synthetic.caption_objects=0.5; data.synthetic.caption_attributes=0.25",
}


def get_config(arg: str | None = None):
  config = load_config(str(DEMO))
  if arg == "sweep":
    config.experiment.update(
      settings=tuple(f"{name}: {fields}" for name, fields in CAPTION_SETTINGS.items()), worlds=(0, 1), seeds=(0, 1)
    )
    config.train.update(num_steps=500, checkpoint_every=500)
  elif arg == "final":
    config.experiment.update(worlds=(0, 1, 2), seeds=(0, 1, 2))
  else:
    raise ValueError(f"configs/claim.py takes 'sweep' or 'final', got {arg!r}")
  return config
