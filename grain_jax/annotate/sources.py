"""The images to annotate: a folder of image files, or an existing record dataset.

Both list their images in a fixed order (sorted paths; record order), so that every host and
every re-run agrees on which image is number i. `load(i)` returns the record's key, the image
bytes to store, its alt-text and the decoded RGB image the models read.

Alt-text of a folder image, first found: its row in `captions.csv` (the reference's
`image_path,caption` format, paths relative to the folder), a sidecar `<name>.txt` next to the
image (the layout img2dataset's "files" output writes for CC3M / CC12M), else none (""); an
image without alt-text trains on its MLLM caption (examples.choose_caption falls back to it).
"""

import dataclasses
import hashlib
import io
import os
from collections.abc import Iterable

from array_record.python import array_record_data_source
from PIL import Image

from grain_jax.data import convert, quality, records
from grain_jax.errors import ArgumentError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """One input image: `image` is what the record stores, `pixels` what the models read."""

  key: str
  image: bytes
  alt_text: str
  pixels: Image.Image


def decode_rgb(data: bytes, key: str) -> Image.Image:
  """Encoded image bytes -> RGB PIL image; quality.BadRecordError(CORRUPT_IMAGE) if they aren't."""
  try:
    image = Image.open(io.BytesIO(data))
    return image.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise quality.BadRecordError(quality.CORRUPT_IMAGE, key) from e


class ImageFolder:
  """The image files under `root` (recursively), optionally with a captions.csv of alt-texts."""

  def __init__(self, root: str, captions: str = "", max_side: int = 512):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"--images {root} is not a directory")
    self.root, self.max_side = root, max_side
    self.keys = sorted(
      os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
      for folder, _, names in os.walk(root)
      for name in names
      if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not self.keys:
      raise FileNotFoundError(f"--images {root} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    self.captions = {
      path: text for path, text, reason in (convert.read_captions(captions) if captions else ()) if not reason
    }

  def __len__(self) -> int:
    return len(self.keys)

  def fingerprint(self) -> str:
    """Identifies the list of images: a re-run must list the same ones to resume."""
    return _digest(self.keys)

  def _alt_text(self, key: str) -> str:
    if key in self.captions:
      return quality.clean_text(self.captions[key])
    sidecar = os.path.join(self.root, os.path.splitext(key)[0] + ".txt")
    if not os.path.exists(sidecar):
      return ""
    with open(sidecar, "rb") as f:
      return quality.clean_text(f.read())

  def load(self, index: int) -> Loaded:
    """Image `index`; raises quality.BadRecordError (with the reason) when it can't be used."""
    key = self.keys[index]
    image = convert.encode_image(os.path.join(self.root, key), self.max_side)
    return Loaded(key, image, self._alt_text(key), decode_rgb(image, key))


class RecordDataset:
  """The records of a dataset written by grain_jax (convert, annotate): re-annotated, alt-text kept."""

  def __init__(self, data_dir: str):
    manifest = records.read_manifest(data_dir)
    self.source = array_record_data_source.ArrayRecordDataSource(records.shard_paths(data_dir, manifest))
    self.shards = [(s["file"], s["count"]) for s in manifest["shards"]]

  def __len__(self) -> int:
    return len(self.source)

  def fingerprint(self) -> str:
    """Identifies the list of images: a re-run must list the same ones to resume."""
    return _digest(f"{file}:{count}" for file, count in self.shards)

  def load(self, index: int) -> Loaded:
    record = records.deserialize(self.source[index])
    return Loaded(record.key, record.image, record.caption, decode_rgb(record.image, record.key))


def open_source(images: str, captions: str = "", max_side: int = 512) -> ImageFolder | RecordDataset:
  """A record dataset when `images` holds a manifest.json, else a folder of image files."""
  if os.path.exists(os.path.join(images, records.MANIFEST)):
    if captions:
      raise ArgumentError(
        f"--captions is for image folders; {images} is a record dataset, whose records carry their alt-text"
      )
    return RecordDataset(images)
  return ImageFolder(images, captions, max_side)


def _digest(lines: Iterable[str]) -> str:
  digest = hashlib.blake2b(digest_size=8)
  for line in lines:
    digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
  return digest.hexdigest()
