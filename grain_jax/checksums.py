"""Checksums of arrays' values, computed where the arrays live (on device, sharded or not).

A checkpoint holds one per array, so that restored values can be verified (train/checkpoint.py), and
the evaluation's text cache is keyed by those of the text tower (eval/text_cache.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def _path(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def leaf_names(tree) -> list[str]:
  """`"params/decoder/..."` of every leaf, in `jax.tree.leaves` order."""
  return ["/".join(_path(key) for key in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _bits(x: jax.Array) -> jax.Array:
  """`x`'s bit pattern as uint32 values (an 8-byte type gives two per value)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """A uint32 checksum of `x`'s values: each value's bits mixed with its position, summed modulo 2**32.

  The sum does not depend on the order of the additions, so every sharding and process count gives
  the same checksum; the mixing (murmur3's finalizer) makes a changed or moved value change it.
  """
  bits = _bits(x)
  strides = np.cumprod((1,) + bits.shape[:0:-1])[::-1] if bits.ndim else ()
  index = sum(
    (
      jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(int(stride) % 2**32)
      for axis, stride in enumerate(strides)
    ),
    jnp.zeros(bits.shape, jnp.uint32),
  )
  mixed = (bits ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
  mixed = (mixed ^ (mixed >> 13)) * jnp.uint32(0xC2B2AE35)
  return jnp.sum(mixed ^ (mixed >> 16), dtype=jnp.uint32)


@jax.jit
def leaf_checks(tree) -> tuple[jax.Array, jax.Array]:
  """(checksum of every leaf `[n]` uint32, whether every floating value is finite)."""
  leaves = jax.tree.leaves(tree)
  finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack([_checksum(x) for x in leaves]), jnp.all(jnp.stack(finite)) if finite else jnp.array(True)


def to_host(x: jax.Array) -> np.ndarray:
  """The value of a result of `leaf_checks` on this host, also when it spans several processes."""
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def checksums(tree) -> dict[str, int]:
  """`{"params/decoder/...": checksum}` of every array of `tree` (a collective with several processes)."""
  values, _ = leaf_checks(tree)
  return dict(zip(leaf_names(tree), (int(v) for v in to_host(values)), strict=True))
