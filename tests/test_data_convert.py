"""The converter from the reference's annotation files to record shards."""

import io
import json
import os
import re

import pytest
from PIL import Image

from grain_jax import errors
from grain_jax.data import convert, quality, records


def _save_image(path, size, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (200, 30, 30)).save(path, fmt)


@pytest.fixture
def inputs(tmp_path):
  root = tmp_path / "images"
  _save_image(str(root / "a.png"), (40, 30), "PNG")
  _save_image(str(root / "sub" / "b.jpg"), (300, 200), "JPEG")
  _save_image(str(root / "c.png"), (20, 20), "PNG")
  (root / "corrupt.png").write_bytes(b"\x89PNG garbage")
  lines = [
    b"a.png,a red square",
    b"sub/b.jpg,a photo, with commas",
    b'"c.png","quoted, caption"',
    b"corrupt.png,x",
    b"missing.png,y",
    b"bad.png,\xff\xfe caption",
    b"only_a_path",
    b"",
  ]
  (tmp_path / "captions.csv").write_bytes(b"\n".join(lines))
  (tmp_path / "mllm.json").write_text(json.dumps({"a.png": "a rich caption of a"}))
  boxes = json.dumps(
    {
      "a.png": [
        {"description": "a red square", "bbox": [96, 192, 480, 960], "score": 0.8},
        {"description": "", "bbox": [0, 0, 480, 480], "score": 0.9},
        {"description": "flipped", "bbox": [480, 480, 96, 96], "score": 0.5},
        {"description": "outside", "bbox": [-10, 0, 1000, 480], "score": 0.4},
      ],
      "sub/b.jpg": [{"description": "no box"}, {"description": "nan", "bbox": "x"}],
      "c.png": [{"description": "BAD_BYTES", "bbox": [0, 0, 96, 96], "score": 0.5}],
    }
  )
  (tmp_path / "bboxes.json").write_bytes(boxes.encode().replace(b"BAD_BYTES", b"caf\xe9"))
  return tmp_path


def _argv(tmp_path, out="out", *extra):
  return [
    "--captions",
    str(tmp_path / "captions.csv"),
    "--mllm-captions",
    str(tmp_path / "mllm.json"),
    "--bboxes",
    str(tmp_path / "bboxes.json"),
    "--image-root",
    str(tmp_path / "images"),
    "--out",
    str(tmp_path / out),
    "--workers",
    "1",
    "--max-side",
    "64",
    "--max-bad-fraction",
    "0.9",
    *extra,
  ]


def test_convert(inputs, capsys):
  assert convert.main(_argv(inputs)) == 0
  out = str(inputs / "out")
  manifest = records.read_manifest(out)
  assert manifest["count"] == 3
  assert manifest["skipped"] == {
    quality.CORRUPT_IMAGE: 1,
    quality.MISSING_IMAGE: 1,
    quality.NON_UTF8_TEXT: 1,
    convert.MALFORMED_ROW: 1,
  }
  a, b, c = records.read_records(out)
  assert (a.key, a.caption, a.mllm_caption) == ("a.png", "a red square", "a rich caption of a")
  # 960x960 detector frame -> normalized; reordered and clipped boxes repaired, empty text dropped.
  assert [r.description for r in a.regions] == ["a red square", "flipped", "outside"]
  assert a.regions[0].box == pytest.approx((0.1, 0.2, 0.5, 1.0))
  assert a.regions[1].box == pytest.approx((0.1, 0.1, 0.5, 0.5))
  assert a.regions[2].box == pytest.approx((0.0, 0.0, 1.0, 0.5))
  assert (b.key, b.caption, b.mllm_caption) == ("sub/b.jpg", "a photo, with commas", "")
  assert b.regions == ()  # both of its entries were malformed
  assert max(Image.open(io.BytesIO(b.image)).size) == 64  # re-encoded: longer side > --max-side
  assert Image.open(io.BytesIO(a.image)).size == (40, 30)  # small images keep their bytes
  assert c.caption == "quoted, caption" and c.regions == ()  # its description isn't UTF-8
  summary = capsys.readouterr().err
  assert "7 rows read, 3 records written, 4 skipped" in summary
  assert "skipped missing_image: 1" in summary and "empty_description: 1" in summary
  assert "regions, non_utf8_text: 1" in summary


def test_parallel_workers_write_the_same_records(inputs):
  convert.main(_argv(inputs, "one"))
  convert.main(_argv(inputs, "two", "--workers", "2", "--shard-size", "3"))
  assert list(records.read_records(str(inputs / "one"))) == list(records.read_records(str(inputs / "two")))


def test_resume_skips_finished_shards(inputs, capsys):
  argv = _argv(inputs, "out", "--shard-size", "2")
  convert.main(argv)
  out = inputs / "out"
  progress = json.loads((out / convert.PROGRESS).read_text())
  assert sorted(progress["shards"]) == ["0", "1", "2", "3"]
  # As if the run had died before shard 1 was written; shard 0 (a.png, b.jpg) is finished.
  del progress["shards"]["1"]
  (out / convert.PROGRESS).write_text(json.dumps(progress))
  os.remove(out / records.shard_name(1))
  os.remove(inputs / "images" / "a.png")  # a finished shard is not read again
  convert.main(argv)
  manifest = records.read_manifest(str(out))
  assert manifest["count"] == 3 and manifest["skipped"][quality.MISSING_IMAGE] == 1
  capsys.readouterr()
  assert convert.main(_argv(inputs, "out", "--shard-size", "3")) == errors.USER_ERROR_STATUS
  assert re.match(r"error: .*out holds a conversion with other settings", capsys.readouterr().err)


def test_too_many_bad_rows_stop_naming_the_input(inputs, capsys):
  argv = _argv(inputs)
  argv[argv.index("--max-bad-fraction") + 1] = "0.2"
  with pytest.raises(quality.BadDataError, match=r"captions.csv.*2 of them in .*images"):
    convert.convert(convert.parse_args(argv))
  capsys.readouterr()
  assert convert.main(argv) == errors.USER_ERROR_STATUS
  assert re.search(r"\nerror: .*captions.csv.*2 of them in .*images[^\n]*\n$", capsys.readouterr().err)


@pytest.mark.parametrize(
  "content, message", [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object")]
)
def test_a_bad_json_input_is_one_error_naming_it(inputs, capsys, content, message):
  (inputs / "bboxes.json").write_text(content)
  assert convert.main(_argv(inputs)) == errors.USER_ERROR_STATUS
  err = capsys.readouterr().err
  assert err.startswith(f"error: {inputs / 'bboxes.json'} {message}") and err.count("\n") == 1


def test_a_url_is_refused_before_anything_is_written(inputs, capsys):
  argv = _argv(inputs)
  argv[argv.index("--out") + 1] = "gs://my-bucket/shards/cc3m"
  assert convert.main(argv) == errors.USER_ERROR_STATUS
  assert capsys.readouterr().err == (
    "error: --out='gs://my-bucket/shards/cc3m' is a URL, but grain-jax reads and writes this through local paths "
    "only (only --workdir and --output-dir may be gs:// URLs): "
    "mount the bucket (launch/mount_bucket.sh my-bucket mounts it at /gcs/my-bucket) and use "
    "/gcs/my-bucket/shards/cc3m\n"
  )
  assert not os.path.exists("gs:")
