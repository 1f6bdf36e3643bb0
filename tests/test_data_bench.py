"""The data benchmark runs end to end (tiny sizes; the real figures come from its defaults)."""

import numpy as np
import pytest

from grain_jax.bench import data
from grain_jax.data.tokenizer import EOT_ID


def test_data_benchmark_runs(capsys):
  argv = ["--num-records", "12", "--stored-size", "48", "--image-size", "32", "--batch-size", "4",
          "--num-batches", "2", "--workers", "0"]
  assert data.main(argv) == 0
  out = capsys.readouterr().out
  assert "examples per CPU-second" in out and "per CPU-s" in out
  assert "captions:" in out and "descriptions:" in out


def test_text_padding_counts_the_tokens_run_after_eot_and_in_empty_slots():
  rng = np.random.default_rng(0)
  buckets = (8, 16, 77)
  batches = []
  for _ in range(3):
    captions = np.zeros((4, 77), np.int32)
    descriptions = np.zeros((4, 2, 77), np.int32)
    for row in [*captions, *descriptions.reshape(8, 77)[:6]]:  # views; the last description slots stay empty
      eot = rng.integers(1, 20)
      row[:eot], row[eot] = rng.integers(1, 100, eot), EOT_ID
    batches.append(dict(caption_ids=captions, desc_ids=descriptions))
  report = data.text_padding(batches, buckets)
  for key in ("caption_ids", "desc_ids"):
    rows = [batch[key].reshape(-1, 77) for batch in batches]
    real = [sum(int(np.argmax(row)) + 1 for row in ids if row.any()) for ids in rows]
    needed = [max(int(np.argmax(row)) + 1 for row in ids) for ids in rows]
    run = [len(ids) * min(bucket for bucket in buckets if bucket >= length) for ids, length in zip(rows, needed)]
    assert report[key]["padding"] == pytest.approx(1 - sum(real) / sum(run))
    assert report[key]["padding_full"] == pytest.approx(1 - sum(real) / (77 * sum(map(len, rows))))
    assert report[key]["lengths"].size == sum(map(len, rows)) and 0 < report[key]["padding"] < 1
