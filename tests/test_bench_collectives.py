"""The collectives report: HLO parsing against a compiled XLA:CPU program whose collectives are
known, TPU HLO forms (reduce-scatter fusions, mesh replica groups, loop bounds in the condition),
and the per-op summary."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grain_jax.bench import _hlo, collectives

LOOP_STEPS = 3


def program(x, w):
  """`x [8, 16]` and `w [16, 32]`, rows sharded: gathers `w`'s running sum in a 3-step loop, sums `x`."""

  def body(_, carry):
    full = jax.lax.with_sharding_constraint(carry, P())  # an all-gather in every iteration
    return jax.lax.with_sharding_constraint(jnp.cumsum(full, axis=0), P("d"))

  out = jax.lax.fori_loop(0, LOOP_STEPS, body, w)
  return out, jnp.sum(x)  # an all-reduce


def compiled_hlo() -> str:
  mesh = jax.make_mesh((4,), ("d",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
  rows = NamedSharding(mesh, P("d"))
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=rows)
  w = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=rows)
  with jax.set_mesh(mesh):
    return jax.jit(program).lower(x, w).compile().as_text()


def test_collectives_of_a_compiled_program_have_their_tensor_count_and_source():
  found = _hlo.collectives(compiled_hlo(), source_root="tests/")
  weight = [c for c in found if c.op == "all-gather" and c.tensor == "f32[16,32]"]
  assert len(weight) == 1 and weight[0].executions == LOOP_STEPS
  assert weight[0].tensor_bytes == 16 * 32 * np.dtype(np.float32).itemsize
  assert weight[0].group_size == 4 and not weight[0].backward
  assert weight[0].source.startswith("test_bench_collectives.py:") and weight[0].source.endswith("body")
  assert weight[0].sent_bytes == weight[0].tensor_bytes * 3 / 4
  assert any(c.op == "all-reduce" and c.executions == 1 and c.tensor_bytes == 4 for c in found)


TPU_HLO = """\
HloModule jit_step, num_partitions=4

%all-reduce-scatter.1 (input.1: f32[64,8]) -> f32[16,8] {
  %input.1 = f32[64,8]{1,0} parameter(0)
  %all-reduce.7 = f32[64,8]{1,0} all-reduce(%input.1), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %dynamic-slice.2 = f32[16,8]{1,0} dynamic-slice(%all-reduce.7, %c, %c), dynamic_slice_sizes={16,8}
}

%cond (p.1: (s32[], bf16[16,8])) -> pred[] {
  %p.1 = (s32[], bf16[16,8]) parameter(0)
  %bound = s32[] constant(12)
  %i = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i, %bound), direction=LT
}

%body (p.2: (s32[], bf16[16,8])) -> (s32[], bf16[16,8]) {
  %p.2 = (s32[], bf16[16,8]) parameter(0)
  %shard = bf16[16,8]{1,0} get-tuple-element(%p.2), index=1
  %all-gather-start.1 = (bf16[16,8]{1,0}, bf16[64,8]{1,0}) all-gather-start(%shard), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}, metadata={op_name="jit(step)/while/body/dot_general" stack_frame_id=1}
  %all-gather-done.1 = bf16[64,8]{1,0} all-gather-done(%all-gather-start.1)
  %grad = f32[64,8]{1,0} convert(%all-gather-done.1)
  %fusion.3 = f32[16,8]{1,0} fusion(%grad), kind=kCustom, calls=%all-reduce-scatter.1, metadata={op_name="jit(step)/while/body/transpose(jvp(dot_general))" stack_frame_id=2}
  ROOT %t = (s32[], bf16[16,8]) tuple(%i, %shard)
}

ENTRY %main (a: bf16[16,8]) -> bf16[16,8] {
  %a = bf16[16,8]{1,0} parameter(0)
  %w = (s32[], bf16[16,8]) while(%init), condition=%cond, body=%body
  %cp = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%small), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  ROOT %r = bf16[16,8]{1,0} get-tuple-element(%w), index=1
}

FileNames
1 "/src/grain_jax/models/layers.py"

FunctionNames
1 "Mlp.__call__"
2 "TextBlock.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=130 end_line=130 column=1 end_column=1}
2 {file_name_id=1 function_name_id=2 line=30 end_line=30 column=1 end_column=1}

StackFrames
1 {file_location_id=1 parent_frame_id=2}
2 {file_location_id=2 parent_frame_id=1}
"""


def test_tpu_forms_loop_bounds_and_innermost_project_frame():
  found = {c.op: c for c in _hlo.collectives(TPU_HLO)}
  gather, scatter, permute = found["all-gather"], found["reduce-scatter"], found["collective-permute"]
  assert (gather.tensor, gather.tensor_bytes, gather.group_size, gather.executions) == ("bf16[64,8]", 64 * 8 * 2, 4, 12)
  assert gather.source == "models/layers.py:130 Mlp.__call__" and not gather.backward
  assert (scatter.tensor, scatter.tensor_bytes, scatter.executions, scatter.backward) == (
    "f32[64,8]",
    64 * 8 * 4,
    12,
    True,
  )
  assert scatter.source == "models/layers.py:30 TextBlock.__call__"
  assert "all-reduce" not in found  # the all-reduce inside the reduce-scatter fusion is that reduce-scatter
  assert permute.executions == 1 and permute.sent_bytes == permute.tensor_bytes


def test_summary_adds_executions_and_bytes_per_op():
  rows = [
    _hlo.Collective("all-reduce", "f32[8]", 32, 4, 2, True, "a"),
    _hlo.Collective("all-reduce", "f32[4]", 16, 4, 1, False, "b"),
    _hlo.Collective("all-gather", "bf16[8]", 16, 4, 3, False, "c"),
  ]
  by_op = {row["op"]: row for row in collectives.summary(rows)}
  assert by_op["all-reduce"] == dict(op="all-reduce", executions=3, tensor_bytes=80, sent_bytes=2 * 80 * 3 / 4)
  assert by_op["all-gather"]["sent_bytes"] == 3 * 16 * 3 / 4
  assert [group["source"] for group in collectives.largest(rows, 2)] == ["a", "c"]


def test_mesh_groups_with_a_device_order_count_only_the_group_axes():
  line = (
    "  %all-reduce.1 = bf16[512,2048]{1,0} all-reduce(%dot), channel_id=3, "
    "replica_groups=mesh['axis_0'=16,'axis_1'=4], device_ids=([4,16]T(1,0)) {'axis_0'}, to_apply=%add"
  )
  assert _hlo._group_size(line, num_partitions=64) == 16
  assert _hlo._group_size(line.replace("{'axis_0'}", "{'axis_1'}"), num_partitions=64) == 4


COMBINED_HLO = """\
HloModule jit_step, num_partitions=4

ENTRY %main (a: f32[64], t: f32[49408,64]) -> (f32[64], f32[49408,64]) {
  %a = f32[64]{0} parameter(0)
  %t = f32[49408,64]{1,0} parameter(1)
  %bias_grad = f32[64]{0} multiply(%a, %a), metadata={op_name="jit(step)/reduce_sum" stack_frame_id=1}
  %table_grad = f32[49408,64]{1,0} copy(%t), metadata={op_name="jit(step)/transpose(jvp(jit(_take)))/scatter-add" stack_frame_id=2}
  ROOT %all-reduce.1 = (f32[64]{0}, f32[49408,64]{1,0}) all-reduce(%bias_grad, %table_grad), replica_groups={{0,1},{2,3}}, to_apply=%add, metadata={op_name="jit(step)/reduce_sum" stack_frame_id=1}
}

FileNames
1 "/src/grain_jax/losses.py"
2 "/src/grain_jax/models/text.py"

FunctionNames
1 "image_caption_loss"
2 "TextTransformer.packed"

FileLocations
1 {file_name_id=1 function_name_id=1 line=48 end_line=48 column=1 end_column=1}
2 {file_name_id=2 function_name_id=2 line=100 end_line=100 column=1 end_column=1}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=0}
"""


def test_a_combined_collective_is_named_by_its_largest_tensor_and_where_that_was_computed():
  [combined] = _hlo.collectives(COMBINED_HLO)
  assert combined.tensor == "2 tensors, largest f32[49408,64]"
  assert combined.tensor_bytes == (64 + 49408 * 64) * 4
  assert combined.source == "models/text.py:100 TextTransformer.packed" and combined.backward
  assert combined.group_size == 2  # the collective's own groups, not its operand's line
