"""Record schema, shards and manifest."""

import json
import os

import msgpack
import pytest

from grain_jax.data import quality, records


def _record(i: int) -> records.Record:
  return records.Record(
    f"img/{i}.jpg",
    bytes([i]) * 10,
    f"alt {i}",
    "" if i % 2 else f"mllm {i}",
    (records.Region(f"thing {i}", (0.1, 0.2, 0.3, 0.4), 0.5),),
  )


def test_serialize_round_trip():
  record = _record(3)
  assert records.deserialize(records.serialize(record)) == record


@pytest.mark.parametrize(
  "data",
  [
    b"",
    b"\x00\x01garbage",
    msgpack.packb({"schema": 99}),
    msgpack.packb({"schema": 1, "key": "k"}),
    msgpack.packb([1, 2]),
  ],
)
def test_unreadable_records_raise_with_reason(data):
  with pytest.raises(quality.BadRecordError) as error:
    records.deserialize(data)
  assert error.value.reason == quality.UNREADABLE_RECORD


def test_non_utf8_text_in_record():
  fields = msgpack.unpackb(records.serialize(_record(0)))
  fields["caption"] = b"\xff\xfe"
  data = msgpack.packb(fields, use_bin_type=False)  # raw bytes where a str belongs
  with pytest.raises(quality.BadRecordError) as error:
    records.deserialize(data)
  assert error.value.reason == quality.NON_UTF8_TEXT


def test_write_read_dataset_with_shards(tmp_path):
  manifest = records.write_dataset(str(tmp_path), (_record(i) for i in range(7)), "test", shard_size=3)
  assert manifest["count"] == 7
  assert [s["count"] for s in manifest["shards"]] == [3, 3, 1]
  assert list(records.read_records(str(tmp_path))) == [_record(i) for i in range(7)]
  assert records.record_location(str(tmp_path), manifest, 0) == (str(tmp_path / "shard-00000.array_record"), 0)
  assert records.record_location(str(tmp_path), manifest, 4) == (str(tmp_path / "shard-00001.array_record"), 1)
  assert records.record_location(str(tmp_path), manifest, 6) == (str(tmp_path / "shard-00002.array_record"), 0)


def test_reader_validates_manifest(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a grain-jax record dataset"):
    records.read_manifest(str(tmp_path))
  records.write_dataset(str(tmp_path), [_record(0)], "test")
  path = tmp_path / records.MANIFEST
  manifest = json.loads(path.read_text())
  path.write_text(json.dumps(dict(manifest, schema_version=0)))
  with pytest.raises(ValueError, match="schema version 0"):
    records.read_manifest(str(tmp_path))
  path.write_text(json.dumps(manifest))
  os.remove(tmp_path / manifest["shards"][0]["file"])
  with pytest.raises(FileNotFoundError, match="which is missing"):
    records.read_manifest(str(tmp_path))


@pytest.mark.parametrize(
  "text, message",
  [
    ('{"schema_version": 1, "shards": [', "manifest.json is not valid JSON"),
    ("[1, 2]", "manifest.json has record schema version None"),
    ('{"schema_version": 1, "shards": [{"file": 3}]}', 'manifest.json: "shards" must be a list'),
  ],
)
def test_a_corrupt_manifest_is_named(tmp_path, text, message):
  (tmp_path / records.MANIFEST).write_text(text)
  with pytest.raises(ValueError, match=message):
    records.read_manifest(str(tmp_path))


def test_a_garbage_shard_is_named(tmp_path):
  manifest = records.write_dataset(str(tmp_path), (_record(i) for i in range(4)), "test", shard_size=2)
  (tmp_path / manifest["shards"][1]["file"]).write_bytes(b"not an array record")
  with pytest.raises(ValueError, match=r"shard-00001\.array_record is not a readable ArrayRecord file"):
    records.data_source(str(tmp_path), manifest)
