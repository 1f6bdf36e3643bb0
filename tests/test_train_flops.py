"""The jaxpr matmul-FLOP counter: hand counts, scans, conds, gradients, and scanned vs unrolled models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from grain_jax import sharding
from grain_jax.bench.step import synthetic_batch
from grain_jax.config.base import get_config
from grain_jax.data import text_packing
from grain_jax.models.grain import build_model
from grain_jax.train import trainer
from grain_jax.train.flops import dot_general_flops, matmul_flops


@pytest.mark.parametrize("seed", range(5))
def test_batched_einsum_counts_2bmkn(seed):
  b, m, k, n = np.random.default_rng(seed).integers(1, 9, 4)
  lhs, rhs = jnp.ones((b, m, k)), jnp.ones((b, k, n))
  assert matmul_flops(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y), lhs, rhs) == 2 * b * m * k * n


def test_dot_general_with_several_contracted_and_free_dims():
  # [2, 3, 4, 5] x [4, 5, 6, 7] contracting (2, 3) with (0, 1): 2*3 rows, 6*7 columns, 4*5 sums.
  assert dot_general_flops((2, 3, 4, 5), (4, 5, 6, 7), (((2, 3), (0, 1)), ((), ()))) == 2 * 6 * 42 * 20


def test_scan_body_counts_length_times_and_gradient_three_times():
  def repeated_square(x):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), x, None, length=3)[0].sum()

  one_matmul = 2 * 4 * 4 * 4
  assert matmul_flops(repeated_square, jnp.ones((4, 4))) == 3 * one_matmul
  # Backward: two matmuls per forward matmul (one for each operand's cotangent).
  assert matmul_flops(jax.grad(repeated_square), jnp.ones((4, 4))) == 9 * one_matmul


def test_cond_counts_its_costliest_branch():
  def branchy(flag, x):
    return jax.lax.cond(flag, lambda v: v @ v @ v, lambda v: v @ v, x)

  assert matmul_flops(branchy, True, jnp.ones((3, 3))) == 2 * (2 * 27)


def test_scanned_and_unrolled_models_count_the_same():
  """The reason for the counter: XLA's own count sees one iteration of a scanned stack."""

  def gradient_flops(scan_layers: bool) -> int:
    config = get_config("tiny").model
    config.scan_layers = scan_layers
    model = build_model(config, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, images, ids):
      merged = nnx.merge(graphdef, params, rest, copy=True)
      outputs = merged.encode_image(images)
      return jnp.sum(outputs.global_embed) + jnp.sum(outputs.region_embed) + jnp.sum(merged.encode_text(ids))

    return matmul_flops(jax.grad(loss), params, jnp.zeros((2, 32, 32, 3)), jnp.ones((3, 8), jnp.int32))

  unrolled = gradient_flops(False)
  assert unrolled > 0 and gradient_flops(True) == unrolled


def test_the_training_step_s_model_flops_leave_out_remat_s_recomputation():
  """MFU counts model FLOPs: remat's second forward pass is work the model does not need."""

  def counts(remat: bool) -> tuple[int, int]:
    config = get_config("tiny")
    config.model.remat = remat
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    batch = text_packing.pack_batch(synthetic_batch(config, 2), 1, config.model.text.context_length)
    with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
      training = trainer.build_training(config, mesh, abstract=True)
      return (
        matmul_flops(training.flops_fn, training.state, batch),
        matmul_flops(training.step_fn, training.state, batch),
      )

  model_flops, executed = counts(remat=False)
  remat_model_flops, remat_executed = counts(remat=True)
  assert model_flops == executed and remat_executed > executed
  assert remat_model_flops == model_flops
