"""The train step: model -> matching -> losses -> gradients -> AdamW update, as one pure function.

`jax.jit` of `make_train_step(...)` with in/out shardings is the whole distributed step: the
batch arrives sharded over the mesh's batch axes, GSPMD gathers what the global-batch losses
need. A step whose loss or gradients are not finite leaves the state unchanged and is counted.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from grain_jax import losses
from grain_jax.models.text import texts_at


class TrainState(NamedTuple):
  """Everything a checkpoint must hold to continue training exactly.

  step: int32 scalar, the number of steps taken (skipped ones included).
  params: the model's nnx.Param state.
  opt_state: the optax state.
  skipped_steps: int32 scalar, steps whose loss or gradients were not finite.
  """

  step: jax.Array
  params: nnx.State
  opt_state: Any
  skipped_steps: jax.Array


def batch_loss(model, batch: dict[str, jax.Array], config, batch_shards: int):
  """The GRAIN objective of one batch; `(loss, metrics)`.

  Captions and descriptions arrive packed (`grain_jax.data.text_packing`, one group per batch
  shard) and run through the text tower in one pass.
  """
  outputs = model.encode_image(batch["image"])
  texts = model.encode_packed_text(
    batch["text_tokens"], batch["text_segments"], batch["text_positions"], batch["text_eot"]
  )
  regions = {}
  if outputs.region_embed is not None:
    regions = dict(
      region_embed=outputs.region_embed,
      layer_boxes=outputs.boxes,
      desc_embed=texts_at(texts, batch["desc_slot"], batch_shards),
      target_boxes=batch["boxes"],
      box_valid=batch["box_valid"],
      desc_text_id=batch["desc_text_id"],
      batch_shards=batch_shards,
    )
  return losses.grain_loss(
    image_embed=outputs.global_embed,
    caption_embed=texts_at(texts, batch["caption_slot"], batch_shards),
    logit_scale=model.logit_scale[...],
    matching_config=config.matching,
    loss_config=config.loss,
    **regions,
  )


def split_micro_batches(batch: dict[str, jax.Array], num_micro: int, batch_shards: int) -> dict[str, jax.Array]:
  """`[B, ...]` -> `[num_micro, B / num_micro, ...]`, each micro-batch taking rows from every shard.

  Row `r` of shard `s` lives on that shard's devices; interleaving keeps every micro-batch spread
  over all devices instead of gathering one shard's rows onto the others.
  """

  def split(x):
    per_shard = x.reshape(batch_shards, num_micro, -1, *x.shape[1:])
    return jnp.swapaxes(per_shard, 0, 1).reshape(num_micro, -1, *x.shape[1:])

  return jax.tree.map(split, batch)


def make_train_step(
  graphdef: nnx.GraphDef,
  rest: nnx.State,
  tx: optax.GradientTransformation,
  config,
  batch_shards: int,
  learning_rate: optax.Schedule,
) -> Callable:
  """`train_step(state, batch) -> (state, metrics)` for a model split as `(graphdef, params, rest)`.

  Dropout keys are derived from `config.seed` and the step, so a resumed run draws the same
  masks as an uninterrupted one.
  """
  num_micro = config.train.grad_accum_steps
  dropout_seed = jax.random.key(config.seed + 1)

  def loss_fn(params, batch, dropout_key):
    model = nnx.merge(graphdef, params, rest, copy=True)
    nnx.reseed(model, dropout=dropout_key, policy="match_shape")
    return batch_loss(model, batch, config, batch_shards)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    micro_batches = split_micro_batches(batch, num_micro, batch_shards)
    step_key = jax.random.fold_in(dropout_seed, state.step)

    def accumulate(totals, index_and_batch):
      index, micro_batch = index_and_batch
      (loss, metrics), grads = grad_fn(state.params, micro_batch, jax.random.fold_in(step_key, index))
      metrics = dict(metrics, loss=loss)
      return jax.tree.map(jnp.add, totals, (grads, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_shapes = jax.eval_shape(lambda: loss_fn(state.params, first, step_key))[1]
    zeros = (
      jax.tree.map(jnp.zeros_like, state.params),
      {name: jnp.zeros((), jnp.float32) for name in [*metric_shapes, "loss"]},
    )
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), micro_batches))
    grads, metrics = jax.tree.map(lambda x: x / num_micro, (grads, metrics))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    model = nnx.merge(graphdef, optax.apply_updates(state.params, updates), rest, copy=True)
    model.clamp_logit_scale()
    params = nnx.state(model, nnx.Param)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
      step=state.step + 1,
      params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    # optax counts applied updates only, so skipped steps do not advance the schedule.
    metrics.update(
      grad_norm=grad_norm,
      learning_rate=learning_rate(state.step - state.skipped_steps),
      temperature=jnp.exp(new_state.params["logit_scale"][...]),
      skipped=(~finite).astype(jnp.float32),
    )
    return new_state, metrics

  return train_step
