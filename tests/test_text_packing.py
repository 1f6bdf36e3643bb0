"""Packing captions and descriptions into rows: every text recoverable from the packed arrays, rows
within bounds, and the text tower giving each packed text the embedding it gets alone."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grain_jax.config import load_config
from grain_jax.data import text_packing
from grain_jax.data.text_packing import TEXTS_PER_ROW, pack_batch, padded_rows
from grain_jax.models.grain import build_model
from grain_jax.models.text import texts_at

SOT, EOT = 49406, 49407


def texts(rng: np.random.Generator, shape: tuple[int, ...], max_length: int, context: int = 77) -> np.ndarray:
  """`[*shape, context]` ids: SOT, random tokens, EOT; 2 to `max_length` tokens each, zeros after."""
  ids = np.zeros((*shape, context), np.int32)
  flat = ids.reshape(-1, context)
  for row, length in zip(flat, rng.integers(2, max_length + 1, flat.shape[0])):
    row[0], row[1 : length - 1], row[length - 1] = SOT, rng.integers(1, SOT, length - 2), EOT
  return ids


def random_batch(rng, size=12, slots=4, max_length=30, valid_share=0.6):
  return dict(
    caption_ids=texts(rng, (size,), max_length),
    desc_ids=texts(rng, (size, slots), max_length),
    box_valid=rng.random((size, slots)) < valid_share,
    image=np.zeros((size, 2, 2, 3), np.float32),
  )


def unpacked(packed: dict, groups: int, key: str) -> list[np.ndarray]:
  """Each text of `key`'s slots read back from the packed rows through its slot and segment."""
  rows_per_group = packed["text_tokens"].shape[0] // groups
  slots = packed[key].reshape(groups, -1)
  out = []
  for group, group_slots in enumerate(slots):
    for slot in group_slots:
      row = group * rows_per_group + slot // TEXTS_PER_ROW
      segment = slot % TEXTS_PER_ROW + 1
      columns = np.flatnonzero(packed["text_segments"][row] == segment)
      np.testing.assert_array_equal(columns, np.arange(columns[0], columns[0] + len(columns)))  # contiguous
      np.testing.assert_array_equal(packed["text_positions"][row, columns], np.arange(len(columns)))
      assert packed["text_eot"][row, segment - 1] == columns[-1]
      out.append(packed["text_tokens"][row, columns])
  return out


def length_of(ids: np.ndarray) -> int:
  return int(np.argmax(ids)) + 1


@pytest.mark.parametrize("seed, groups, max_length", [(0, 1, 30), (1, 3, 12), (2, 4, 77), (3, 2, 4)])
def test_every_text_is_recoverable_from_its_slot(seed, groups, max_length):
  rng = np.random.default_rng(seed)
  batch = random_batch(rng, max_length=max_length)
  packed = pack_batch(batch, groups, 77)
  for got, ids in zip(unpacked(packed, groups, "caption_slot"), batch["caption_ids"]):
    np.testing.assert_array_equal(got, ids[: length_of(ids)])
  descriptions = unpacked(packed, groups, "desc_slot")
  for got, ids, valid in zip(descriptions, batch["desc_ids"].reshape(-1, 77), batch["box_valid"].reshape(-1)):
    if valid:
      np.testing.assert_array_equal(got, ids[: length_of(ids)])
  # Nothing else is packed: the real tokens are exactly the captions' and the valid descriptions'.
  real = sum(length_of(ids) for ids in batch["caption_ids"]) + sum(
    length_of(ids) for ids, valid in zip(batch["desc_ids"].reshape(-1, 77), batch["box_valid"].reshape(-1)) if valid
  )
  assert np.count_nonzero(packed["text_segments"]) == real
  assert (packed["text_segments"].max(axis=1) <= TEXTS_PER_ROW).all()
  # The other fields pass through untouched.
  assert set(packed) == set(batch) - {"caption_ids", "desc_ids"} | set(text_packing.PACKED_KEYS)
  np.testing.assert_array_equal(packed["box_valid"], batch["box_valid"])


def test_rows_are_few_and_the_same_for_every_group():
  rng = np.random.default_rng(4)
  batch = random_batch(rng, size=64, slots=10, max_length=20, valid_share=1.0)
  packed = pack_batch(batch, 4, 77)
  rows = packed["text_tokens"].shape[0] // 4
  for group in range(4):
    examples = slice(16 * group, 16 * (group + 1))
    tokens = sum(length_of(ids) for ids in batch["caption_ids"][examples]) + sum(
      length_of(ids) for ids in batch["desc_ids"][examples].reshape(-1, 77)
    )
    used = np.count_nonzero(packed["text_segments"][rows * group : rows * (group + 1)].any(axis=1))
    # Best fit, longest first, wastes little: within one row of the token count's lower bound here.
    assert used <= -(-tokens // 77) + 1
  assert rows == padded_rows(rows)


def test_rows_agreed_across_processes_only_add_empty_rows():
  rng = np.random.default_rng(5)
  batch = random_batch(rng)
  alone = pack_batch(batch, 2, 77)
  agreed = pack_batch(batch, 2, 77, agree_rows=lambda rows: rows + 7)
  assert agreed["text_tokens"].shape[0] == alone["text_tokens"].shape[0] + 14
  for key in ("caption_slot", "desc_slot"):
    assert unpacked(agreed, 2, key)[0].tolist() == unpacked(alone, 2, key)[0].tolist()
    np.testing.assert_array_equal(agreed[key], alone[key])


def test_without_descriptions_only_captions_are_packed():
  batch = random_batch(np.random.default_rng(6))
  packed = pack_batch(batch, 2, 77, with_descriptions=False)
  assert np.count_nonzero(packed["text_segments"]) == sum(length_of(ids) for ids in batch["caption_ids"])
  assert not packed["desc_slot"].any()


def test_padded_rows_is_a_ladder_of_four_steps_per_octave():
  values = [padded_rows(n) for n in range(1, 3000)]
  assert all(n <= value < 1.25 * n + 1 for n, value in zip(range(1, 3000), values))
  assert all(padded_rows(value) == value for value in values)  # the maximum over processes stays on the ladder
  assert sorted(set(v for v in values if 16 <= v <= 64)) == [16, 20, 24, 28, 32, 40, 48, 56, 64]


def test_bad_shapes_are_refused_with_the_reason():
  batch = random_batch(np.random.default_rng(7), size=6)
  with pytest.raises(ValueError, match="6 examples does not split into 4 groups"):
    pack_batch(batch, 4, 77)
  batch["caption_ids"][1] = np.r_[SOT, np.arange(1, 76), EOT]
  with pytest.raises(ValueError, match="a text of 77 tokens does not fit rows of 64"):
    pack_batch(batch, 2, 64)


def test_rows_shorter_than_the_id_arrays_take_texts_that_fit():
  batch = random_batch(np.random.default_rng(10), size=4, max_length=30)
  short, full = pack_batch(batch, 2, 32), pack_batch(batch, 2, 77)
  assert short["text_tokens"].shape[1] == 32
  for key in ("caption_slot", "desc_slot"):
    assert [t.tolist() for t in unpacked(short, 2, key)] == [t.tolist() for t in unpacked(full, 2, key)]


@pytest.mark.parametrize("stack", [dict(scan_layers=False, remat=False), dict(scan_layers=True, remat=True)])
def test_the_text_tower_gives_packed_texts_their_own_embeddings(stack):
  config = load_config("configs/base.py:tiny")
  config.model.update(stack)
  model = build_model(config.model, seed=0)
  batch = random_batch(np.random.default_rng(8), size=6, slots=5, max_length=40)
  batch["caption_ids"][0] = np.r_[SOT, np.arange(1, 76), EOT]  # a caption that fills a whole row
  packed = pack_batch(batch, 2, 77, agree_rows=lambda rows: rows + 1)
  inputs = [jnp.asarray(packed[key]) for key in ("text_tokens", "text_segments", "text_positions", "text_eot")]
  embeds = nnx.jit(lambda m, *x: m.encode_packed_text(*x))(model, *inputs)
  captions = texts_at(embeds, jnp.asarray(packed["caption_slot"]), 2)
  descriptions = texts_at(embeds, jnp.asarray(packed["desc_slot"]), 2)
  encode = nnx.jit(lambda m, ids: m.encode_text(ids))
  np.testing.assert_allclose(
    np.asarray(captions), np.asarray(encode(model, jnp.asarray(batch["caption_ids"]))), rtol=1e-5, atol=1e-5
  )
  alone = np.asarray(encode(model, jnp.asarray(batch["desc_ids"].reshape(-1, 77)))).reshape(6, 5, -1)
  valid = batch["box_valid"]
  np.testing.assert_allclose(np.asarray(descriptions)[valid], alone[valid], rtol=1e-5, atol=1e-5)
