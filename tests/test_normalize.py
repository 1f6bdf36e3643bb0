"""`ops.normalize.l2_normalize`, the one L2 normalization (losses, evaluation, class texts), against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grain_jax.ops.normalize import l2_normalize


@pytest.mark.parametrize("axis", [-1, 0])
def test_vectors_become_unit_vectors_of_the_same_direction(axis):
  x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) * 30
  expected = x / np.linalg.norm(x, axis=axis, keepdims=True)
  np.testing.assert_allclose(l2_normalize(jnp.asarray(x), axis=axis), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(l2_normalize(x, axis=axis), expected, rtol=1e-5, atol=1e-6)  # numpy in


def test_bfloat16_in_float32_out():
  x = jnp.asarray([[3.0, 4.0]], jnp.bfloat16)
  assert l2_normalize(x).dtype == jnp.float32
  np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8]], rtol=1e-6)


def test_a_zero_vector_stays_zero_with_a_finite_gradient():
  x = jnp.zeros((2, 4)).at[1].set(1.0)
  np.testing.assert_array_equal(l2_normalize(x)[0], 0.0)
  gradient = jax.grad(lambda v: l2_normalize(v).sum())(x)
  assert np.isfinite(gradient).all()


def test_tiny_norms_are_clamped_like_torchs_eps():
  """Norms below 1e-6 divide by 1e-6 (torch.nn.functional.normalize(eps=1e-6), the reference's step)."""
  x = jnp.asarray([[1e-8, 0.0]])
  np.testing.assert_allclose(l2_normalize(x), [[1e-2, 0.0]], rtol=1e-5)
