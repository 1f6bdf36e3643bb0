"""The ViT's two initializations: timm's (ours) and PyTorch's default Linear init (the authors')."""

import numpy as np
import pytest
from flax import nnx
from scipy import stats

from grain_jax.config import models
from grain_jax.models.vit import VisionTransformer


def vit_params(init: str) -> dict:
  """{name: values} of a small ViT's patch embedding and first block's linear layers, with fan-ins."""
  cfg = models.default_model_config().image
  cfg.update(image_size=32, patch_size=16, width=192, depth=2, heads=3, init=init)
  with nnx.use_eager_sharding(False):
    vit = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  block = vit.blocks.view(0)
  hidden = int(cfg.width * cfg.mlp_ratio)
  return {
    "patch": (vit.patch_kernel[...], vit.patch_bias[...], 3 * 16 * 16),
    "qkv": (block.attn.qkv_kernel[...], block.attn.qkv_bias[...], cfg.width),
    "proj": (block.attn.out_kernel[...], block.attn.out_bias[...], cfg.width),
    "fc1": (block.mlp.fc1.kernel[...], block.mlp.fc1.bias[...], cfg.width),
    "fc2": (block.mlp.fc2.kernel[...], block.mlp.fc2.bias[...], hidden),
  }


@pytest.mark.parametrize("part", ["patch", "qkv", "proj", "fc1", "fc2"])
def test_pytorch_default_is_uniform_within_one_over_sqrt_fan_in(part):
  weight, bias, fan_in = vit_params("pytorch_default")[part]
  bound = fan_in**-0.5
  for name, values in (("weight", weight), ("bias", bias)):
    values = np.asarray(values).ravel()
    assert np.abs(values).max() <= bound, name
    # Kolmogorov-Smirnov against U(-bound, bound): the law PyTorch's nn.Linear and nn.Conv2d draw from.
    assert stats.kstest(values, stats.uniform(-bound, 2 * bound).cdf).pvalue > 1e-3, name
    np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.15 if name == "bias" else 0.02, err_msg=name)


def test_trunc_normal_has_zero_biases_and_a_patch_embedding_sqrt3_wider():
  ours, theirs = vit_params("trunc_normal"), vit_params("pytorch_default")
  for part in ("qkv", "proj", "fc1", "fc2"):
    weight, bias, _ = ours[part]
    assert not np.asarray(bias).any(), part
    np.testing.assert_allclose(np.asarray(weight).std(), 0.02, rtol=0.15, err_msg=part)
  ratio = np.asarray(ours["patch"][0]).std() / np.asarray(theirs["patch"][0]).std()
  np.testing.assert_allclose(ratio, np.sqrt(3), rtol=0.03)


@pytest.mark.extras
@pytest.mark.parametrize("part", ["patch", "fc2"])
def test_pytorch_default_draws_what_torch_draws(part):
  torch = pytest.importorskip("torch", reason="compares with torch's own init (requirements-export.txt)")
  weight, bias, fan_in = vit_params("pytorch_default")[part]
  torch.manual_seed(0)
  linear = torch.nn.Linear(fan_in, weight.size // fan_in)
  for name, ours, torchs in (("weight", weight, linear.weight), ("bias", bias, linear.bias)):
    assert stats.ks_2samp(np.asarray(ours).ravel(), torchs.detach().numpy().ravel()).pvalue > 1e-3, name
