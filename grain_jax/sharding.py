"""Mesh construction and the logical-axis sharding policy.

Parameters and activations are annotated with logical axis names only: parameters with `embed`,
`mlp`, `heads`, ...; activations with `batch` and `activation_*` names (RESIDUAL, ATTENTION_HEADS,
MLP_HIDDEN), so that a rule for a weight dimension never shards an activation by accident.
`config.sharding_rules` maps each logical name to mesh axes (`data`, `fsdp`, `tensor`); this module is
the only place that applies that mapping.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical names of activations; weights use `embed`, `mlp`, `heads`, ... (see config.sharding_rules).
RESIDUAL = ("batch", "activation_length", "activation_embed")  # [B, T, D]
ATTENTION_HEADS = ("batch", "activation_length", "activation_heads", "activation_kv")  # [B, T, heads, kv]
MLP_HIDDEN = ("batch", "activation_length", "activation_mlp")  # [B, T, hidden]

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the `config.mesh` sizes (one may be -1) against `num_devices`.

  Raises:
    ValueError naming the `config.mesh.<axis>` fields when the sizes cannot tile the devices.
  """
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  fields = ", ".join(f"config.mesh.{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f'{fields}: sizes must be positive, with at most one -1 ("the rest")')
  known = int(np.prod([size for size in sizes if size != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"{fields}: {known} does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"{fields}: the mesh has {int(np.prod(sizes))} devices but {num_devices} are present")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A `data x fsdp x tensor` mesh over `devices` (default: all) with Auto axis types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axis_rules(rules: Rules):
  """Context manager making `rules` the active logical -> mesh axis mapping."""
  return flax_spmd.logical_axis_rules(tuple((name, _as_tuple_or_none(axes)) for name, axes in rules))


def _as_tuple_or_none(axes):
  if axes is None or isinstance(axes, str):
    return axes
  return tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array.

  Unknown logical names are replicated, as are names whose mesh axes an earlier dimension
  already took (e.g. `[embed, embed]` shards only the first).
  """
  table = dict(rules if rules is not None else flax_spmd.get_logical_axis_rules())
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(axis for axis in axes if axis not in used)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def batch_shards(mesh: jax.sharding.Mesh, rules: Rules | None = None) -> int:
  """How many ways the logical `batch` axis is split over `mesh` (devices holding distinct rows)."""
  return int(np.prod([mesh.shape[axis] for axis in _axes(logical_to_spec(("batch",), rules)[0])]))


def _sharding_applies() -> bool:
  """Whether a mesh and logical-axis rules are active (outside them, annotations are no-ops)."""
  return not jax.sharding.get_abstract_mesh().empty and bool(flax_spmd.get_logical_axis_rules())


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  if not _sharding_applies():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def split_ways(name: str) -> int:
  """Into how many parts the current mesh and rules split a dimension of logical `name` (1 outside a mesh)."""
  if not _sharding_applies():
    return 1
  mesh = jax.sharding.get_abstract_mesh()
  return int(np.prod([mesh.shape[axis] for axis in _axes(logical_to_spec((name,))[0])]))


def per_batch_shard(fn: Callable, num_shards: int, sharded: Sequence[jax.Array], replicated: Sequence = ()):
  """`fn` on each batch shard's own rows: `fn(*rows, *replicated)` for the rows `[B / num_shards, ...]`
  of each `sharded` array `[B, ...]`; its outputs (a pytree of scalars) stacked `[num_shards]`.

  Under a mesh the shards are the devices holding distinct rows and `fn` runs there inside
  `jax.shard_map`, manual over the batch's mesh axes: nothing it computes is gathered, which GSPMD,
  given a global computation that merely reshapes the batch into groups, does not promise. Outside a
  mesh (or with one shard) the batch is split into `num_shards` contiguous groups, the rows the
  shards would hold.

  Raises:
    ValueError when the mesh splits the batch into other than `num_shards` parts.
  """
  if _sharding_applies() and split_ways("batch") != num_shards:
    raise ValueError(f"the mesh splits the batch {split_ways('batch')} ways, not {num_shards}")
  if not _sharding_applies() or num_shards == 1:
    groups = [x.reshape(num_shards, -1, *x.shape[1:]) for x in sharded]
    return jax.vmap(lambda *rows: fn(*rows, *replicated))(*groups)
  batch_axes = _axes(logical_to_spec(("batch",))[0])
  rows = PartitionSpec(batch_axes)
  each = jax.shard_map(
    lambda *args: jax.tree.map(lambda x: x[None], fn(*args)),
    in_specs=(rows,) * len(sharded) + (PartitionSpec(),) * len(replicated),
    out_specs=rows,
    axis_names=set(batch_axes),
  )
  return each(*sharded, *replicated)


def gathered(weight: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`weight` (logical `names`) where a layer uses it: gathered over the batch's mesh axes (the FSDP
  all-gather), tensor-parallel axes kept. Its gradient is constrained back to the weight's own
  layout, so the backward pass reduce-scatters it instead of all-reducing the full gradient."""
  if not _sharding_applies():
    return weight
  stored = logical_to_spec(names)
  batch_axes = set(_axes(logical_to_spec(("batch",))[0]))
  used = PartitionSpec(*(tuple(a for a in _axes(entry) if a not in batch_axes) or None for entry in stored))

  @jax.custom_vjp
  def gather(w):
    return jax.lax.with_sharding_constraint(w, used)

  def gather_forward(w):
    return gather(w), None

  def reduce_scatter(_, gradient):
    return (jax.lax.with_sharding_constraint(gradient, stored),)

  gather.defvjp(gather_forward, reduce_scatter)
  return gather(weight)


def looked_up(table: jax.Array, ids: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Rows of `table [V, D]` (logical `names`) at `ids [B, ...]` (B on the batch axes) -> `[B, ..., D]`.

  The gradient moves looked-up rows rather than tables: each device's rows go (one all-to-all) to
  the devices that hold their slice of D, which add them into their own shard, in float32; only the
  batch axes the table is not split over then reduce it. Left to XLA, every device builds a dense
  `[V, D]` gradient of its own rows and all of them are summed over the whole mesh (for the B/16
  text tower a 96.5 MiB float32 all-reduce per step).
  """
  if not _sharding_applies():
    return jnp.take(table, ids, axis=0)
  stored = logical_to_spec(names)
  width = set(_axes(stored[1]))
  rows = tuple(axis for axis in _axes(logical_to_spec(("batch",))[0]) if axis not in width)
  rows = None if not rows else rows[0] if len(rows) == 1 else rows
  id_spec = PartitionSpec(rows, *[None] * (ids.ndim - 1))
  row_spec = PartitionSpec(rows, *[None] * (ids.ndim - 1), stored[1])
  shape, dtype = table.shape, table.dtype

  @jax.custom_vjp
  def lookup(t, i):
    return jnp.take(t, i, axis=0)

  def lookup_forward(t, i):
    return lookup(t, i), i

  def add_rows(i, gradient):
    i = jax.lax.with_sharding_constraint(i, id_spec)
    gradient = jax.lax.with_sharding_constraint(gradient.astype(jnp.float32), row_spec)
    total = jax.lax.with_sharding_constraint(jnp.zeros(shape, jnp.float32).at[i].add(gradient), stored)
    return total.astype(dtype), np.zeros(i.shape, jax.dtypes.float0)

  lookup.defvjp(lookup_forward, add_rows)
  return lookup(table, ids)


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
  """NamedShardings for an `nnx.State` whose Variables carry `out_sharding` logical names."""

  def sharding_of(variable):
    names = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(names, rules))

  return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules) -> nnx.Module:
  """Builds a module with every parameter created directly in its sharded layout.

  `build()` runs under `jax.jit` with output shardings from the rules, so no host or single
  device ever holds a full copy of the parameters. It must create its Variables without eager
  sharding (as `grain_jax.models.grain.build_model` does).
  """
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = state_shardings(abstract_state, mesh, rules)

  def init_state():
    return nnx.split(build())[1]

  with jax.set_mesh(mesh), axis_rules(rules):
    state = jax.jit(init_state, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def create_abstract(build: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules) -> nnx.Module:
  """Like `create_sharded`, but every parameter is a `jax.ShapeDtypeStruct` carrying its sharding.

  Only the small non-parameter state (RNG keys and counters) is materialized: a jitted step
  closes over it. The parameters' initializers are dead code in that jit and never run.
  """
  graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
  with jax.set_mesh(_executable_mesh(mesh)), axis_rules(rules):
    rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
  return nnx.merge(graphdef, abstract_params(params, mesh, rules), rest)


def _executable_mesh(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """`mesh`, or a one-device mesh of this host when `mesh`'s devices can only compile (a deviceless
  TPU topology, `jax.experimental.topologies`); the step embeds what runs there as constants."""
  if set(mesh.devices.flat) <= set(jax.devices()):
    return mesh
  return jax.make_mesh(
    (1,) * len(mesh.axis_names),
    mesh.axis_names,
    devices=jax.devices()[:1],
    axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names),
  )


def abstract_params(params: nnx.State, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.State:
  """`params` (arrays or shapes) as `jax.ShapeDtypeStruct`s carrying the shardings `rules` give them."""
  return jax.tree.map(
    lambda variable, sharding: variable.replace(
      jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=sharding)
    ),
    params,
    state_shardings(params, mesh, rules),
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
