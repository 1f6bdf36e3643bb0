"""The data benchmark runs end to end (tiny sizes; the real figures come from its defaults)."""

import numpy as np
import pytest

from grain_jax.bench import data
from grain_jax.data import text_packing
from grain_jax.data.tokenizer import EOT_ID


def test_data_benchmark_runs(capsys):
  argv = [
    "--num-records",
    "12",
    "--stored-size",
    "48",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--examples-per-device",
    "2",
    "--num-batches",
    "2",
    "--workers",
    "0",
  ]
  assert data.main(argv) == 0
  out = capsys.readouterr().out
  assert "examples per CPU-second" in out and "per CPU-s" in out
  assert "captions:" in out and "descriptions:" in out


def test_text_padding_counts_the_packed_rows_against_the_real_tokens():
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    captions = np.zeros((4, 77), np.int32)
    descriptions = np.zeros((4, 2, 77), np.int32)
    for row in [*captions, *descriptions.reshape(8, 77)[:6]]:  # views; the last description slots stay empty
      eot = rng.integers(1, 20)
      row[:eot], row[eot] = rng.integers(1, 100, eot), EOT_ID
    valid = descriptions.any(axis=-1)
    batches.append(dict(caption_ids=captions, desc_ids=descriptions, box_valid=valid))
  report = data.text_padding(batches, 2)
  real = sum(
    int(np.argmax(row)) + 1
    for batch in batches
    for row in [*batch["caption_ids"], *batch["desc_ids"].reshape(-1, 77)]
    if row.any()
  )
  rows = [text_packing.pack_batch(batch, 2, 77)["text_tokens"].shape[0] for batch in batches]
  assert report["padding"] == pytest.approx(1 - real / (77 * sum(rows)))
  assert report["padding_full"] == pytest.approx(1 - real / (77 * 3 * 12))
  assert 0 < report["padding"] < report["padding_full"] < 1
  assert report["lengths"]["desc_ids"].size == 3 * 8 and np.count_nonzero(report["lengths"]["desc_ids"]) == 3 * 6
  assert len(report["pack_seconds"]) == 3
