"""The optimizer: AdamW (decay masked off 1-D parameters), warmup + cosine schedule, optional clipping."""

import optax
from flax import nnx


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_init` to `learning_rate`, then cosine to `end_learning_rate` at `num_steps`."""
  warmup = min(optim_config.warmup_steps, num_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=optim_config.warmup_init, peak_value=optim_config.learning_rate,
      warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
      end_value=optim_config.end_learning_rate)


def decays(name: str, variable: nnx.Variable) -> bool:
  """Whether weight decay applies to parameter `name`: matrices and embeddings yes; biases
  (packed q/k/v biases too), norm scales, logit_scale and other 1-D parameters no.

  Blocks stacked on a leading `layers` axis (see LayerStack) count by their per-layer rank.
  """
  if name in ("bias", "scale", "logit_scale") or name.endswith("_bias"):
    return False
  names = variable.get_metadata().get("out_sharding") or ()
  return variable.ndim - sum(axis == "layers" for axis in names) >= 2


def weight_decay_mask(params: nnx.State):
  """A pytree of bools shaped like `params` (as optax's `mask` argument wants)."""
  flat = [(path, decays(str(path[-1]), variable)) for path, variable in nnx.to_flat_state(params)]
  return nnx.from_flat_state(flat)


def make_optimizer(params: nnx.State, optim_config, num_steps: int) -> optax.GradientTransformation:
  """AdamW (+ clipping) for the model's `nnx.Param` state `params`."""
  schedule = learning_rate_schedule(optim_config, num_steps)
  mask = weight_decay_mask(params)
  adamw = optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                      weight_decay=optim_config.weight_decay, mask=mask)
  if optim_config.grad_clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), adamw)
  return adamw
