"""The experiment driver: every arm trained and evaluated on shared data, compared in one table."""

import json
import os

import pytest

from grain_jax import experiment
from grain_jax.config import ConfigError, load_config


def test_arms_are_trained_evaluated_and_compared(tmp_path):
  config = load_config("configs/demo.py")
  config.model.decoder.update(depth=2, width=64, mlp_dim=128)  # the demo's options, the tests' size
  config.data.batch_size = 8
  config.data.synthetic.update(image_size=32, num_train=16, num_attribute_classes=3, num_novel_classes=3,
                               images_per_class=2, num_retrieval=4, num_grounding=3)
  config.train.update(num_steps=2, log_every=1, checkpoint_every=2)
  config.eval.update(batch_size=8, text_batch_size=64)
  results = experiment.run(config, str(tmp_path))

  assert sorted(os.listdir(tmp_path)) == ["clip_seed0", "comparison.json", "comparison.md", "grain_seed0",
                                          "synthetic"]
  rows = json.load(open(tmp_path / "comparison.json"))
  assert "synthetic/novel top-1 (descriptions/mixed)" in rows["grain_seed0"]
  assert "synthetic/novel top-1 (descriptions/mixed)" not in rows["clip_seed0"]
  assert {"synthetic grounding recall@0.5 (chosen query)", "synthetic grounding recall@0.5 (best query)",
          "synthetic fixed-box baseline recall@0.5 (best of 5)"} <= set(rows["grain_seed0"])
  table = open(tmp_path / "comparison.md").read()
  assert table.startswith("| metric | grain | clip |") and "| n/a |" in table
  assert results["table"] + "\n" == table

  grain_config = config.copy_and_resolve_references()
  grain_config.experiment.arms = ()
  grain_config.data.synthetic_dir = str(tmp_path / "synthetic")
  evaluation = experiment.evaluate_checkpoint(grain_config, str(tmp_path / "grain_seed0"))
  assert experiment.headline_metrics(evaluation) == rows["grain_seed0"]


def test_every_arm_is_validated_before_the_first_trains(tmp_path, monkeypatch):
  config = load_config("configs/demo.py")
  config.experiment.arms = ("grain", "broken: model.kind=bogus")
  trained = []
  monkeypatch.setattr(experiment, "train_and_evaluate", lambda config, workdir: trained.append(workdir))
  with pytest.raises(ConfigError, match="kind"):
    experiment.run(config, str(tmp_path))
  assert trained == [] and os.listdir(tmp_path) == []
