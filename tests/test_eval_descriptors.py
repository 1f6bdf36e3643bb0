"""Descriptor files paired with the real datasets' classes, class by class.

The label names are the real ones: read offline from tfds's builder info (the tfds package ships
them; nothing is downloaded), or for CIFAR the shipped class lists. Each test writes a descriptor
file whose keys are those names with a known perturbation, so the right key of every class is
known, and asserts every class's pairing.
"""

import dataclasses
import hashlib
import io
import json
import os
import random
import types

import numpy as np
import pytest

from conftest import png_bytes
from grain_jax import experiment, main
from grain_jax.config import ConfigError, eval_rules, load_config, validate
from grain_jax.errors import BadFileError
from grain_jax.eval import classification, datasets, descriptors
from grain_jax.eval import table as eval_table

READABLE = [name for name, spec in datasets.TFDS_DATASETS.items() if spec.readable_labels]
# The settings run_evaluation writes into results (format_table reads them).
SETTINGS = {"protocol": "authors", "departures": {}, "paper_head": "descriptions/global"}


@pytest.fixture(scope="module")
def tfds_label_names(tmp_path_factory):
  """{registry name: its tfds label names in label order}, from builder info without any download."""
  tfds = pytest.importorskip("tensorflow_datasets")
  empty = str(tmp_path_factory.mktemp("no_tfds_data"))
  return {
    name: list(tfds.builder(spec.tfds_name, data_dir=empty).info.features["label"].names)
    for name, spec in datasets.TFDS_DATASETS.items()
  }


def class_names(name, tfds_label_names):
  return datasets.registry_class_names(name, tfds_label_names[name])


def _check(pairs, names, truth, how):
  """Every class i is paired with key truth[i] (None: missing), `how` the pairing each class expects."""
  assert [p.label_name for p in pairs] == names
  assert [p.key for p in pairs] == truth
  assert [p.how for p in pairs] == how


def test_the_real_label_names_are_known_offline(tfds_label_names):
  counts = {name: len(class_names(name, tfds_label_names)) for name in datasets.TFDS_DATASETS}
  assert counts == {
    "cifar10": 10,
    "cifar100": 100,
    "sun397": 397,
    "cars": 196,
    "dtd": 47,
    "pets": 37,
    "caltech101": 101,
    "flowers102": 102,
    "cub": 200,
    "places365": 365,
    "food101": 101,
    "imagenet": 1000,
    "imagenet_v2": 1000,
    "eurosat": 10,
  }
  assert tfds_label_names["caltech101"][4] == "background_google"


@pytest.mark.parametrize("name", READABLE)
def test_renamed_reordered_and_separator_keys_pair_by_name(name, tfds_label_names):
  names = class_names(name, tfds_label_names)
  styles = [
    lambda n: n,
    str.upper,
    lambda n: n.replace(" ", "_"),
    lambda n: n.replace(" ", "/"),
    lambda n: n.replace(" ", "-") + "?",
  ]
  keys = [styles[i % len(styles)](n) for i, n in enumerate(names)]
  order = list(range(len(names)))
  random.Random(0).shuffle(order)
  pairs = descriptors.pair([keys[i] for i in order], names)
  _check(pairs, names, keys, ["name"] * len(names))


def test_slashes_and_a_trailing_bracket_match_the_scene_labels(tfds_label_names):
  raw_labels = tfds_label_names["places365"]
  names = class_names("places365", tfds_label_names)
  # "apartment_building/outdoor" written as the descriptor files do: "apartment building (outdoor)".
  keys = [n.replace("_", " ").replace("/", " (", 1) + ")" if "/" in n else n.replace("_", " ") for n in raw_labels]
  assert "apartment building (outdoor)" in keys
  _check(descriptors.pair(keys[::-1], names), names, keys, ["name"] * len(names))
  # A qualifier the label lacks: "crane (machine)" still pairs with "crane".
  assert descriptors.pair(["crane (machine)", "crane bird"], ["crane", "crane bird"])[0].key == "crane (machine)"


def test_one_renamed_key_in_a_reordered_file_pairs_no_class_with_another_s(tfds_label_names):
  names = class_names("pets", tfds_label_names)
  siamese = names.index("Siamese")
  keys = list(names)
  keys[siamese] = "Siamese cat"
  order = sorted(range(len(names)), key=lambda i: keys[i])  # cats (capitalized) first, as the published file
  assert order != list(range(len(names)))
  pairs = descriptors.pair([keys[i] for i in order], names)
  truth = [None if i == siamese else k for i, k in enumerate(keys)]
  _check(pairs, names, truth, ["missing" if i == siamese else "name" for i in range(len(names))])
  assert descriptors.summary(pairs) == "partial"


def test_a_renamed_key_in_a_reordered_file_is_not_paired_by_position(tfds_label_names):
  names = class_names("pets", tfds_label_names)
  siamese = names.index("Siamese")
  keys = list(names)
  keys[siamese] = "Siamese cat"
  order = list(range(len(names)))
  order[0], order[1] = 1, 0  # two classes swapped: the renamed key alone still sits at its class's index
  pairs = descriptors.pair([keys[i] for i in order], names)
  _check(
    pairs,
    names,
    [None if i == siamese else k for i, k in enumerate(keys)],
    ["missing" if i == siamese else "name" for i in range(len(names))],
  )


def test_a_leftover_key_naming_another_leftover_class_is_not_paired_by_position():
  names = ["ant", "bee", "cat", "dog"]
  pairs = descriptors.pair(["bumble bee", "army ant", "cat", "dog"], names)
  _check(pairs, names, [None, None, "cat", "dog"], ["missing", "missing", "name", "name"])
  renamed = descriptors.pair(["red ant", "honey bee", "cat", "dog"], names)  # each names its own class
  _check(renamed, names, ["red ant", "honey bee", "cat", "dog"], ["position", "position", "name", "name"])


def test_normalized_forms():
  assert {descriptors.normalized(n) for n in ("Siamese_cat", "siamese-cat?", "(Siamese) cat")} == {"siamese cat"}
  assert descriptors.normalized("/a/apartment_building/outdoor") == "apartment building outdoor"
  assert descriptors.unqualified("Crane (machine)") == "crane"


@pytest.mark.parametrize("name", ["pets", "cars", "flowers102", "eurosat", "places365"])
def test_renamed_keys_at_their_label_positions_pair_by_position(name, tfds_label_names):
  names = class_names(name, tfds_label_names)
  renamed = {1, len(names) - 1}
  keys = [f"{n} (renamed)x" if i in renamed else n for i, n in enumerate(names)]
  pairs = descriptors.pair(keys, names)
  _check(pairs, names, keys, ["position" if i in renamed else "name" for i in range(len(names))])
  assert descriptors.summary(pairs) == "mixed"
  assert [n for n, p in zip(descriptors.prompt_names(pairs), pairs) if p.how == "position"] == [
    keys[i] for i in sorted(renamed)
  ]


def test_missing_and_extra_keys(tfds_label_names):
  names = class_names("food101", tfds_label_names)
  keys = names[:50] + names[51:] + ["not a food"]  # one class missing, an unrelated key instead
  pairs = descriptors.pair(keys, names)
  _check(
    pairs,
    names,
    [None if i == 50 else n for i, n in enumerate(names)],
    ["missing" if i == 50 else "name" for i in range(len(names))],
  )


@pytest.mark.parametrize("name", ["cub", "imagenet"])
def test_id_labelled_sets_pair_by_position_or_refuse(name, tfds_label_names):
  ids = class_names(name, tfds_label_names)
  assert ids[0] in ("0", "n01440764")
  keys = [f"class {i}" for i in range(len(ids))]
  _check(descriptors.pair(keys, ids, labels_are_ids=True), ids, keys, ["position"] * len(ids))
  with pytest.raises(BadFileError, match=f"{len(ids) - 1} keys for {len(ids)} classes"):
    descriptors.pair(keys[1:], ids, labels_are_ids=True)


def test_sun397_keys_in_tfds_own_label_names_pair_by_name(tfds_label_names):
  raw_labels = tfds_label_names["sun397"]
  assert raw_labels[0] == "/a/abbey"
  names = class_names("sun397", tfds_label_names)
  keys = list(reversed(raw_labels))  # a file keyed "/a/abbey", ... as tfds names the classes
  _check(descriptors.pair(keys, names), names, raw_labels, ["name"] * len(names))


def test_imagenet_file_in_another_order_is_refused(tmp_path):
  wordnet = datasets.wnid_class_names()
  assert wordnet[0] == ["tench", "Tinca tinca"] and len(wordnet) == 1000
  # Keys as descriptor files write them: mostly a WordNet name, some renamed ("rooster" for "cock").
  keys = [names[0] if i % 4 else f"renamed class {i}" for i, names in enumerate(wordnet)]
  keys = list(dict.fromkeys(keys))  # a JSON object has each key once
  keys += [f"extra {i}" for i in range(1000 - len(keys))]
  in_order = {key: [f"feature of {key}"] for key in keys}
  (tmp_path / "descriptors_imagenet.json").write_text(json.dumps(in_order))
  eval_rules.check_descriptors(("imagenet", "imagenet_v2"), str(tmp_path), allow_missing=False)
  order = list(range(1000))
  random.Random(1).shuffle(order)
  (tmp_path / "descriptors_imagenet.json").write_text(json.dumps({keys[i]: in_order[keys[i]] for i in order}))
  with pytest.raises(BadFileError, match=r"descriptors_imagenet.json: its keys are not in label order"):
    eval_rules.check_descriptors(("imagenet",), str(tmp_path), allow_missing=False)
  with pytest.raises(ConfigError, match=r"descriptors_imagenet.json: its keys are not in label order"):
    validate(_eval_config(("imagenet",), str(tmp_path)), evaluation_files=True)


def _cub_source(names, labels):
  """A fake CUB test split: id labels, each example carrying its class's `label_name`, as tfds's does."""
  info = types.SimpleNamespace(
    features={"label": types.SimpleNamespace(names=[str(i) for i in range(len(names))]), "label_name": None}
  )

  class FakeSource(list):
    dataset_info = info

  return FakeSource(
    {"image": np.zeros((4, 4, 3), np.uint8), "label": np.int64(label), "label_name": names[label].encode()}
    for label in labels
  )


def test_cub_file_in_another_order_is_refused(tmp_path):
  label_names = ["black_footed_albatross", "laysan_albatross", "sooty_albatross", "groove_billed_ani"]
  source = _cub_source(label_names, [3, 0, 2, 1, 0])
  keys = ["Black-footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove-billed Ani"]
  path = tmp_path / "descriptors_cub.json"
  path.write_text(json.dumps({key: [f"a {key} feature"] for key in keys}))
  cub = datasets.tfds_classification("cub", descriptors_dir=str(tmp_path), source=source)
  assert cub.data.class_names == keys and cub.alignment == "position"
  path.write_text(json.dumps({key: [f"a {key} feature"] for key in keys[1:] + keys[:1]}))
  with pytest.raises(
    BadFileError,
    match=r"descriptors_cub.json: its keys are not in label order: 0 of 4 .* 4 name "
    r"another class \(key 0 'Laysan Albatross' names class 1",
  ):
    datasets.tfds_classification("cub", descriptors_dir=str(tmp_path), source=source)
  # A few keys written differently, the rest in order: accepted.
  path.write_text(json.dumps({key: ["a feature"] for key in ["Black footed albatross", "Laysan", "Sooty", "Ani"]}))
  assert datasets.tfds_classification("cub", descriptors_dir=str(tmp_path), source=source).alignment == "position"


def test_cub_order_is_checked_before_training_when_its_data_is_prepared(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  label_names = ["black_footed_albatross", "laysan_albatross", "sooty_albatross"]

  class GrainJaxTinyBirds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "label_name": tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {"test": self._generate_examples()}

    def _generate_examples(self):
      for i, label in enumerate([2, 0, 1, 1]):
        yield i, {"image": io.BytesIO(png_bytes(6, 5, (0, 0, 0))), "label": label, "label_name": label_names[label]}

  tfds_dir = str(tmp_path / "tfds")
  GrainJaxTinyBirds(data_dir=tfds_dir, file_format="array_record").download_and_prepare()
  monkeypatch.setitem(
    datasets.TFDS_DATASETS, "cub", dataclasses.replace(datasets.TFDS_DATASETS["cub"], tfds_name="grain_jax_tiny_birds")
  )
  config = _eval_config(("cub",), str(tmp_path))
  config.eval.tfds_data_dir = tfds_dir
  keys = ["Laysan Albatross", "Black-footed Albatross", "Sooty Albatross"]
  (tmp_path / "descriptors_cub.json").write_text(json.dumps({key: ["a feature"] for key in keys}))
  with pytest.raises(ConfigError, match=r"descriptors_cub.json: its keys are not in label order"):
    validate(config, evaluation_files=True)
  (tmp_path / "descriptors_cub.json").write_text(json.dumps({key: ["a feature"] for key in sorted(keys)}))
  validate(config, evaluation_files=True)


def _fake_source(label_names, labels):
  info = types.SimpleNamespace(features={"label": types.SimpleNamespace(names=label_names)})

  class FakeSource(list):
    dataset_info = info

  return FakeSource({"image": np.zeros((4, 4, 3), np.uint8), "label": np.int64(label)} for label in labels)


def test_registry_records_file_digest_pairing_and_empty_lists(tmp_path, tfds_label_names):
  raw_labels = tfds_label_names["caltech101"]
  labels = [i % len(raw_labels) for i in range(2 * len(raw_labels))]
  source = _fake_source(raw_labels, labels)
  names = class_names("caltech101", tfds_label_names)
  raw = {n: [] if n == "yin yang" else [f"a {n} part"] for n in reversed(names)}
  path = tmp_path / "descriptors_caltech.json"
  path.write_text(json.dumps(raw))
  caltech = datasets.tfds_classification("caltech101", descriptors_dir=str(tmp_path), source=source)
  background = raw_labels.index("background_google")
  kept = [i for i, label in enumerate(labels) if label != background]
  assert len(caltech.data.source) == len(kept) == 2 * 101
  expected_labels = [label - (label > background) for label in labels if label != background]
  assert [caltech.data.source[i]["label"] for i in range(len(kept))] == expected_labels
  assert caltech.data.class_names == names and caltech.alignment == "name"
  info = caltech.descriptors
  assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
  assert info["empty"] == ["yin yang"]
  assert [p["key"] for p in info["pairing"]] == names and {p["how"] for p in info["pairing"]} == {"name"}
  assert caltech.data.descriptors["accordion"] == ["a accordion part"]


def _eval_config(classification, descriptors_dir="", allow_missing=False):
  config = load_config("configs/base.py:tiny")
  config.eval.update(
    classification=classification, descriptors_dir=descriptors_dir, allow_missing_descriptors=allow_missing
  )
  return config


def test_validate_refuses_a_missing_or_broken_descriptor_file(tmp_path):
  config = _eval_config(("food101", "cub"), str(tmp_path))
  validate(config)  # the schema alone reads no file
  with pytest.raises(ConfigError, match="descriptors_food101.json.*annotate descriptors --dataset food101"):
    validate(config, evaluation_files=True)
  allowed = _eval_config(("food101", "cub"), str(tmp_path), allow_missing=True)
  with pytest.raises(ConfigError, match="descriptors_cub.json.*labels are ids.*release"):
    validate(allowed, evaluation_files=True)  # CUB's classes are named only by its file
  (tmp_path / "descriptors_cub.json").write_text('{"Laysan Albatross": "not a list"}')
  with pytest.raises(ConfigError, match="descriptors_cub.json must be a JSON object"):
    validate(allowed, evaluation_files=True)
  birds = {f"bird {i}": [f"feature {i}"] for i in range(200)}
  (tmp_path / "descriptors_cub.json").write_text(json.dumps(dict(list(birds.items())[:199])))
  with pytest.raises(ConfigError, match="descriptors_cub.json.*199 keys for 200 classes"):
    validate(allowed, evaluation_files=True)
  (tmp_path / "descriptors_cub.json").write_text(json.dumps(birds))
  validate(allowed, evaluation_files=True)
  validate(_eval_config(("synthetic/novel", "food101"), str(tmp_path), allow_missing=True), evaluation_files=True)


def test_a_run_that_will_evaluate_stops_before_training(tmp_path):
  config = _eval_config(("food101",), str(tmp_path))
  with pytest.raises(ConfigError, match="descriptors_food101.json"):
    main.run(config, "train", str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
  config.experiment.arms = ("grain", "clip: model.kind=clip")
  with pytest.raises(ConfigError, match="descriptors_food101.json"):
    main.run(config, "train", str(tmp_path / "arms"))
  assert not os.path.exists(tmp_path / "arms")


class _Trained(Exception):
  pass


@pytest.mark.parametrize("arms", [(), ("grain", "clip: model.kind=clip")])
def test_descriptor_files_are_checked_once_per_run(arms, tmp_path, monkeypatch):
  config = _eval_config(("food101",), str(tmp_path), allow_missing=True)
  config.experiment.arms = arms
  checked = []
  monkeypatch.setattr(eval_rules, "check_descriptors", lambda *args: checked.append(args))

  def train(config, workdir):
    raise _Trained(workdir)

  monkeypatch.setattr(experiment.trainer, "train", train)
  with pytest.raises(_Trained):
    main.run(config, "train", str(tmp_path / "run"))
  assert len(checked) == max(len(arms), 1)


def _set_result(name, heads, alignment="name"):
  return {
    "name": name,
    "in_average": datasets.paper_set(name) in datasets.PAPER_AVERAGE,
    "alignment": alignment,
    "heads": {h: {"top1": top1} for h, top1 in heads.items()},
  }


def test_the_average_says_which_sets_each_head_covers():
  rng = np.random.default_rng(0)
  results = {
    n: _set_result(n, {"names/global": rng.uniform(0, 100), "descriptions/global": rng.uniform(0, 100)})
    for n in datasets.PAPER_AVERAGE
  }
  results["imagenet"] = _set_result("imagenet", {"names/global": 1.0})
  complete = classification.average(results)
  assert complete["paper_metric"] == ["names/global", "descriptions/global"] and complete["missing"] == []
  for head in ("names/global", "descriptions/global"):
    assert complete["top1"][head] == pytest.approx(
      np.mean([results[n]["heads"][head]["top1"] for n in datasets.PAPER_AVERAGE])
    )
  del results["sun397"]["heads"]["descriptions/global"]  # sun397 evaluated without its file
  partial = classification.average(results)
  assert partial["paper_metric"] == ["names/global"]
  assert partial["covers"]["descriptions/global"] == [n for n in datasets.PAPER_AVERAGE if n != "sun397"]
  assert partial["top1"]["descriptions/global"] == pytest.approx(
    np.mean([results[n]["heads"]["descriptions/global"]["top1"] for n in datasets.PAPER_AVERAGE if n != "sun397"])
  )
  table = eval_table.format_table(
    {
      "settings": SETTINGS,
      "classification": {},
      "classification_average": partial,
      "retrieval": {},
      "grounding": {},
      "attention": {},
      "probes": {},
    }
  )
  rows = [line.split() for line in table.splitlines()]
  assert ["paper", "mean", "of", "11", "top1", "names/global", f"{partial['top1']['names/global']:.2f}"] in rows
  assert [
    "partial",
    "mean",
    "(10",
    "of",
    "11)",
    "top1",
    "descriptions/global",
    f"{partial['top1']['descriptions/global']:.2f}",
  ] in rows
  del results["cifar10"]
  assert classification.average(results)["paper_metric"] == [] and classification.average(results)["missing"] == [
    "cifar10"
  ]


def test_a_set_with_unpaired_classes_is_not_in_the_papers_mean_of_its_description_heads():
  rng = np.random.default_rng(1)
  names = [{"sun397": "sun397:all", "places365": "places365:full"}.get(n, n) for n in datasets.PAPER_AVERAGE]
  results = {
    n: _set_result(n, {"names/global": rng.uniform(0, 100), "descriptions/global": rng.uniform(0, 100)}) for n in names
  }
  complete = classification.average(results)  # the authors' SUN397 and Places365 count as those sets
  assert complete["paper_metric"] == ["names/global", "descriptions/global"] and complete["missing"] == []
  results["caltech101"]["alignment"] = "partial"  # e.g. a Caltech-101 file without classes 4 to 11
  average = classification.average(results)
  assert average["partially_paired"] == ["caltech101"] and average["paper_metric"] == ["names/global"]
  others = [n for n in names if n != "caltech101"]
  assert average["covers"]["descriptions/global"] == others and average["covers"]["names/global"] == names
  assert average["top1"]["descriptions/global"] == pytest.approx(
    np.mean([results[n]["heads"]["descriptions/global"]["top1"] for n in others])
  )
  table = eval_table.format_table(
    {
      "settings": SETTINGS,
      "classification": {},
      "classification_average": average,
      "retrieval": {},
      "grounding": {},
      "attention": {},
      "probes": {},
    }
  )
  assert "partial mean (10 of 11)  top1 descriptions/global" in table
