"""Config loading and validation: every bad field is named in the error."""

import pytest

from grain_jax.config import ConfigError, apply_overrides, load_config, meshes, models, parse_arm, validate
from grain_jax.config.validation import AT_LEAST_ONE, AT_LEAST_ZERO


@pytest.mark.parametrize("preset", models.PRESETS)
def test_every_preset_validates(preset):
  config = validate(load_config(f"configs/base.py:{preset}"), num_devices=8)
  assert config.model.preset == preset


def test_presets_have_the_reference_sizes():
  small = load_config("configs/base.py:small").model
  assert (small.image.width, small.image.depth, small.image.heads) == (384, 12, 12)
  assert (small.text.width, small.text.depth, small.text.heads) == (512, 12, 8)
  assert (small.decoder.width, small.decoder.depth) == (512, 6)
  large = load_config("configs/base.py:l14").model
  assert (large.image.width, large.image.depth, large.image.heads, large.image.patch_size) == (1024, 24, 16, 14)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="'huge'"):
    load_config("configs/base.py:huge")


def test_missing_config_file_is_named(tmp_path):
  with pytest.raises(ConfigError, match="nope.py"):
    load_config(str(tmp_path / "nope.py"))


def test_a_config_file_can_build_on_base(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text(
    "from grain_jax.config import base\n\ndef get_config():\n"
    "  config = base.get_config('tiny')\n  config.loss.region = 0.5\n  return config\n"
  )
  assert validate(load_config(str(path))).loss.region == 0.5


@pytest.mark.parametrize(
  "mutate, field",
  [
    (lambda c: c.model.image.__setattr__("widht", 64), "config.model.image.widht"),
    (lambda c: c.__setattr__("learning_rat", 1e-3), "config.learning_rat"),
    (lambda c: c.model.image.__setattr__("heads", 5), "config.model.image.width=64 is not divisible"),
    (lambda c: c.model.text.__setattr__("heads", 3), "config.model.text.width"),
    (lambda c: c.model.decoder.__setattr__("heads", 6), "config.model.decoder.width"),
    (lambda c: c.model.image.__setattr__("patch_size", 5), "config.model.image.image_size"),
    (lambda c: c.model.__setattr__("kind", "detr"), "config.model.kind"),
    (lambda c: c.model.__setattr__("dtype", "float16"), "config.model.dtype"),
    (lambda c: c.model.text.__setattr__("context_buckets", (16, 99)), "config.model.text.context_buckets"),
    (lambda c: c.matching.__setattr__("method", "auction"), "config.matching.method"),
    (lambda c: c.model.decoder.__setattr__("dropout", 1.5), "config.model.decoder.dropout"),
    (lambda c: c.data.__setattr__("max_bad_fraction", 1.0), "config.data.max_bad_fraction"),
    (lambda c: c.eval.__setattr__("templates", "clipp"), "config.eval.templates='clipp'"),
    (lambda c: c.eval.__setattr__("heads", ("names/global", "regoin")), "config.eval.heads: unknown head 'regoin'"),
    (lambda c: c.eval.__setattr__("protocol", "paper"), "config.eval.protocol='paper'"),
    (lambda c: c.eval.__setattr__("classification", ("cifar11",)), "config.eval.classification entry 'cifar11'"),
    (lambda c: c.eval.__setattr__("classification", ("synthetic/novl",)), "entry 'synthetic/novl'"),
    (lambda c: c.eval.__setattr__("retrieval", ("karpathy:test.json",)), "config.eval.retrieval entry"),
    (lambda c: c.eval.__setattr__("grounding", ("jsn:boxes.json",)), "config.eval.grounding entry"),
    (lambda c: c.eval.__setattr__("probes", ("probe.json",)), "config.eval.probes entry 'probe.json'"),
  ],
)
def test_bad_fields_are_named(mutate, field):
  config = load_config("configs/base.py:tiny")
  with config.unlocked():
    mutate(config)
  with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
    validate(config)


@pytest.mark.parametrize("field", [*AT_LEAST_ONE, *AT_LEAST_ZERO, "data.num_epochs", "train.num_steps"])
def test_counts_rates_and_intervals_out_of_bounds_are_refused_in_one_line(field):
  config = load_config("configs/base.py:tiny")
  section, name = field.split(".")
  low = 0 if field in AT_LEAST_ZERO else 1
  config[section][name] = type(config[section][name] or 1)(low)
  validate(config)  # the bound itself is allowed
  config[section][name] = type(config[section][name])(low - 1)
  with pytest.raises(ConfigError, match=rf"^config\.{section}\.{name}=-?\d+(\.0)? must be at least {low}( \(.*\))?$"):
    validate(config)


def test_zero_steps_only_evaluate_an_imported_model():
  config = load_config("configs/base.py:tiny")
  config.train.num_steps = 0
  config.model.init_from = "exported/grain_clip.safetensors"
  validate(config)
  config.experiment.evaluate = False
  with pytest.raises(ConfigError, match=r"num_steps=0 must be at least 1 \(0 only evaluates a model imported"):
    validate(config)


def test_wrong_type_is_named():
  config = load_config("configs/base.py:tiny")
  config.model.image = dict(config.model.image.to_dict(), depth="twelve")
  with pytest.raises(ConfigError, match=r"config\.model\.image\.depth='twelve'"):
    validate(config)


@pytest.mark.parametrize(
  "mesh, devices, ok",
  [
    (dict(data=-1, fsdp=1, tensor=1), 8, True),
    (dict(data=2, fsdp=-1, tensor=2), 8, True),
    (dict(data=2, fsdp=2, tensor=2), 8, True),
    (dict(data=3, fsdp=-1, tensor=1), 8, False),
    (dict(data=4, fsdp=4, tensor=1), 8, False),
    (dict(data=-1, fsdp=-1, tensor=1), 8, False),
    (dict(data=0, fsdp=1, tensor=1), 8, False),
  ],
)
def test_mesh_must_tile_the_devices(mesh, devices, ok):
  config = load_config("configs/base.py:tiny")
  config.mesh.update(mesh)
  if ok:
    validate(config, num_devices=devices)
  else:
    with pytest.raises(ConfigError, match=r"config\.mesh\.data"):
      validate(config, num_devices=devices)


@pytest.mark.parametrize("mesh", sorted(meshes.MESHES))
def test_mesh_presets_apply_and_validate(mesh):
  config = validate(load_config(f"configs/base.py:small,{mesh}"), num_devices=16)
  assert config.train.multiprocess == meshes.MESHES[mesh]["multiprocess"]
  assert config.mesh.fsdp == meshes.MESHES[mesh]["fsdp"]


def test_unknown_mesh_preset_is_named():
  with pytest.raises(ValueError, match="'tpu_v9'"):
    load_config("configs/base.py:b16,tpu_v9")


def test_experiment_arms_parse_and_apply_their_overrides():
  name, overrides = parse_arm(
    "memory_sine: model.decoder.memory_position=sine; loss.description_to_query=0.5; "
    "model.text.context_buckets=(16, 77)"
  )
  assert name == "memory_sine"
  assert overrides == {
    "model.decoder.memory_position": "sine",
    "loss.description_to_query": 0.5,
    "model.text.context_buckets": (16, 77),
  }
  config = load_config("configs/base.py:tiny")
  changed = validate(apply_overrides(config, overrides))
  assert changed.model.decoder.memory_position == "sine" and changed.model.text.context_buckets == (16, 77)
  assert config.model.decoder.memory_position == "none"  # the original is left as it was
  assert parse_arm("grain") == ("grain", {})


@pytest.mark.parametrize(
  "arms,message",
  [
    (("a b",), "the name 'a b' must be a word"),
    (("x: model.decoder.depth",), "'model.decoder.depth' is not field=value"),
    (("x", "x: seed=1"), "repeats a name"),
  ],
)
def test_bad_experiment_arms_are_named(arms, message):
  config = load_config("configs/base.py:tiny")
  config.experiment.arms = arms
  with pytest.raises(ConfigError, match=message):
    validate(config)


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"model.decoder.depht": 3}, "config.model.decoder.depht is not a known field"),
    ({"loss.region": "high"}, "config.loss.region='high'"),
  ],
)
def test_bad_overrides_are_named(overrides, message):
  with pytest.raises(ConfigError, match=message):
    apply_overrides(load_config("configs/base.py:tiny"), overrides, "arm x")


def test_every_ablation_arm_is_a_valid_config_and_the_ends_are_the_reference_and_the_demo():
  config = validate(load_config("configs/ablation.py"))
  arms = dict(parse_arm(entry) for entry in config.experiment.arms)
  built = {name: validate(apply_overrides(config, overrides, name)) for name, overrides in arms.items()}
  reference = built["reference"]
  assert reference.model.decoder.memory_position == "none" and not reference.loss.aux_layers
  assert reference.loss.description_to_query == 0 and reference.model.decoder.dropout == 0.1
  demo = built["demo"]
  assert demo.model.decoder.memory_position == "learned" and demo.model.decoder.position_in_values
  assert demo.loss.aux_layers and demo.loss.description_to_query > 0 and demo.model.decoder.dropout == 0
