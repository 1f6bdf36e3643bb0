"""The inputs of the annotation pipeline: image folders and record datasets."""

import pytest
from PIL import Image

from grain_jax.annotate import sources
from grain_jax.data import quality, records


def test_folder_order_alt_texts_and_bad_files(tmp_path):
  (tmp_path / "z").mkdir()
  for name in ["b.PNG", "a.jpg", "z/c.webp"]:
    Image.new("RGB", (8, 6), (1, 2, 3)).save(tmp_path / name)
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "a.txt").write_text("sidecar of a")
  (tmp_path / "b.txt").write_bytes(b"\xff\xfe")  # not UTF-8, but captions.csv has b
  (tmp_path / "z" / "c.txt").write_bytes(b"\xff\xfe")
  (tmp_path / "captions.csv").write_text("b.PNG,  csv caption of b \n")
  folder = sources.open_source(str(tmp_path), str(tmp_path / "captions.csv"))
  assert folder.keys == ["a.jpg", "b.PNG", "z/c.webp"]
  assert [folder.load(i).alt_text for i in range(2)] == ["sidecar of a", "csv caption of b"]
  assert folder.load(0).pixels.size == (8, 6)
  with pytest.raises(quality.BadRecordError) as error:
    folder.load(2)
  assert error.value.reason == quality.NON_UTF8_TEXT
  # A re-run resumes only over the same list of images.
  assert sources.open_source(str(tmp_path)).fingerprint() == folder.fingerprint()
  Image.new("RGB", (8, 6)).save(tmp_path / "d.jpg")
  assert sources.open_source(str(tmp_path)).fingerprint() != folder.fingerprint()


def test_an_empty_folder_is_an_error(tmp_path):
  (tmp_path / "readme.txt").write_text("no images here")
  with pytest.raises(FileNotFoundError, match="holds no image files"):
    sources.open_source(str(tmp_path))


def test_a_record_dataset_keeps_keys_images_and_alt_texts(tmp_path):
  png = tmp_path / "x.png"
  Image.new("RGB", (4, 4)).save(png)
  written = [records.Record("k0", png.read_bytes(), "alt 0"), records.Record("k1", b"not an image", "alt 1")]
  records.write_dataset(str(tmp_path / "data"), written, source="test", shard_size=1)
  dataset = sources.open_source(str(tmp_path / "data"))
  assert len(dataset) == 2
  loaded = dataset.load(0)
  assert (loaded.key, loaded.image, loaded.alt_text) == ("k0", png.read_bytes(), "alt 0")
  with pytest.raises(quality.BadRecordError, match="corrupt_image: k1"):
    dataset.load(1)
