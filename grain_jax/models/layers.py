"""Building blocks shared by the three towers: attention, MLP, layer norm, and layer stacks.

Every parameter carries logical axis names (`out_sharding` metadata); `grain_jax.sharding`
maps them to mesh axes with the rules in the config. Layouts follow the PyTorch reference closely
enough that export is a transpose/reshape: attention keeps q, k, v packed (PyTorch `in_proj`
order) in one `[embed, 3, heads, kv]` kernel.
"""

import dataclasses
from typing import Callable

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from grain_jax.sharding import ATTENTION_HEADS, MLP_HIDDEN, constrain, gathered

Initializer = jax.nn.initializers.Initializer

normal = jax.nn.initializers.normal
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones
trunc_normal_02 = jax.nn.initializers.truncated_normal(0.02)

# Under jax.checkpoint an activation's backward pass recomputes it from its input instead of
# reading back the erf / sigmoid intermediates XLA would otherwise store for every layer
# (`[layers, tokens, 4 * width]` each): less memory traffic, same values. About 8% of the `small`
# train step on CPU.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": jax.checkpoint(lambda x: jax.nn.gelu(x, approximate=False)),
  "quick_gelu": jax.checkpoint(lambda x: x * jax.nn.sigmoid(1.702 * x)),
  "relu": jax.nn.relu,
}


def torch_linear_init(fan_in: int) -> Initializer:
  """PyTorch's default `nn.Linear` init for weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = fan_in**-0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], names: tuple) -> nnx.Param:
  """A float32 parameter initialized by `init`, annotated with logical axis `names`."""
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


def layer_norm(width: int, eps: float, dtype, rngs: nnx.Rngs, name: str = "embed") -> nnx.LayerNorm:
  """LayerNorm with statistics in float32 and exact (two-pass) variance, as PyTorch computes it."""
  return nnx.LayerNorm(
    width,
    epsilon=eps,
    dtype=dtype,
    use_fast_variance=False,
    rngs=rngs,
    scale_metadata=dict(out_sharding=(name,)),
    bias_metadata=dict(out_sharding=(name,)),
  )


@dataclasses.dataclass(frozen=True)
class GatheredDotGeneral:
  """`jax.lax.dot_general` with its kernel (logical `names`) gathered over the FSDP axes first."""

  names: tuple[str, ...]

  def __call__(self, inputs, kernel, dimension_numbers, **kwargs):
    return jax.lax.dot_general(inputs, gathered(kernel, self.names), dimension_numbers, **kwargs)


def dense(
  in_features: int,
  out_features: int,
  names: tuple[str, str],
  dtype,
  rngs: nnx.Rngs,
  kernel_init: Initializer,
  bias_init: Initializer | None = zeros,
) -> nnx.Linear:
  """A Linear layer; `bias_init=None` drops the bias. Its kernel, cast to `dtype`, is gathered over
  the FSDP axes where it is used (see `gathered`)."""
  return nnx.Linear(
    in_features,
    out_features,
    use_bias=bias_init is not None,
    dtype=dtype,
    rngs=rngs,
    kernel_init=kernel_init,
    bias_init=bias_init or zeros,
    dot_general=GatheredDotGeneral(names),
    kernel_metadata=dict(out_sharding=names),
    bias_metadata=dict(out_sharding=names[1:]),
  )


class Attention(nnx.Module):
  """Multi-head attention; q, k, v projections packed in one `[embed, 3, heads, kv]` kernel.

  Self-attention passes one input; the decoder passes different q / k / v inputs (positional
  query embeddings go into q and k but not v). Softmax runs in float32.
  """

  def __init__(
    self,
    width: int,
    heads: int,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    qkv_init: Initializer,
    out_init: Initializer,
    qkv_bias_init: Initializer = zeros,
    out_bias_init: Initializer = zeros,
    qk_norm: bool = False,
    norm_eps: float = 1e-6,
    dropout: float = 0.0,
  ):
    head_dim = width // heads
    self.heads, self.head_dim, self.dtype = heads, head_dim, dtype
    self.qkv_kernel = param(rngs, qkv_init, (width, 3, heads, head_dim), ("embed", "qkv", "heads", "kv"))
    self.qkv_bias = param(rngs, qkv_bias_init, (3, heads, head_dim), ("qkv", "heads", "kv"))
    self.out_kernel = param(rngs, out_init, (heads, head_dim, width), ("heads", "kv", "embed"))
    self.out_bias = param(rngs, out_bias_init, (width,), ("embed",))
    self.q_norm = layer_norm(head_dim, norm_eps, dtype, rngs, "kv") if qk_norm else None
    self.k_norm = layer_norm(head_dim, norm_eps, dtype, rngs, "kv") if qk_norm else None
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def _project(self, x: jax.Array, which: slice) -> jax.Array:
    """`[B, T, D]` -> `[B, T, n, heads, head_dim]` for the q/k/v entries selected by `which`."""
    kernel = gathered(self.qkv_kernel[:, which].astype(self.dtype), ("embed", "qkv", "heads", "kv"))
    return jnp.einsum("btd,dnhk->btnhk", x.astype(self.dtype), kernel) + self.qkv_bias[which].astype(self.dtype)

  def _softmax(self, q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`q [B, Tq, heads, kv]`, `k [B, Tk, heads, kv]` -> attention weights `[B, heads, Tq, Tk]`, float32."""
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k, preferred_element_type=jnp.float32)
    logits = logits * self.head_dim**-0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)

  def weights(self, query_input: jax.Array, key_input: jax.Array | None = None) -> jax.Array:
    """The attention weights `[B, heads, Tq, Tk]` (float32, each row sums to 1) of `__call__` with the
    same inputs, before dropout (what attention maps show)."""
    q = self._project(query_input, slice(0, 1))[:, :, 0]
    k = self._project(query_input if key_input is None else key_input, slice(1, 2))[:, :, 0]
    return self._softmax(q, k, None)

  def __call__(
    self,
    query_input: jax.Array,
    key_input: jax.Array | None = None,
    value_input: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Attends `[B, Tq, D]` queries over `[B, Tk, D]` keys/values.

    Args:
      query_input: `[B, Tq, D]`; alone, it is also the key and value input (self-attention).
      key_input, value_input: `[B, Tk, D]` each, or both None.
      mask: boolean, broadcastable to `[B, heads, Tq, Tk]`; True = may attend.

    Returns:
      `[B, Tq, D]`.
    """
    if key_input is None:
      q, k, v = einops.rearrange(self._project(query_input, slice(0, 3)), "b t n h k -> n b t h k")
    else:
      q = self._project(query_input, slice(0, 1))[:, :, 0]
      if value_input is key_input:
        k, v = einops.rearrange(self._project(key_input, slice(1, 3)), "b t n h k -> n b t h k")
      else:
        k = self._project(key_input, slice(1, 2))[:, :, 0]
        v = self._project(value_input, slice(2, 3))[:, :, 0]
    q, k, v = (constrain(t, ATTENTION_HEADS) for t in (q, k, v))
    weights = self.dropout(self._softmax(q, k, mask)).astype(self.dtype)
    attended = jnp.einsum("bhqt,bthk->bqhk", weights, v)
    out_kernel = gathered(self.out_kernel.astype(self.dtype), ("heads", "kv", "embed"))
    return jnp.einsum("bqhk,hkd->bqd", attended, out_kernel) + self.out_bias.astype(self.dtype)


class Mlp(nnx.Module):
  """Two-layer MLP `[B, T, D] -> [B, T, hidden] -> [B, T, D]`."""

  def __init__(
    self,
    width: int,
    hidden: int,
    activation: str,
    *,
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    fc1_init: Initializer,
    fc2_init: Initializer,
    fc1_bias_init: Initializer = zeros,
    fc2_bias_init: Initializer = zeros,
    dropout: float = 0.0,
  ):
    self.fc1 = dense(width, hidden, ("embed", "mlp"), dtype, rngs, fc1_init, fc1_bias_init)
    self.fc2 = dense(hidden, width, ("mlp", "embed"), dtype, rngs, fc2_init, fc2_bias_init)
    self.activation = ACTIVATIONS[activation]
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = constrain(self.fc1(x), MLP_HIDDEN)
    return self.fc2(self.dropout(self.activation(hidden)))


class LayerStack(nnx.Module):
  """`depth` identical blocks applied in sequence with `nnx.scan` over parameters stacked on a
  leading `layers` axis.

  One parameter layout and one set of initial values whatever the options: `scan=True` compiles
  one block and loops over it (fast compiles at depth); `scan=False` unrolls the loop (what a
  Python loop over blocks would compile to). `remat=True` recomputes each block's activations in
  the backward pass. Blocks are called as `block(x, *extra)` and return the new `x`; `scan` runs
  any per-block step that carries more than `x` (the decoder's box refinement).
  """

  def __init__(
    self,
    make_block: Callable[[nnx.Rngs], nnx.Module],
    depth: int,
    *,
    rngs: nnx.Rngs,
    scan: bool = False,
    remat: bool = False,
  ):
    self.scanned, self.remat, self.depth = scan, remat, depth

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(block_rngs: nnx.Rngs) -> nnx.Module:
      return make_block(block_rngs)

    self.blocks = create(rngs)

  def view(self, index: int | slice) -> nnx.Module:
    """The blocks at `index` of the `layers` axis as a module of their own: an int gives one block
    (negative counts from the end), a slice a stack on a leading axis.

    A view for reading: parameters come from the stack (gradients reach them), but state the view
    updates when called (dropout's RNG counts) does not go back to the stack.
    """
    graphdef, state = nnx.split(self.blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))

  def scan(self, step: Callable, carry, *, upto: int | None = None):
    """Runs `step(block, carry) -> (carry, output)` through the blocks in order (the first `upto`
    only, when given; through a `view`); returns the final carry and the outputs stacked on a
    leading `[depth]` (or `[upto]`) axis (None outputs stay None)."""
    if self.remat:
      step = nnx.remat(step)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=not self.scanned)
    def run(carry, block):
      return step(block, carry)

    return run(carry, self.blocks if upto is None else self.view(slice(0, upto)))

  def __call__(self, x: jax.Array, *extra, keep_intermediates: bool = False, upto: int | None = None) -> jax.Array:
    """Returns the final `x` (after the first `upto` blocks when given), or with
    `keep_intermediates` every block's output `[depth, *x.shape]`."""

    def step(block, x):
      x = block(x, *extra)
      return x, (x if keep_intermediates else None)

    x, intermediates = self.scan(step, x, upto=upto)
    return intermediates if keep_intermediates else x
