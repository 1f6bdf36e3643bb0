"""Sine position encodings: of patch-grid positions (the decoder's memory) and of boxes (anchors).

Each coordinate in [0, 1] is scaled by 2 pi and encoded by sines and cosines at geometrically spaced
frequencies (DETR's and DAB-DETR's scheme), so nearby positions get similar codes and a dot product
between two codes falls off with their distance.
"""

import numpy as np

TEMPERATURE = 10000.0


def sine_encode(coords, features_per_coord: int, xp=np):
  """`coords [..., n]` in [0, 1] -> `[..., n * features_per_coord]` float32; `xp` is the array
  module (numpy, or jax.numpy under jit).

  Feature pair (2i, 2i+1) of each coordinate is (sin, cos) of `2 pi x / TEMPERATURE^(2i / F)`.
  """
  if features_per_coord % 2:
    raise ValueError(f"features_per_coord={features_per_coord} must be even (sine, cosine pairs)")
  frequencies = TEMPERATURE ** (np.arange(features_per_coord // 2, dtype=np.float32) * 2 / features_per_coord)
  angles = coords.astype(xp.float32)[..., None] * (2 * np.pi) / frequencies  # [..., n, F/2]
  pairs = xp.stack([xp.sin(angles), xp.cos(angles)], axis=-1)  # [..., n, F/2, 2]
  return pairs.reshape(*coords.shape[:-1], coords.shape[-1] * features_per_coord)


def patch_grid_table(grid: int, width: int) -> np.ndarray:
  """`[1 + grid * grid, width]` float32: a zero row for the CLS token, then every patch (row-major)
  encoded by its centre's (y, x), `width / 2` features each."""
  if width % 4:
    raise ValueError(f"a 2-D sine table needs a width divisible by 4, got {width}")
  centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid
  y, x = np.meshgrid(centres, centres, indexing="ij")
  patches = sine_encode(np.stack([y.ravel(), x.ravel()], axis=-1), width // 2)
  return np.concatenate([np.zeros((1, width), np.float32), patches]).astype(np.float32)
