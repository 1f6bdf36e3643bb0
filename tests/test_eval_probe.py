"""Linear probes: the classifier's loss and gradient, what it reads off, and the probe split."""

import json
import os

import numpy as np
import pytest
from scipy import optimize

from grain_jax.data import synthetic, synthetic_scenes
from grain_jax.eval import probe


def test_the_gradient_is_the_losss():
  rng = np.random.default_rng(0)
  features, labels = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
  onehot = np.eye(3)[labels]
  point = rng.normal(size=6 * 3)
  error = optimize.check_grad(
    lambda w: probe.loss_and_gradient(w, features, onehot)[0],
    lambda w: probe.loss_and_gradient(w, features, onehot)[1],
    point,
  )
  assert error < 1e-5
  value, _ = probe.loss_and_gradient(np.zeros(18), features, onehot)
  assert value == pytest.approx(np.log(3))  # uniform predictions


def test_a_probe_reads_a_linearly_coded_attribute_and_not_noise():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 400)
  directions = rng.normal(size=(4, 16))
  coded = directions[labels] + 0.3 * rng.normal(size=(400, 16))
  assert probe.fit_and_score(coded[::2], labels[::2], coded[1::2], labels[1::2], 4) >= 95
  noise = rng.normal(size=(400, 16))
  assert probe.fit_and_score(noise[::2], labels[::2], noise[1::2], labels[1::2], 4) <= 40  # chance: 25


def test_the_probe_split_has_one_object_per_image_with_its_attributes(tmp_path):
  synthetic.write_probe(str(tmp_path), seed=0, count=5, image_size=32)
  sources, boxes, values = probe.read(str(tmp_path / "probe.json"))
  assert len(sources) == 5 and boxes.shape == (5, 4) and all(os.path.exists(s["image"]) for s in sources)
  assert set(values) == set(synthetic_scenes.ATTRIBUTES)
  assert set(values["color"]) <= set(synthetic_scenes.COLORS) and set(values["shape"]) <= set(synthetic_scenes.SHAPES)
  assert ((boxes[:, 2:] > 0) & (boxes[:, :2] > 0) & (boxes[:, :2] < 1)).all()
  with open(tmp_path / "probe.json") as f:
    data = json.load(f)
  del data["images"][2]["attributes"]["color"]
  with open(tmp_path / "bad.json", "w") as f:
    json.dump(data, f)
  with pytest.raises(ValueError, match="bad.json: an image lacks 'color'"):
    probe.read(str(tmp_path / "bad.json"))
