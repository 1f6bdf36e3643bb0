"""Our parameter state (an `nnx.State` of Params) as a flat `path -> array` mapping, and back.

Paths are tuples of module attribute names and list indices, e.g.
`("visual", "blocks", "blocks", "attn", "qkv_kernel")`, the form `layout.reference_layout` uses.
"""

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from grain_jax.torch_format.layout import Path


def _path_of(key_path) -> Path:
  """A jax key path -> our path; the trailing `.value` of an nnx Variable is dropped."""
  parts = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(key.key)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(key.idx)
  return tuple(parts)


def flatten(state) -> dict[Path, object]:
  """`nnx.State` (arrays, ShapeDtypeStructs, ...) -> `{path: leaf}`."""
  return {_path_of(key_path): leaf for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def replace(state, values: Mapping[Path, np.ndarray]):
  """`state` with the leaves named in `values` replaced, each placed with the old leaf's sharding.

  Leaves not in `values` are kept; dtypes follow the old leaves.
  """

  def put(key_path, leaf):
    value = values.get(_path_of(key_path))
    if value is None:
      return leaf
    value = np.asarray(value, leaf.dtype)
    # Each device receives only its own slice, on one host or many.
    return jax.make_array_from_callback(value.shape, leaf.sharding, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(put, state)


def to_host(array: jax.Array) -> np.ndarray:
  """One (possibly sharded, multi-process) array as a full numpy array on every host."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array))
