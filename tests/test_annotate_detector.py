"""Detector post-processing on fixed OWLv2-style outputs; the package without torch."""

import os
import subprocess
import sys

import numpy as np
import pytest

from grain_jax.annotate import detector
from grain_jax.data import examples


def _logit(probability):
  return np.log(probability / (1 - probability))


def test_one_best_description_per_box_above_the_threshold_highest_first():
  # 4 predicted boxes x 3 queries; the third query is the batch's padding.
  scores = np.array(
    [
      [0.9, 0.2, 0.99],  # padding would win: the best real query is 0
      [0.1, 0.35, 0.2],  # description 1 at 0.35
      [0.25, 0.1, 0.0001],  # below the threshold 0.3
      [0.5, 0.95, 0.5],
    ]
  )  # description 1 again, the highest
  boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.1, 0.9, 0.2, 0.2]])
  regions = detector.select_regions(_logit(scores), boxes, ["a cat", "a hat"], threshold=0.3)
  assert [r.description for r in regions] == ["a hat", "a cat", "a hat"]
  assert [r.score for r in regions] == pytest.approx([0.95, 0.9, 0.35])
  np.testing.assert_allclose(
    [r.box for r in regions], [[0.0, 0.8, 0.2, 1.0], [0.4, 0.3, 0.6, 0.7], [0.0, 0.0, 0.5, 0.5]]
  )


def test_no_descriptions_no_regions():
  assert detector.select_regions(np.zeros((4, 2)), np.zeros((4, 4)), [], 0.0) == []


def test_box_conversion_inverts_the_record_conversion():
  corners = np.random.default_rng(0).uniform(0, 1, (10, 4))
  corners[:, 2:] += corners[:, :2]
  np.testing.assert_allclose(detector.cxcywh_to_xyxy(examples.xyxy_to_cxcywh(corners)), corners, atol=1e-6)


def test_without_torch_the_package_imports_and_says_what_to_install():
  code = (
    "import sys; sys.modules['torch'] = None\n"
    "from grain_jax.annotate import __main__, hf\n"
    "try:\n  hf.device_and_dtype()\nexcept ImportError as e:\n  print(e)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    check=True,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  assert "pip install -r requirements-annotate.txt" in result.stdout
