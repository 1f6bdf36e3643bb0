"""Model tests: preset shapes and parameter counts, masking, truncation, init, scan, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import param_count
from grain_jax import sharding
from grain_jax.config import load_config
from grain_jax.models.grain import MAX_LOGIT_SCALE, build_model
from grain_jax.models.text import rows_at, truncate_to_bucket

SOT, EOT = 49406, 49407


def tiny_config(**model_overrides):
  config = load_config("configs/base.py:tiny")
  config.model.update(model_overrides)
  return config


def random_tokens(rng: np.random.Generator, count: int, max_len: int, context: int = 77) -> np.ndarray:
  """`[count, context]` CLIP-style ids: SOT, random tokens, EOT at a random place, zero padding."""
  ids = np.zeros((count, context), np.int32)
  for row in range(count):
    length = int(rng.integers(0, max_len - 1))
    ids[row, 0] = SOT
    ids[row, 1 : 1 + length] = rng.integers(1, SOT, length)
    ids[row, 1 + length] = EOT
  return ids


@pytest.fixture(scope="module")
def config():
  return tiny_config()


@pytest.fixture(scope="module")
def model(config):
  model = build_model(config.model, seed=0)
  model.eval()
  return model


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  return images, jnp.asarray(random_tokens(rng, 8, 12))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda model, images, ids: (model.encode_image(images), model.encode_text(ids)))


@pytest.fixture(scope="module")
def reference_outputs(model, inputs, forward):
  return forward(model, *inputs)


@pytest.mark.parametrize("preset", ["tiny", "small", "b16", "l14"])
def test_every_preset_has_the_documented_output_shapes(preset):
  config = load_config(f"configs/base.py:{preset}")
  model = nnx.eval_shape(lambda: build_model(config.model, seed=0))
  size = config.model.image.image_size
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((3, 77), jnp.int32)
  image_out, text_out = nnx.eval_shape(lambda m, x, t: (m.encode_image(x), m.encode_text(t)), model, images, ids)
  embed, queries, depth = config.model.embed_dim, config.model.decoder.num_region_queries, config.model.decoder.depth
  assert image_out.global_embed.shape == (2, embed)
  assert image_out.region_embed.shape == (2, queries, embed)
  assert image_out.boxes.shape == (depth, 2, queries, 4)
  assert text_out.shape == (3, embed)
  tokens = nnx.eval_shape(lambda m, x: m.visual(x), model, images)
  assert tokens.shape == (2, 1 + (size // config.model.image.patch_size) ** 2, config.model.image.width)


def test_b16_parameter_counts_equal_the_reference():
  config = load_config("configs/base.py:b16")
  model = nnx.eval_shape(lambda: build_model(config.model, seed=0))
  assert param_count(model.visual) == 85_801_728
  assert param_count(model.text) == 63_428_096
  assert param_count(model.decoder) == 26_674_180


def test_every_parameter_is_annotated_with_one_logical_name_per_axis():
  config = load_config("configs/base.py:b16")
  model = nnx.eval_shape(lambda: build_model(config.model, seed=0))
  known = {name for name, _ in config.sharding_rules}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = variable.get_metadata().get("out_sharding")
    assert names is not None and len(names) == variable.ndim, path
    assert set(names) - {None} <= known, (path, names)


def test_outputs_are_finite_and_boxes_normalized(reference_outputs):
  image_out, text_out = reference_outputs
  for array in (image_out.global_embed, image_out.region_embed, image_out.boxes, text_out):
    assert np.isfinite(np.asarray(array)).all()
  boxes = np.asarray(image_out.boxes)
  assert (boxes >= 0).all() and (boxes <= 1).all()


def test_text_mask_is_causal_and_padding_after_eot_is_ignored(model, inputs, forward, reference_outputs):
  images, ids = inputs
  ids = np.asarray(ids)
  eot = ids.argmax(-1)
  after = ids.copy()
  after[np.arange(len(ids)), eot + 1] = 1234  # a token after EOT: invisible to a causal EOT readout
  before = ids.copy()
  before[:, 0] = 1234  # a token before EOT: must change every embedding
  _, after_out = forward(model, images, jnp.asarray(after))
  _, before_out = forward(model, images, jnp.asarray(before))
  np.testing.assert_array_equal(np.asarray(after_out), np.asarray(reference_outputs[1]))
  assert (np.abs(np.asarray(before_out) - np.asarray(reference_outputs[1])).max(axis=-1) > 1e-4).all()


def test_truncating_to_a_bucket_gives_the_full_context_embeddings(model):
  rng = np.random.default_rng(1)
  encode = nnx.jit(lambda m, ids: m.encode_text(ids))
  for max_len in (5, 20, 40, 77):
    ids = random_tokens(rng, 6, max_len)
    short = truncate_to_bucket(ids, (16, 32, 48, 77))
    assert short.shape[1] in (16, 32, 48, 77) and short.shape[1] >= ids.argmax(-1).max() + 1
    np.testing.assert_allclose(
      np.asarray(encode(model, jnp.asarray(short))), np.asarray(encode(model, jnp.asarray(ids))), rtol=1e-5, atol=1e-5
    )


def full_context_text_embeddings(text, ids: jax.Array) -> jax.Array:
  """Every block at every position, then the EOT row: what running the last block at EOT only must equal."""
  length = ids.shape[1]
  x = text.token_embedding[...][ids] + text.positional_embedding[:length]
  x = text.ln_final(text.blocks(x, jnp.tril(jnp.ones((length, length), bool))))
  return x[jnp.arange(len(ids)), jnp.argmax(ids, axis=-1)] @ text.text_projection[...]


@pytest.mark.parametrize("stack", [dict(scan_layers=False, remat=False), dict(scan_layers=True, remat=True)])
def test_text_tower_running_its_last_block_at_eot_only_equals_the_full_computation(inputs, stack):
  text = build_model(tiny_config(**stack).model, seed=0).text
  ids = inputs[1]
  weights = jax.random.normal(jax.random.key(0), (ids.shape[0], text.text_projection.shape[1]))
  loss_and_grads = lambda embed: nnx.jit(nnx.value_and_grad(lambda text: jnp.sum(embed(text, ids) * weights)))
  loss, grads = loss_and_grads(lambda text, ids: text(ids))(text)
  full_loss, full_grads = loss_and_grads(full_context_text_embeddings)(text)
  np.testing.assert_allclose(
    np.asarray(nnx.jit(lambda text: text(ids))(text)),
    np.asarray(nnx.jit(full_context_text_embeddings)(text, ids)),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-5)
  grads, full_grads = nnx.state(grads, nnx.Param), nnx.state(full_grads, nnx.Param)
  assert jax.tree.structure(grads) == jax.tree.structure(full_grads)
  for path, grad in nnx.to_flat_state(grads):
    full = np.asarray(dict(nnx.to_flat_state(full_grads))[path][...])
    # float32 rounding differs between the two orders of summation: compare to the array's scale
    np.testing.assert_allclose(np.asarray(grad[...]), full, rtol=0, atol=1e-4 * np.abs(full).max(), err_msg=str(path))


def test_rows_at_picks_the_rows_fancy_indexing_picks_without_collectives_when_sharded():
  rng = np.random.default_rng(3)
  for shape in ((5, 7), (4, 9, 3), (2, 6, 3, 2)):
    x = rng.normal(size=shape).astype(np.float32)
    positions = rng.integers(0, shape[1], (shape[0], 3))
    np.testing.assert_array_equal(
      np.asarray(rows_at(jnp.asarray(x), jnp.asarray(positions))), x[np.arange(shape[0])[:, None], positions]
    )
  mesh = sharding.make_mesh(dict(data=8, fsdp=1, tensor=1))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.device_put(jnp.ones((16, 12, 64)), rows)
  positions = jax.device_put((jnp.arange(32) % 12).reshape(16, 2), rows)
  hlo = jax.jit(rows_at).lower(x, positions).compile().as_text()
  assert not [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]


def test_truncation_keeps_sequences_longer_than_every_bucket():
  ids = random_tokens(np.random.default_rng(2), 4, 77, context=77)
  ids[0, -1] = EOT
  assert truncate_to_bucket(ids, (16, 32)).shape == (4, 77)


def test_init_is_deterministic_and_depends_on_the_seed(config, model):
  again = nnx.state(build_model(config.model, seed=0), nnx.Param)
  other = nnx.state(build_model(config.model, seed=1), nnx.Param)
  state = nnx.state(model, nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, state, again)
  for value, other_value in zip(jax.tree.leaves(state), jax.tree.leaves(other)):
    value, other_value = np.asarray(value), np.asarray(other_value)
    is_random = value.size > 1 and value.std() > 0
    assert not is_random or (value != other_value).mean() > 0.99
  np.testing.assert_allclose(float(model.logit_scale[...]), np.log(1 / 0.07), rtol=1e-6)


def test_scan_and_remat_compute_the_same_function(inputs, forward, reference_outputs):
  scanned = build_model(tiny_config(scan_layers=True, remat=True).model, seed=0)
  scanned.eval()
  image_out, text_out = forward(scanned, *inputs)
  np.testing.assert_allclose(
    np.asarray(image_out.global_embed), np.asarray(reference_outputs[0].global_embed), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(text_out), np.asarray(reference_outputs[1]), rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_training_mode_only(config, inputs):
  model = build_model(config.model, seed=0)
  encode = nnx.jit(lambda m, x: m.encode_image(x).global_embed)
  model.train()
  first, second = encode(model, inputs[0]), encode(model, inputs[0])
  assert np.abs(np.asarray(first) - np.asarray(second)).max() > 1e-4
  model.eval()
  np.testing.assert_array_equal(np.asarray(encode(model, inputs[0])), np.asarray(encode(model, inputs[0])))


def test_clip_baseline_has_no_decoder_and_a_projected_cls_embedding(inputs):
  config = tiny_config(kind="clip")
  model = nnx.eval_shape(lambda: build_model(config.model, seed=0))
  assert not hasattr(model, "decoder")
  image_out = nnx.eval_shape(lambda m, x: m.encode_image(x), model, inputs[0])
  assert image_out.global_embed.shape == (8, config.model.embed_dim)
  assert image_out.region_embed is None and image_out.boxes is None


def test_logit_scale_clamp(model):
  model = nnx.clone(model)
  for value, expected in ((-1.0, 0.0), (10.0, MAX_LOGIT_SCALE), (2.0, 2.0)):
    model.logit_scale[...] = jnp.asarray(value)
    model.clamp_logit_scale()
    assert float(model.logit_scale[...]) == pytest.approx(expected)


@pytest.mark.parametrize("mesh_sizes", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_model_equals_the_unsharded_one(config, inputs, forward, reference_outputs, mesh_sizes):
  mesh = sharding.make_mesh(mesh_sizes)
  sharded = sharding.create_sharded(lambda: build_model(config.model, seed=0), mesh, config.sharding_rules)
  sharded.eval()
  kernel = sharded.visual.blocks.blocks.mlp.fc1.kernel
  assert kernel.sharding.spec == sharding.logical_to_spec(("layers", "embed", "mlp"), config.sharding_rules)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    image_out, text_out = forward(sharded, *inputs)
  reference_image, reference_text = reference_outputs
  for got, want in (
    (image_out.global_embed, reference_image.global_embed),
    (image_out.region_embed, reference_image.region_embed),
    (image_out.boxes, reference_image.boxes),
    (text_out, reference_text),
  ):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
