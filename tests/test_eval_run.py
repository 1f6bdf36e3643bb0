"""run_evaluation on the synthetic splits: results JSON, table, and one device == a sharded mesh."""

import hashlib
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from grain_jax import sharding
from grain_jax.config import load_config, validate
from grain_jax.data import synthetic
from grain_jax.eval import datasets, run
from grain_jax.eval import table as eval_table
from grain_jax.models.grain import build_model


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = load_config("configs/base.py:tiny")
  config.data.synthetic.update(
    num_train=1,
    image_size=32,
    num_attribute_classes=3,
    num_novel_classes=4,
    images_per_class=3,
    num_retrieval=7,
    num_grounding=5,
    num_probe=6,
  )
  config.eval.update(
    classification=("synthetic/novel",),
    retrieval=("synthetic",),
    grounding=("synthetic",),
    templates="photo",
    heads=("names/global", "descriptions/global", "joined/global", "descriptors/region", "mixed/region"),
    batch_size=5,
    text_batch_size=8,
    num_pictures=2,
  )
  config.model.text.context_buckets = (16,)
  config.data.synthetic_dir = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.generate(config.data.synthetic_dir, **config.data.synthetic)
  return validate(config)


@pytest.fixture(scope="module")
def single_device(config, tmp_path_factory):
  model = build_model(config.model, seed=0)  # in training mode, as the trainer would pass it
  workdir = str(tmp_path_factory.mktemp("single"))
  results = run.run_evaluation(config, model, workdir)
  dropouts = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Dropout)]
  assert dropouts and not any(d.deterministic for d in dropouts)  # still training mode
  return workdir, results


def test_results_json_table_and_pictures(single_device):
  workdir, results = single_device
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    assert json.load(f) == json.loads(json.dumps(results))
  novel = results["classification"]["synthetic/novel"]
  assert novel["alignment"] == "name" and novel["num_classes"] == 4
  assert list(novel["heads"]) == [
    "names/global",
    "descriptions/global",
    "joined/global",
    "descriptors/region",
    "mixed/region",
  ]
  assert novel["chance_top1"] == 25 and results["settings"]["paper_head"] == "descriptions/global"
  assert results["settings"]["protocol"] == "ours" and results["settings"]["departures"]["templates"] == "photo"
  head = novel["heads"]["mixed/region"]
  assert head["num_examples"] == 12 and 0 <= head["top1"] <= head["top5"] == 100  # 4 classes: top-5 is all
  assert sum(head["per_class"].values()) / 4 == pytest.approx(head["mean_per_class"])
  retrieval = results["retrieval"]["synthetic"]
  assert retrieval["num_images"] == 7 and retrieval["num_texts"] == 14
  for direction in ("image_to_text", "text_to_image"):
    assert 0 <= retrieval[direction]["R@1"] <= retrieval[direction]["R@5"] <= retrieval[direction]["R@10"] <= 100
  grounding = results["grounding"]["synthetic"]
  assert 0 <= grounding["recall"] <= grounding["any_query_recall"] <= 100 and grounding["num_phrases"] > 5
  assert 0 <= grounding["query_choice_accuracy"] <= 100 and grounding["conditioning_ratio"] >= 0
  assert len(grounding["pictures"]) == 2 and all(os.path.exists(p) for p in grounding["pictures"])
  fixed = grounding["fixed_box_baseline"]  # fitted on the one training image's boxes
  assert len(fixed["boxes"]) == 5 and fixed["fitted_on_boxes"] >= 1
  assert 0 <= fixed["single_box_recall"] <= fixed["best_of_k_recall"] <= 100
  assert results["classification_average"]["datasets"] == []
  maps = results["attention"]["synthetic"]
  assert (
    set(maps["rows"])
    == set(maps["no_skill"])
    == {
      f"attention {m} in {t} ({w})"
      for m in ("pointing", "mass")
      for t, w in (("true boxes", "global"), ("own box", "chosen query"))
    }
  )
  assert maps["grid"] == 4 and maps["num_phrases"] == grounding["num_phrases"]
  assert all(0 <= v <= 100 for v in maps["rows"].values()) and len(maps["pictures"]) == 2
  probes = results["probes"]["synthetic"]
  assert (
    set(probes["rows"])
    == set(probes["no_skill"])
    == {f"probe {a} ({e})" for a in ("size", "pattern", "color", "shape") for e in ("global", "region")}
  )
  assert probes["num_images"] == 6 and all(0 <= v <= 100 for v in probes["rows"].values())
  table = eval_table.format_table(results)
  assert table.startswith("protocol ours, templates=photo, heads=(")
  for row in (
    "top1 descriptions/global (paper)",
    "top1 mixed/region",
    "top1 chance",
    "i->t R@1/5/10",
    "box recall@0.5",
    "box conditioning ratio",
    "fixed boxes recall (best of k)",
  ):
    assert row in table


def test_a_sharded_mesh_gives_the_numbers_of_one_device(config, single_device, tmp_path):
  _, expected = single_device
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  # The same parameters, laid out by the rules (create_sharded's equality is tested with the models).
  graphdef, state = nnx.split(build_model(config.model, seed=0))
  model = nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh, config.sharding_rules)))
  results = run.run_evaluation(config, model, str(tmp_path), mesh=mesh)  # batches of 8, not 5
  for name, result in expected["classification"].items():
    for head, metrics in result["heads"].items():
      got = results["classification"][name]["heads"][head]
      assert got["num_examples"] == metrics["num_examples"]  # padding is not counted
      assert (got["top1"], got["top5"], got["per_class"]) == (metrics["top1"], metrics["top5"], metrics["per_class"]), (
        head
      )
  assert results["retrieval"] == expected["retrieval"]
  got, want = results["grounding"]["synthetic"], expected["grounding"]["synthetic"]
  assert (got["recall"], got["any_query_recall"], got["num_phrases"]) == (
    want["recall"],
    want["any_query_recall"],
    want["num_phrases"],
  )
  assert got["mean_iou"] == pytest.approx(want["mean_iou"], abs=1e-5)
  assert got["conditioning_ratio"] == pytest.approx(want["conditioning_ratio"], abs=1e-5)


def test_clip_baseline_gets_global_heads_and_no_grounding(config, tmp_path):
  clip_config = config.copy_and_resolve_references()
  clip_config.model.kind = "clip"
  clip_config.eval.update(retrieval=(), max_examples=6)
  results = run.run_evaluation(clip_config, build_model(clip_config.model, seed=0), str(tmp_path))
  heads = results["classification"]["synthetic/novel"]["heads"]
  assert list(heads) == ["names/global", "descriptions/global", "joined/global"]  # every global head asked for
  assert heads["names/global"]["num_examples"] == 6
  assert "skipped" in results["grounding"]["synthetic"]
  assert set(results["attention"]["synthetic"]["rows"]) == {
    "attention pointing in true boxes (global)",
    "attention mass in true boxes (global)",
  }
  assert np.isfinite(heads["descriptions/global"]["top1"])


def test_a_prepared_tfds_set_evaluates_through_the_registry(config, tiny_tfds, tmp_path, monkeypatch):
  """The preparation path as far as it goes offline: a tfds builder writes array_record files (no
  tensorflow), and run_evaluation reads them by registry name with a descriptor file."""
  name, tfds_dir = tiny_tfds(["red_square", "background_google", "blue_circle"], [30 * i for i in range(7)])
  monkeypatch.setitem(
    datasets.TFDS_DATASETS,
    "tiny",
    datasets.TfdsDataset(name, "test", "descriptors_tiny.json", in_average=False, drop_classes=("background_google",)),
  )
  path = tmp_path / "descriptors_tiny.json"
  path.write_text(json.dumps({"blue circle": ["a round shape"], "Red Square": ["four corners", "red"]}))
  tfds_config = config.copy_and_resolve_references()
  tfds_config.eval.update(
    classification=("tiny",), retrieval=(), grounding=(), tfds_data_dir=tfds_dir, descriptors_dir=str(tmp_path)
  )
  results = run.run_evaluation(tfds_config, build_model(tfds_config.model, seed=0), str(tmp_path / "run"))
  tiny = results["classification"]["tiny"]
  assert tiny["num_classes"] == 2 and tiny["num_examples"] == 5  # labels 0 1 2 0 1 2 0, label 1 dropped
  assert tiny["heads"]["mixed/region"]["num_examples"] == 5
  assert set(tiny["heads"]["names/global"]["per_class"]) == {"red square", "blue circle"}
  assert tiny["descriptors"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert [(p["label_name"], p["key"], p["how"]) for p in tiny["descriptors"]["pairing"]] == [
    ("red square", "Red Square", "name"),
    ("blue circle", "blue circle", "name"),
  ]
  assert results["classification_average"]["datasets"] == []
