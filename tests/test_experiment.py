"""The experiment driver: every arm trained and evaluated on shared data, compared in one table; a
checkpoint evaluated beside a training run and from a read-only workdir."""

import json
import os

import grain
import jax.numpy as jnp
import pytest
from flax import nnx

from grain_jax import experiment, main
from grain_jax.config import ConfigError, load_config
from grain_jax.errors import ArgumentError
from grain_jax.eval import table as eval_table
from grain_jax.models.grain import build_model
from grain_jax.train import optim, trainer, workdir_lock
from grain_jax.train.checkpoint import Checkpointer, checkpoint_dir

pytestmark = pytest.mark.integration


def test_arms_are_trained_evaluated_and_compared(tmp_path):
  config = load_config("configs/demo.py")
  config.model.decoder.update(depth=2, width=64, mlp_dim=128)  # the demo's options, the tests' size
  config.data.batch_size = 8
  config.data.synthetic.update(
    image_size=32,
    num_train=16,
    num_attribute_classes=3,
    num_novel_classes=3,
    images_per_class=2,
    num_retrieval=4,
    num_grounding=3,
  )
  config.train.update(num_steps=2, log_every=1, checkpoint_every=2)
  config.eval.update(batch_size=8, text_batch_size=64)
  results = experiment.run(config, str(tmp_path))

  assert sorted(os.listdir(tmp_path)) == ["clip_seed0", "comparison.json", "comparison.md", "grain_seed0", "synthetic"]
  rows = json.load(open(tmp_path / "comparison.json"))
  assert "synthetic/novel top-1 (mixed/region)" in rows["grain_seed0"]
  assert "synthetic/novel top-1 (mixed/region)" not in rows["clip_seed0"]
  assert "synthetic/novel top-1 (joined/global)" in rows["clip_seed0"]  # CLIP runs every global head
  assert {
    "synthetic grounding recall@0.5 (chosen query)",
    "synthetic grounding recall@0.5 (best query)",
    "synthetic attention pointing in true boxes (global)",
  } <= set(rows["grain_seed0"])
  assert "synthetic attention mass in own box (chosen query)" not in rows["clip_seed0"]
  table = open(tmp_path / "comparison.md").read()
  assert table.startswith("| metric | no skill | grain | clip | grain - clip, paired |")
  assert "| synthetic/novel top-1 (mixed/region) [grain only] | 33.3 |" in table
  assert "| **synthetic/novel top-1 (descriptions/global)** (the paper's) | 33.3 |" in table
  assert results["table"] + "\n" == table

  grain_config = config.copy_and_resolve_references()
  grain_config.experiment.arms = ()
  grain_config.data.synthetic_dir = str(tmp_path / "synthetic")
  evaluation = experiment.evaluate_checkpoint(grain_config, str(tmp_path / "grain_seed0"))
  assert eval_table.headline_metrics(evaluation)[0] == rows["grain_seed0"]


def test_every_arm_is_validated_before_the_first_trains(tmp_path, monkeypatch):
  config = load_config("configs/demo.py")
  config.experiment.arms = ("grain", "broken: model.kind=bogus")
  trained = []
  monkeypatch.setattr(experiment, "train_and_evaluate", lambda config, workdir: trained.append(workdir))
  with pytest.raises(ConfigError, match="kind"):
    main.run(config, "train", str(tmp_path))
  assert trained == [] and os.listdir(tmp_path) == []


def _evaluation(top1: float) -> dict:
  return {
    "classification": {
      "novel": {
        "chance_top1": 25.0,
        "heads": {"descriptors/region": {"top1": top1 + 5}, "descriptions/global": {"top1": top1}},
      }
    },
    "retrieval": {},
    "grounding": {},
    "attention": {},
    "probes": {},
  }


def test_worlds_and_settings_lay_out_runs_and_pair_differences(tmp_path, monkeypatch):
  config = load_config("configs/demo.py")
  config.experiment.update(
    worlds=(3, 4),
    seeds=(0, 1),
    settings=("rich: data.synthetic.caption_attributes=1.0", "sparse: data.synthetic.caption_attributes=0.25"),
  )
  seen = []

  def fake(run_config, workdir):
    seen.append(
      (
        os.path.relpath(workdir, tmp_path),
        run_config.data.synthetic.seed,
        run_config.data.synthetic.caption_attributes,
        os.path.relpath(run_config.data.synthetic_dir, tmp_path),
      )
    )
    grain = run_config.model.kind == "grain"
    top1 = 10 * run_config.data.synthetic.seed + run_config.seed + (30 if grain else 0)
    evaluation = _evaluation(top1)
    evaluation["classification"]["novel"]["chance_top1"] = 20.0 + 2 * (run_config.data.synthetic.seed - 3)
    if not grain:
      del evaluation["classification"]["novel"]["heads"]["descriptors/region"]
    return {"eval": evaluation}

  monkeypatch.setattr(experiment, "train_and_evaluate", fake)
  results = experiment.run(config, str(tmp_path))
  assert len(seen) == 16 and ("sparse/world4/clip_seed1", 4, 0.25, "sparse/world4/synthetic") in seen
  assert ("rich/world3/grain_seed0", 3, 1.0, "rich/world3/synthetic") in seen
  table = results["table"]
  assert table.count("## setting ") == 2
  # grain's top-1 is clip's + 30 in every (world, seed): the paired difference has no spread.
  # No skill differs from world to world here: the table gives its mean.
  assert (
    "| **novel top-1 (descriptions/global)** (the paper's) | 21.0 | 65.5 +- 5.0 | 35.5 +- 5.0 | +30.0 +- 0.0 | "
    "+30.0 +- 0.0 / +30.0 +- 0.0 |"
  ) in table
  assert "| novel top-1 (descriptors/region) [grain only] | 21.0 | 70.5 +- 5.0 | n/a | n/a | n/a |" in table
  assert set(json.load(open(tmp_path / "comparison.json"))) >= {"rich/world3/grain_seed0", "sparse/world4/clip_seed1"}


def test_comparison_table_marks_heads_one_arm_lacks_and_pairs_by_run():
  per_run = {
    ("a", None, 0): {"x": 50.0, "y": 1.0},
    ("b", None, 0): {"x": 40.0},
    ("a", None, 1): {"x": 60.0, "y": 3.0},
    ("b", None, 1): {"x": 30.0},
  }
  table = experiment.comparison_table(per_run, {"x": 10.0}, ["a", "b"], (0, 1))
  assert table.splitlines()[0] == "| metric | no skill | a | b | a - b, paired |"
  assert "| x | 10.0 | 55.0 +- 5.0 | 35.0 +- 5.0 | +20.0 +- 10.0 |" in table
  assert "| y [a only] | n/a | 2.0 +- 1.0 | n/a | n/a |" in table


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
  """A tiny config with a small evaluation, and a workdir holding a checkpoint of its initial model
  at step 3 (no training): (config, workdir)."""
  config = load_config("configs/base.py:tiny")
  config.data.synthetic.update(num_train=1, image_size=32, num_novel_classes=3, images_per_class=2)
  config.data.synthetic_dir = str(tmp_path_factory.mktemp("synthetic"))
  config.eval.update(
    classification=("synthetic/novel",), retrieval=(), grounding=(), templates="photo", batch_size=8, text_batch_size=16
  )
  config.model.text.context_buckets = (16,)
  model = build_model(config.model, config.seed)
  state = trainer.init_state(model, optim.make_optimizer(nnx.state(model, nnx.Param), config.optim, 10))
  workdir = str(tmp_path_factory.mktemp("run"))
  checkpointer = Checkpointer(checkpoint_dir(workdir), keep=1, async_save=False)
  checkpointer.save(state._replace(step=jnp.int32(3)), iter(grain.MapDataset.range(4).to_iter_dataset()))
  checkpointer.close()
  return config, workdir


def files_of(folder) -> list[str]:
  return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)


def test_a_checkpoint_is_evaluated_beside_the_run_training_in_its_workdir(checkpointed):
  config, workdir = checkpointed
  with workdir_lock.held(workdir):
    results = experiment.evaluate_checkpoint(config, workdir)
  assert results["model"]["checkpoint"] == "step3"
  assert os.path.exists(os.path.join(workdir, "eval", "results.json"))


def test_a_read_only_workdir_is_evaluated_into_the_output_dir(checkpointed, tmp_path, read_only):
  config, workdir = checkpointed
  before = files_of(workdir)
  read_only(workdir)
  with pytest.raises(
    ArgumentError,
    match=rf"^the output folder {workdir}/eval cannot be written \({workdir}(/eval)? is "
    r"read-only or not yours\): name another with --output-dir",
  ):
    experiment.evaluate_checkpoint(config, workdir)
  out = tmp_path / "out"
  results = experiment.evaluate_checkpoint(config, workdir, str(out))
  assert json.load(open(out / "results.json")) == json.loads(json.dumps(results))
  assert list((out / "text_cache").glob("*.npz"))
  assert files_of(workdir) == before
