"""The Grain training pipeline: batches, host sharding, determinism, checkpoints, bad records."""

import os
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
from etils import epath

from conftest import png_bytes
from grain_jax.config import base
from grain_jax.data import pipeline, quality, records, workers

NUM_RECORDS = 12


def _png(i: int) -> bytes:
  return png_bytes(24, 16, (20 * i % 256, 100, 50))


def _record(i: int) -> records.Record:
  regions = tuple(
    records.Region(f"object {j} of {i}", (0.1 * j, 0.1, 0.1 * j + 0.2, 0.6), 0.9 - j / 10) for j in range(i % 4)
  )
  return records.Record(f"img/{i}", _png(i), f"record {i}", "", regions)


def _write(path, data: list[bytes], shard_size: int = 5) -> str:
  os.makedirs(path, exist_ok=True)
  shards = []
  for start in range(0, len(data), shard_size):
    name = records.shard_name(len(shards))
    count = records.write_shard(os.path.join(path, name), data[start : start + shard_size])
    shards.append({"file": name, "count": count})
  records.write_manifest(str(path), shards, "test")
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("records"), [records.serialize(_record(i)) for i in range(NUM_RECORDS)])


def _dataset(data_dir, **kwargs):
  options = dict(
    global_batch_size=2,
    image_size=16,
    num_regions=3,
    seed=0,
    num_epochs=1,
    read_threads=2,
    process_index=0,
    process_count=1,
  )
  options.update(kwargs)
  return pipeline.train_dataset(data_dir, **options)


def _captions(batches) -> list[tuple[int, ...]]:
  return [tuple(row) for batch in batches for row in batch["caption_ids"]]


def test_batch_from_config(data_dir):
  config = base.get_config("tiny")
  config.data.batch_size = 4
  batch = next(iter(pipeline.train_dataset_from_config(config, data_dir)))
  k = config.model.decoder.num_region_queries
  size = config.model.image.image_size
  assert {key: (v.shape, v.dtype) for key, v in batch.items()} == {
    "image": ((4, size, size, 3), np.float32),
    "caption_ids": ((4, 77), np.int32),
    "boxes": ((4, k, 4), np.float32),
    "box_valid": ((4, k), np.bool_),
    "desc_ids": ((4, k, 77), np.int32),
    "desc_text_id": ((4, k), np.int32),
  }
  assert set(batch) == set(pipeline.BATCH_KEYS)
  boxes = batch["boxes"][batch["box_valid"]]
  assert ((boxes >= 0) & (boxes <= 1)).all()


def test_hosts_read_disjoint_slices(data_dir):
  hosts = [_captions(_dataset(data_dir, global_batch_size=2, process_index=i, process_count=2)) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == NUM_RECORDS // 2
  assert not set(hosts[0]) & set(hosts[1])
  assert len(set(hosts[0]) | set(hosts[1])) == NUM_RECORDS


def test_global_batches_do_not_depend_on_the_number_of_hosts(data_dir):
  one = list(_dataset(data_dir, global_batch_size=4))
  hosts = [list(_dataset(data_dir, global_batch_size=4, process_index=i, process_count=2)) for i in range(2)]
  assert len(one) == len(hosts[0]) == len(hosts[1]) == NUM_RECORDS // 4
  for whole, first, second in zip(one, *hosts):
    for key, value in whole.items():
      np.testing.assert_array_equal(value, np.concatenate([first[key], second[key]]))


def test_seeded_order_and_epochs(data_dir):
  epoch = _captions(_dataset(data_dir))
  assert len(epoch) == NUM_RECORDS == len(set(epoch))
  assert _captions(_dataset(data_dir)) == epoch
  assert _captions(_dataset(data_dir, seed=1)) != epoch
  two = _captions(_dataset(data_dir, num_epochs=2))
  assert two[:NUM_RECORDS] == epoch and sorted(two[NUM_RECORDS:]) == sorted(epoch)
  assert two[NUM_RECORDS:] != epoch  # each epoch is shuffled anew


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_checkpoint_round_trip(data_dir, tmp_path, num_workers):
  handler = grain.checkpoint.CheckpointHandler()  # what Orbax runs for the data iterator
  iterator = iter(_dataset(data_dir, num_epochs=None, num_workers=num_workers))
  next(iterator)
  handler.save(epath.Path(tmp_path), iterator)
  expected = [next(iterator) for _ in range(3)]
  restored = handler.restore(epath.Path(tmp_path), iter(_dataset(data_dir, num_epochs=None, num_workers=num_workers)))
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert restored.stats.summary() == iterator.stats.summary()


def test_one_worker_process_gives_the_same_batches(data_dir):
  assert _captions(_dataset(data_dir, num_workers=1)) == _captions(_dataset(data_dir))


# A trainer (the parent) forks a worker that runs Grain's init function, sends itself SIGTERM, says
# it lives, and waits; the trainer then dies without cleaning up.
_ORPHANED_WORKER = """
import os, signal, threading
from grain_jax.data.workers import init_worker
read_end, write_end = os.pipe()
worker = os.fork()
if worker == 0:
  os.close(read_end)
  devnull = os.open(os.devnull, os.O_WRONLY)  # lets the test read the trainer's output to its end
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  init_worker(0, 1)
  os.kill(os.getpid(), signal.SIGTERM)
  os.write(write_end, b"alive")
  threading.Event().wait(60)
  os._exit(1)
os.close(write_end)
print(worker, os.read(read_end, 5).decode() or "dead", flush=True)
os._exit(0)
"""


def _running(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_a_worker_survives_sigterm_and_ends_when_its_trainer_dies():
  """Preemption notices reach every process of a job; the trainer saves and stops, its workers end."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, "-c", _ORPHANED_WORKER],
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(os.environ, PYTHONPATH=repo),
  )
  worker, state = result.stdout.split()
  assert state == "alive", result.stderr
  deadline = time.monotonic() + 10 * workers.PARENT_CHECK_S
  while _running(int(worker)):
    assert time.monotonic() < deadline, f"worker {worker} outlived its trainer"
    time.sleep(0.05)


def test_bad_records_are_skipped_and_counted(tmp_path):
  data = [records.serialize(_record(i)) for i in range(NUM_RECORDS)]
  data[2] = b"\x00garbage"
  data[5] = records.serialize(records.Record("img/5", b"not a png", "caption"))
  data[7] = records.serialize(records.Record("img/7", _png(7), "", ""))
  data[8] = records.serialize(
    records.Record("img/8", _png(8), "caption", "", (records.Region("x", (0.9, 0.2, 0.1, 1.3), 0.5),))
  )
  iterator = iter(_dataset(_write(tmp_path, data), max_bad_fraction=0.5))
  captions = _captions(iterator)
  assert len(captions) == NUM_RECORDS - 4  # 9 good records, batches of 2
  summary = iterator.stats.summary()
  assert summary["seen"] == NUM_RECORDS and summary["skipped"] == 3
  assert summary["skipped/unreadable_record"] == 1
  assert summary["skipped/corrupt_image"] == 1 and summary["skipped/empty_caption"] == 1
  assert summary["fixed/box_reordered"] == 1 and summary["fixed/box_clipped"] == 1


def test_too_many_bad_records_stop_with_the_file_name(tmp_path):
  data = [records.serialize(_record(i)) for i in range(NUM_RECORDS)]
  data[6:] = [b"garbage"] * (NUM_RECORDS - 6)  # shards 1 and 2 hold the bad half
  iterator = iter(_dataset(_write(tmp_path, data), num_epochs=None, max_bad_fraction=0.2))
  with pytest.raises(quality.BadDataError, match=r"shard-0000[12]\.array_record"):
    for _ in range(200):
      next(iterator)


def test_data_that_is_all_bad_stops_instead_of_hanging(tmp_path):
  iterator = iter(_dataset(_write(tmp_path, [b"garbage"] * NUM_RECORDS), num_epochs=None, global_batch_size=4))
  with pytest.raises(quality.BadDataError, match=r"shard-0000[0-2]\.array_record"):
    next(iterator)  # before: no batch ever filled, so this never returned


def damage_shard(path: str, inside: bytes) -> set[int]:
  """Flips 16 bytes of the ArrayRecord shard `path` where the bytes `inside` start (records are
  stored uncompressed); returns the numbers of its records that no longer read."""
  blob = bytearray(open(path, "rb").read())
  start = blob.index(inside)
  blob[start : start + 16] = bytes(b ^ 0xFF for b in blob[start : start + 16])
  open(path, "wb").write(bytes(blob))
  shard = grain.sources.ArrayRecordDataSource([path])
  damaged = set()
  for position in range(len(shard)):
    try:
      shard[position]
    except RuntimeError:
      damaged.add(position)
  return damaged


@pytest.fixture
def damaged_data(tmp_path):
  """The test records in shards of 6, the first shard's bytes of record 3 corrupted: (data dir, the
  numbers of its records that do not read)."""
  data_dir = _write(tmp_path, [records.serialize(_record(i)) for i in range(NUM_RECORDS)], shard_size=6)
  damaged = damage_shard(os.path.join(data_dir, records.shard_name(0)), b"record 3")
  assert damaged == {3}
  return data_dir, damaged


def test_records_of_a_corrupt_block_are_skipped_and_counted(damaged_data, caplog):
  data_dir, damaged = damaged_data
  iterator = iter(_dataset(data_dir, max_bad_fraction=0.5))
  captions = _captions(iterator)
  assert len(captions) == 2 * ((NUM_RECORDS - len(damaged)) // 2)  # batches of 2: the others all train
  summary = iterator.stats.summary()
  assert summary["seen"] == NUM_RECORDS and summary["skipped/damaged_record"] == len(damaged)
  assert "skipping a damaged record" in caplog.text and "Corrupted Riegeli" in caplog.text


def test_too_many_damaged_records_stop_naming_the_file_and_the_record(damaged_data):
  iterator = iter(_dataset(damaged_data[0], num_epochs=None, max_bad_fraction=0.05))
  with pytest.raises(quality.BadDataError, match=r"damaged_record at \S*/shard-00000\.array_record, record 3\)"):
    for _ in range(200):
      next(iterator)
