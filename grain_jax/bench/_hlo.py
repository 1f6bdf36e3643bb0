"""The collectives of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

`collectives(hlo_text)` lists every collective the program executes per call: its op, the tensor it
moves, how many times it runs (loops counted by their known trip counts), the bytes of the full
tensor, an estimate of the bytes each device sends, and the Python source line of the JAX operation
it came from (the innermost frame in this project's code).

TPU HLO writes a reduce-scatter as a `kCustom` fusion calling an `all-reduce-scatter` computation (an
all-reduce whose result is sliced, run by a reduce-scatter emitter); it is reported as one
reduce-scatter.
"""

import dataclasses
import math
import re

DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_STACK_FRAME = re.compile(r"stack_frame_id=(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# `mesh[axes] {group axes}`, or with the mesh's device order between: `mesh[axes], device_ids=(...) {...}`.
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of the program.

  op: one of COLLECTIVES.
  tensor: dtype and shape of the full (unsharded) tensor, e.g. `bf16[768,2304]`; a combined
    collective of several tensors: `N tensors`, with the largest named when each tensor is an operand
    of its own (its source and pass are then the largest tensor's).
  tensor_bytes: bytes of that tensor (each device holds it before a reduce-scatter / after a gather).
  group_size: devices taking part in each group.
  executions: times it runs per program call (trip counts of the loops around it multiplied).
  backward: whether it belongs to the gradient (its JAX op is under `transpose(...)`).
  source: `file.py:line function` of the innermost frame under the source root, else of the
    innermost frame, else the JAX op name.
  """

  op: str
  tensor: str
  tensor_bytes: int
  group_size: int
  executions: int
  backward: bool
  source: str

  @property
  def sent_bytes(self) -> float:
    """Bytes each device sends per execution in a ring implementation."""
    share = (self.group_size - 1) / self.group_size
    factor = {"all-reduce": 2 * share, "collective-permute": 1.0}.get(self.op, share)
    return factor * self.tensor_bytes


@dataclasses.dataclass
class _Instruction:
  name: str
  opcode: str
  result_type: str
  operands: list[str]
  line: str


def _split_instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  rest = line[match.end() :]
  if rest.startswith("("):
    depth, end = 0, 0
    while end < len(rest):  # to the parenthesis that closes the first
      depth += {"(": 1, ")": -1}.get(rest[end], 0)
      end += 1
      if depth == 0:
        break
    result_type, rest = rest[:end], rest[end + 1 :]
  else:
    result_type, _, rest = rest.partition(" ")
  opcode, _, arguments = rest.partition("(")
  operands = re.findall(r"%([\w.\-]+)", arguments.split(")", 1)[0])
  return _Instruction(match.group(1), opcode, result_type, operands, line)


def _arrays(type_text: str) -> list[tuple[str, int]]:
  """`[(dtype[dims], bytes), ...]` of every array in an HLO type (tuples flattened)."""
  arrays = []
  for dtype, dims in _ARRAY.findall(type_text):
    if dtype in DTYPE_BYTES:
      size = math.prod(int(d) for d in dims.split(",") if d)
      arrays.append((f"{dtype}[{dims}]", int(size * DTYPE_BYTES[dtype])))
  return arrays


def _parse_computations(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      instruction = _split_instruction(line)
      if instruction:
        current.append(instruction)
  if entry is None:
    raise ValueError("the HLO text has no ENTRY computation")
  return computations, entry


def _trip_count(loop: _Instruction, computations: dict[str, list[_Instruction]]) -> int:
  """A while loop's iterations: its known trip count, or else N from a condition `counter < N` on
  a constant (JAX's scans count from 0); 1 when neither is found."""
  known = _TRIP_COUNT.search(loop.line)
  if known:
    return int(known.group(1))
  condition = re.search(r"\bcondition=%?([\w.\-]+)", loop.line)
  instructions = computations.get(condition.group(1), []) if condition else []
  constants = {i.name: re.search(r"constant\((-?\d+)\)", i.line) for i in instructions if i.opcode == "constant"}
  root = next((i for i in instructions if i.line.lstrip().startswith("ROOT ")), None)
  if root and root.opcode == "compare" and "direction=LT" in root.line and len(root.operands) == 2:
    bound = constants.get(root.operands[1])
    if bound:
      return int(bound.group(1))
  return 1


def _executions(computations: dict[str, list[_Instruction]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of `entry` (while bodies times their trip count)."""
  counts: dict[str, int] = {}

  def visit(name: str, times: int):
    counts[name] = counts.get(name, 0) + times
    for instruction in computations.get(name, ()):
      callees = _CALLEE.findall(instruction.line)
      for branches in _BRANCHES.findall(instruction.line):
        callees += re.findall(r"%?([\w.\-]+)", branches)
      trip = _trip_count(instruction, computations) if instruction.opcode == "while" else 1
      for callee in callees:
        if callee in computations:
          visit(callee, times * trip)

  visit(entry, 1)
  return counts


def _source_lines(hlo_text: str, source_root: str) -> dict[int, str]:
  """stack_frame_id -> `file.py:line function`, preferring the innermost frame under `source_root`."""
  tables: dict[str, dict[int, str]] = {}
  table = None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = tables.setdefault(line, {})
    elif table is not None:
      match = re.match(r"^(\d+) (.*)$", line)
      if match:
        table[int(match.group(1))] = match.group(2)
      elif line.strip():
        table = None
  files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})

  def location(location_id: int) -> tuple[str, str]:
    fields = dict(re.findall(r"(\w+)=(\d+)", tables.get("FileLocations", {}).get(location_id, "")))
    path = files.get(int(fields.get("file_name_id", 0)), '""').strip('"')
    function = functions.get(int(fields.get("function_name_id", 0)), '""').strip('"')
    short = path.split(source_root, 1)[1] if source_root in path else path.rsplit("/", 1)[-1]
    return path, f"{short}:{fields.get('line', '?')} {function}"

  frames = tables.get("StackFrames", {})
  sources = {}
  for frame_id in frames:
    chain, seen, current = [], set(), frame_id
    while current in frames and current not in seen:
      seen.add(current)
      fields = dict(re.findall(r"(\w+)=(\d+)", frames[current]))
      chain.append(location(int(fields.get("file_location_id", 0))))
      # The printer writes a frame's parent as its id + 1 (0: none).
      current = int(fields.get("parent_frame_id", 0)) - 1
    ours = [text for path, text in chain if source_root in path and "site-packages" not in path]
    if chain:
      sources[frame_id] = (ours or [text for _, text in chain])[0]
  return sources


def _group_size(line: str, num_partitions: int) -> int:
  mesh = _MESH_GROUPS.search(line)
  if mesh:
    sizes = dict((name.strip("'"), int(size)) for name, size in re.findall(r"('[^']*')=(\d+)", mesh.group(1)))
    return math.prod(sizes[name.strip().strip("'")] for name in mesh.group(2).split(",") if name.strip())
  iota = _IOTA_GROUPS.search(line)
  if iota:
    return int(iota.group(2))
  listed = _LIST_GROUPS.search(line)
  if listed and listed.group(1):
    return len(listed.group(1).split(","))
  return 2 if _PAIRS.search(line) else num_partitions


def collectives(hlo_text: str, source_root: str = "grain_jax/") -> list[Collective]:
  """Every collective of the program in `hlo_text`, in program order within each computation; each
  attributed to the innermost Python frame whose file path contains `source_root`."""
  computations, entry = _parse_computations(hlo_text)
  executions = _executions(computations, entry)
  sources = _source_lines(hlo_text, source_root)
  partitions = re.search(r"num_partitions=(\d+)", hlo_text)
  num_partitions = int(partitions.group(1)) if partitions else 1
  reduce_scatter_bodies = {name for name in computations if name.startswith("all-reduce-scatter")}
  found = []
  for name, instructions in computations.items():
    if name in reduce_scatter_bodies or not executions.get(name):
      continue
    shapes = {instruction.name: instruction.result_type for instruction in instructions}
    producers = {
      instruction.name: instruction.line for instruction in instructions if _STACK_FRAME.search(instruction.line)
    }
    for instruction in instructions:
      opcode, line = instruction.opcode, instruction.line
      callee = _CALLEE.search(line)
      if opcode == "fusion" and callee and callee.group(1) in reduce_scatter_bodies:
        op, body = "reduce-scatter", computations[callee.group(1)]
        line = next((i.line for i in body if i.opcode == "all-reduce"), line) + " " + instruction.line
      elif opcode.removesuffix("-start") in COLLECTIVES:
        op = opcode.removesuffix("-start")
      else:
        continue
      operands = [array for operand in instruction.operands for array in _arrays(shapes.get(operand, ""))]
      results = _arrays(instruction.result_type)
      if op == "reduce-scatter" or (op == "collective-permute" and opcode.endswith("-start")):
        moved = operands
      elif op == "all-gather" and opcode.endswith("-start"):
        moved = results[len(operands) :]
      else:
        moved = results
      tensor, origin = (moved[0][0] if len(moved) == 1 else f"{len(moved)} tensors"), line
      if len(moved) > 1 and len(moved) == len(instruction.operands):
        # The compiler combined several collectives into one and kept one of their locations: name
        # the largest tensor, and where it was computed.
        largest = max(range(len(moved)), key=lambda index: moved[index][1])
        tensor += f", largest {moved[largest][0]}"
        origin = producers.get(instruction.operands[largest], line)
      frame = _STACK_FRAME.search(origin)
      op_name = _OP_NAME.search(origin)
      source = sources.get(int(frame.group(1))) if frame else None
      found.append(
        Collective(
          op=op,
          tensor=tensor,
          tensor_bytes=sum(size for _, size in moved),
          group_size=_group_size(line, num_partitions),
          executions=executions[name],
          backward="transpose(" in (op_name.group(1) if op_name else ""),
          source=source or (op_name.group(1) if op_name else "?"),
        )
      )
  return found
