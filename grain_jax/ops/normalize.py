"""L2 normalization of embeddings, the one used by the losses, evaluation and the zero-shot class texts."""

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """`x` (any float dtype, or a numpy array) in float32, scaled to unit L2 norm along `axis`.

  The squared norm is clamped to 1e-12 (a norm to 1e-6, as torch's `F.normalize(eps=1e-6)`): a zero
  vector stays zero, and its gradient is finite.
  """
  x = jnp.asarray(x, jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))
