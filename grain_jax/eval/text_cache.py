"""Class text embeddings kept between evaluations of the same weights.

Encoding every class's prompts (templates x descriptors) is most of the text side of an evaluation,
and its result depends only on the texts and on the text tower's weights and compute dtype. The
cache is keyed by both: a fingerprint of the text tower (each parameter's checksum, shape and dtype)
and the texts' settings. Other weights at the same step (a run started again from step 0 in the
same workdir, say) never reuse an entry.

Entries live in memory and, when a directory is given, as `<key>.npz` files there (a local folder or
a bucket's gs:// path, through grain_jax.files), written by process 0 atomically (a kill leaves no
partial entry under the final name). An entry that does not read (a truncated file) is computed
again, with a warning, and replaced.
"""

import dataclasses
import hashlib
import io
import json
import logging
import os
import zipfile

import jax
import numpy as np
from flax import nnx

from grain_jax import files
from grain_jax.checksums import checksums
from grain_jax.processes import every_process

# What a damaged .npz raises: a cut-off archive, a bad member, garbage bytes, fields of another type.
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile)


def fingerprint(model) -> str:
  """A digest of what a text embedding depends on in `model`: the text tower's parameters (their
  checksums, shapes, dtypes) and its compute dtype. A collective with several processes."""
  params = nnx.state(model.text, nnx.Param)
  sums = checksums(params)
  arrays = {
    name: [list(leaf.shape), str(leaf.dtype), sums[name]]
    for name, leaf in zip(sums, jax.tree.leaves(params), strict=True)
  }
  text = json.dumps({"dtype": str(np.dtype(model.text.dtype)), "arrays": arrays}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


class TextCache:
  """Values of `value_type` (a dataclass whose fields are arrays or None, such as
  `zeroshot.ClassEmbeddings`) per key, for the text tower of `model`.

  `key(*parts)` names an entry by the weights' fingerprint and `parts` (class names, descriptors,
  templates, options); `get(key)` returns the value or None; `put(key, value)` keeps it. Without
  `directory`, entries live in memory only and no fingerprint is computed.
  """

  def __init__(self, model, value_type: type, directory: str = ""):
    self._value_type, self._directory = value_type, directory
    self._fingerprint = fingerprint(model) if directory else ""
    self._memory: dict[str, object] = {}

  def key(self, *parts) -> str:
    text = json.dumps([self._fingerprint, *parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]

  def _path(self, key: str) -> str:
    return os.path.join(self._directory, f"{key}.npz")

  def get(self, key: str):
    if key not in self._memory and self._directory:
      stored = self._load(key)
      # Hosts must agree: one that skipped the text tower would leave the others' collectives hanging.
      if every_process(stored is not None):
        self._memory[key] = stored
    return self._memory.get(key)

  def _load(self, key: str):
    path = self._path(key)
    if not files.exists(path):
      return None
    try:
      with np.load(io.BytesIO(files.read_bytes(path))) as stored:
        return self._value_type(**{name: stored[name] for name in stored.files})
    except _UNREADABLE as error:
      logging.warning(
        "the text cache entry %s does not read (%s: %s): computing it again", path, type(error).__name__, error
      )
      return None

  def put(self, key: str, value) -> None:
    self._memory[key] = value
    if self._directory and jax.process_index() == 0:
      arrays = {
        field.name: getattr(value, field.name)
        for field in dataclasses.fields(value)
        if getattr(value, field.name) is not None
      }
      files.write_through(self._path(key), lambda f: np.savez(f, **arrays))
