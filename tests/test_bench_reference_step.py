"""The PyTorch rebuild of the reference's step computes our objective and does the reference's work."""

import jax
import numpy as np
import pytest
from flax import nnx

from grain_jax import sharding
from grain_jax.bench import step
from grain_jax.config import load_config
from grain_jax.data import text_packing
from grain_jax.models.grain import build_model
from grain_jax.torch_format import layout, param_tree
from grain_jax.train.step import batch_loss

pytestmark = pytest.mark.extras
torch = pytest.importorskip("torch", reason="the reference step needs torch (pip install -r requirements-export.txt)")
reference_step = pytest.importorskip("grain_jax.bench._reference_step")

BATCH = 4


@pytest.fixture(scope="module")
def setup():
  """The tiny config, its JAX model (eval mode), the model in the reference's names, and a batch
  with some box slots invalid."""
  config = load_config("configs/base.py:tiny")
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  model = sharding.create_sharded(lambda: build_model(config.model, 0), mesh, config.sharding_rules)
  model.eval()
  state_dicts = layout.to_reference(
    param_tree.flatten(nnx.state(model, nnx.Param)), config.model, fetch=param_tree.to_host
  )
  batch = step.synthetic_batch(config, BATCH, seed=3)
  batch["box_valid"][0, 3:] = False
  batch["box_valid"][2, 1:] = False
  return config, model, state_dicts, batch


def test_objective_equals_ours_with_dropout_off(setup):
  config, model, state_dicts, batch = setup
  packed = text_packing.pack_batch(batch, 1, config.model.text.context_length)
  ours, metrics = nnx.jit(lambda m, b: batch_loss(m, b, config, 1))(model, packed)
  reference = reference_step.ReferenceStep(config, state_dicts)
  reference.train(False)
  with torch.no_grad():
    theirs, parts = reference.loss(batch)
  np.testing.assert_allclose(theirs.item(), float(ours), rtol=1e-5, atol=1e-5)
  for name in ("loss_ic", "loss_l1", "loss_giou", "loss_rd"):
    np.testing.assert_allclose(parts[name], float(metrics[name]), rtol=1e-5, atol=1e-5, err_msg=name)


def test_step_matches_twice_per_layer_on_the_host_and_updates(setup, monkeypatch):
  config, _, state_dicts, batch = setup
  solves, solve = [], reference_step.linear_sum_assignment
  monkeypatch.setattr(reference_step, "linear_sum_assignment", lambda cost: solves.append(cost.shape) or solve(cost))
  reference = reference_step.ReferenceStep(config, state_dicts)
  before = {name: p.detach().clone() for name, p in reference.decoder.named_parameters()}
  loss = reference(batch)
  assert np.isfinite(loss)
  assert len(solves) == reference_step.MATCHINGS_PER_LAYER * config.model.decoder.depth * BATCH
  assert sorted({shape[1] for shape in solves}) == [1, 3, 5]  # only valid targets are matched
  moved = [name for name, p in reference.decoder.named_parameters() if not torch.equal(p, before[name])]
  assert "bbox_embed.layers.0.weight" in moved and "query_embed.weight" in moved
  assert 0 <= reference.backbone.logit_scale.item() <= np.log(100)
