"""Which decoder options make grounding work: each added alone to the authors' decoder, then the demo's set.

  python -m grain_jax.main --config configs/ablation.py:3 --workdir runs/ablation

Every arm is the demo's GRAIN (same data, steps, decoder size: 6 layers, 128 wide) with the decoder
options and losses set as its name says; `:3` runs seeds 0-2 (about 2.5 hours on a 2-core CPU).
Compare "grounding recall@0.5", "box spread" and the novel-concept rows of `comparison.md`
(docs/grounding.md has the measured table).
"""

import pathlib

from grain_jax.config import load_config

# The demo's config file, beside this one (loaded by path: configs/ is a folder of files, no package).
DEMO = pathlib.Path(__file__).with_name("demo.py")

# The authors' decoder and losses: no position code on the image tokens, dropout 0.1, last layer's
# boxes only, no description -> query loss.
REFERENCE = (
  "model.decoder.memory_position=none; model.decoder.position_in_values=False; "
  "model.decoder.dropout=0.1; loss.aux_layers=False; loss.description_to_query=0.0"
)


def get_config(arg: str | None = None):
  config = load_config(f"{DEMO}:{arg}" if arg else str(DEMO))
  # Measured (docs/grounding.md) with captions that name every object with all its attributes.
  config.data.synthetic.update(caption_objects=1.0, caption_attributes=1.0)
  config.experiment.arms = (
    f"reference: {REFERENCE}",
    f"memory_learned: {REFERENCE}; model.decoder.memory_position=learned",
    f"memory_sine: {REFERENCE}; model.decoder.memory_position=sine",
    f"memory_vit: {REFERENCE}; model.decoder.memory_position=vit",
    f"memory_learned_in_values: {REFERENCE}; model.decoder.memory_position=learned; "
    "model.decoder.position_in_values=True",
    f"anchor_refinement: {REFERENCE}; model.decoder.box_refinement=True; model.decoder.anchor_queries=True",
    f"all_layer_boxes_no_dropout: {REFERENCE}; loss.aux_layers=True; model.decoder.dropout=0.0",
    f"description_to_query: {REFERENCE}; loss.description_to_query=1.0",
    "demo",
  )
  return config
