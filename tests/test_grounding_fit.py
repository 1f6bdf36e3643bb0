"""A short fit on a one-object toy set: afterwards, moving the object moves its box.

This is what the authors' decoder, whose cross-attention adds no position code to the image tokens,
does poorly on the demo; the test trains the tiny preset with the grounding options through the real
trainer and grounds phrases through the public `grounding.ground`.
"""

import numpy as np
import pytest

from grain_jax.config import base, load_config
from grain_jax.data import examples, records
from grain_jax.data import synthetic_scenes as scenes
from grain_jax.eval import grounding
from grain_jax.train import trainer

pytestmark = pytest.mark.integration

IMAGE_SIZE = 32


def one_object_records(count: int):
  """Scenes of one object with its exact box as the only region; the caption is its description."""
  for index in range(count):
    rng = np.random.default_rng([7, index])
    thing = scenes.sample_scene(rng, 1)[0]
    image = scenes.encode_png(scenes.render(rng, [thing], IMAGE_SIZE))
    yield records.Record(
      f"toy/{index}", image, thing.description, thing.description, (records.Region(thing.description, thing.box, 0.9),)
    )


def picture(thing: scenes.Thing) -> np.ndarray:
  return scenes.render(np.random.default_rng(0), [thing], IMAGE_SIZE)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("toy"))
  records.write_dataset(data_dir, one_object_records(512), source="one-object toy set")
  config = base.use_grounding_options(load_config("configs/base.py:tiny"))
  # One object, one region query: its box can only follow the object by reading the image.
  config.model.decoder.num_region_queries = 1
  config.experiment.evaluate = False
  config.data.update(train_dir=data_dir, batch_size=32)
  config.train.update(num_steps=250, log_every=50, checkpoint_every=250)
  config.optim.update(learning_rate=2e-3, warmup_steps=20)
  model, _ = trainer.train(config, str(tmp_path_factory.mktemp("run")))
  return model


def test_moving_the_object_moves_its_box(model):
  for shape, color in (("square", "red"), ("circle", "blue"), ("triangle", "yellow")):
    boxes = {}
    for name, box in (("top left", (0.05, 0.05, 0.5, 0.5)), ("bottom right", (0.48, 0.48, 0.93, 0.93))):
      thing = scenes.Thing(shape, color, "solid", "large", box)
      placed = grounding.ground(model, picture(thing), [thing.description])[0]
      boxes[name] = np.array(placed["box"])
      true = examples.xyxy_to_cxcywh(np.array(box))
      assert grounding.box_iou(boxes[name], true) > 0.3, (shape, name, boxes[name])
    shift = boxes["bottom right"][:2] - boxes["top left"][:2]
    assert (shift > 0.2).all(), (shape, shift)  # the true centre moved by 0.43 in x and y
