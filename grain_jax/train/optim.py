"""The optimizer: AdamW (decay masked off some parameters), warmup + cosine schedule, optional clipping."""

import optax
from flax import nnx

from grain_jax.torch_format import layout

# config.optim.weight_decay_exempt: which parameters weight decay leaves alone.
DECAY_RULES = ("rank_below_2", "authors_name_rule")
# The authors' rule for their decoder's parameters (their `optim_policy`): names containing one of these.
AUTHORS_DECODER_EXEMPT = (".ln_", ".bn", ".bias", ".logit_scale")
# ... and for their backbone's: 0-d and 1-d parameters, and names containing one of these.
AUTHORS_BACKBONE_EXEMPT = ("bias", "ln", "bn")


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup from `warmup_init` to `learning_rate`, then cosine to `end_learning_rate` at `num_steps`."""
  warmup = min(optim_config.warmup_steps, num_steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=optim_config.warmup_init,
    peak_value=optim_config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(num_steps, warmup + 1),
    end_value=optim_config.end_learning_rate,
  )


def decays(name: str, variable: nnx.Variable) -> bool:
  """Our rule ("rank_below_2"): whether weight decay applies to parameter `name`: matrices and
  embeddings yes; biases (packed q/k/v biases too), norm scales, logit_scale and other 1-D parameters no.

  Blocks stacked on a leading `layers` axis (see LayerStack) count by their per-layer rank.
  """
  if name in ("bias", "scale", "logit_scale") or name.endswith("_bias"):
    return False
  names = variable.get_metadata().get("out_sharding") or ()
  return variable.ndim - sum(axis == "layers" for axis in names) >= 2


def authors_decays(state_dict: str, key: str, torch_ndim: int) -> bool:
  """The authors' rule ("authors_name_rule") on a parameter's name in the PyTorch checkpoint they
  train (`key` in `state_dict`, layout.BACKBONE or layout.DECODER; DDP's `module.` prefix added) and
  its PyTorch rank. Their decoder's LayerNorm weights and attention `in_proj_bias` match none of the
  decoder's substrings, so they are decayed."""
  name = layout.MODULE_PREFIX + key
  if state_dict == layout.DECODER:
    return not any(part in name for part in AUTHORS_DECODER_EXEMPT)
  return torch_ndim >= 2 and not any(part in name for part in AUTHORS_BACKBONE_EXEMPT)


def weight_decay_mask(params: nnx.State, rule: str = "rank_below_2", model_config=None):
  """A pytree of bools shaped like `params` (as optax's `mask` argument wants): True = decayed.

  `rule` "authors_name_rule" needs `model_config` (`config.model`) to name each parameter as the
  export does (`layout.reference_layout`); a stacked parameter is named by its first layer's key.
  """
  flat = nnx.to_flat_state(params)
  if rule == "rank_below_2":
    return nnx.from_flat_state([(path, decays(str(path[-1]), variable)) for path, variable in flat])
  if rule != "authors_name_rule":
    raise ValueError(f"config.optim.weight_decay_exempt={rule!r} must be one of {DECAY_RULES}")
  torch_shapes = layout.torch_shapes({path: variable.shape for path, variable in flat}, model_config)
  entries = {entry.path: entry for entry in layout.reference_layout(model_config)}

  def authors(path):
    entry = entries[path]
    key = entry.key.format(layer=0)
    return authors_decays(entry.state_dict, key, len(torch_shapes[entry.state_dict, key]))

  return nnx.from_flat_state([(path, authors(path)) for path, _ in flat])


def make_optimizer(params: nnx.State, optim_config, num_steps: int, model_config=None) -> optax.GradientTransformation:
  """AdamW (+ clipping) for the model's `nnx.Param` state `params`; `model_config` (`config.model`)
  names the parameters for `optim_config.weight_decay_exempt` "authors_name_rule"."""
  schedule = learning_rate_schedule(optim_config, num_steps)
  mask = weight_decay_mask(params, optim_config.weight_decay_exempt, model_config)
  adamw = optax.adamw(
    schedule,
    b1=optim_config.b1,
    b2=optim_config.b2,
    eps=optim_config.eps,
    weight_decay=optim_config.weight_decay,
    mask=mask,
  )
  if optim_config.grad_clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(optim_config.grad_clip_norm), adamw)
  return adamw
