"""Device memory of the train step: `python -m grain_jax.bench memory --config CONFIG [--config ...]`.

Compiles the real jitted train step (`trainer.build_training(..., abstract=True)`: the same
program a run executes, on abstract shapes, no parameter allocated) for the config's mesh and
reports XLA's per-device buffer assignment from `.compile().memory_analysis()`: arguments
(parameters, optimizer state, batch), outputs, temporaries, and their total against the device's
memory. Each config compiles in its own process:
- TPU presets with the TPU compiler, deviceless: `jax.experimental.topologies` describes the
  slice (e.g. `v5p:4x4x4`, 64 chips) and libtpu compiles for it on this CPU machine. Needs the
  TPU extra (`pip install -r requirements-tpu.txt`); without libtpu they fall back to XLA:CPU.
- Other presets (GPUs) with XLA:CPU: `JAX_NUM_CPU_DEVICES` set to the hardware's device count,
  so an XLA:CPU mesh of that size stands in for the machines.
The `compiler` column says which one produced each row.

The device count and memory come from the machine of the mesh preset named in the config argument
(`grain_jax/hardware.py` MACHINES, e.g. `configs/cc12m_b16.py:grain,tpu_v5p_128`), or from
`--devices` and `--memory-gib`.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
from jax.sharding import NamedSharding

from grain_jax import sharding
from grain_jax.bench import _hlo
from grain_jax.bench.step import synthetic_batch
from grain_jax.config import load_config, validate
from grain_jax.hardware import MACHINES, Machine
from grain_jax.train import trainer

GIB = 2**30


def hardware_for(config_spec: str) -> Machine | None:
  """The machine of the mesh preset named in `config_spec`'s argument, or None."""
  names = config_spec.partition(":")[2].split(",")
  return next((MACHINES[name] for name in names if name in MACHINES), None)


def abstract_batch(config, mesh):
  """`jax.ShapeDtypeStruct`s of one global batch sharded over the mesh's batch axes: the benchmark
  batch (captions of 22 tokens, descriptions of 14, SOT and EOT included) with its texts packed,
  every device's group packed like the first."""
  shards = sharding.batch_shards(mesh, config.sharding_rules)
  groups = trainer.text_groups(config, shards)
  one = trainer.pack_texts(synthetic_batch(config, config.data.batch_size // groups), config, shards)
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
  return {
    key: jax.ShapeDtypeStruct((groups * value.shape[0], *value.shape[1:]), value.dtype, sharding=batch_sharding)
    for key, value in one.items()
  }


def tpu_topology(machine: Machine) -> str | None:
  """The deviceless TPU topology to compile for `machine`, or None (none listed, or no libtpu here)."""
  if not machine.tpu_topology or importlib.util.find_spec("libtpu") is None:
    return None
  return machine.tpu_topology


def compile_step(config, topology: str | None = None):
  """The compiled train step of `config` and the devices it was compiled for: the TPU slice
  `topology` (deviceless, e.g. `v5p:4x4x4`), or this process's devices."""
  if topology:
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  else:
    devices = jax.devices()
  validate(config, num_devices=len(devices), training=True)
  mesh = sharding.make_mesh(config.mesh, devices)
  # Built outside the mesh: a deviceless mesh compiles but cannot run the eager parts of building.
  training = trainer.build_training(config, mesh, abstract=True)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.axis_rules(config.sharding_rules):
    return training.step_fn.lower(training.state, abstract_batch(config, mesh)).compile(), mesh


def analyze(
  config_spec: str,
  overrides: dict,
  topology: str | None = None,
  with_collectives: bool = False,
  hlo_path: str | None = None,
) -> dict:
  """Compiles the train step of `config_spec` (with `overrides`, dotted field names -> values) for
  the TPU slice `topology` or on this process's devices; per-device bytes, and with
  `with_collectives` the program's collectives (`_hlo.Collective` fields). Writes the compiled
  program's HLO text to `hlo_path` if given."""
  config = load_config(config_spec)
  config.update_from_flattened_dict(overrides)
  compiled, mesh = compile_step(config, topology)
  stats = compiled.memory_analysis()
  devices = mesh.devices.size
  total = (
    stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
  )
  compiler = f"TPU {topology} (libtpu, deviceless)" if topology else f"XLA:{jax.default_backend().upper()}"
  row = dict(
    devices=devices,
    mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
    compiler=compiler,
    per_device_batch=config.data.batch_size // devices,
    dtype=config.model.dtype,
    remat=config.model.remat,
    grad_accum_steps=config.train.grad_accum_steps,
    arguments=stats.argument_size_in_bytes,
    outputs=stats.output_size_in_bytes,
    aliased=stats.alias_size_in_bytes,
    temporaries=stats.temp_size_in_bytes,
    total=total,
  )
  if with_collectives or hlo_path:
    hlo_text = compiled.as_text()
    if hlo_path:
      with open(hlo_path, "w") as f:
        f.write(hlo_text)
    if with_collectives:
      row["collectives"] = [dataclasses.asdict(c) for c in _hlo.collectives(hlo_text)]
  return row


def analyze_in_subprocess(
  config_spec: str,
  devices: int,
  topology: str | None,
  overrides: dict,
  with_collectives: bool = False,
  hlo_path: str | None = None,
) -> dict:
  """`analyze` in a fresh process: for the TPU slice `topology` (deviceless; `tpu_topology`) when
  given, else on a CPU backend with `devices` devices."""
  # libtpu takes a machine-wide lock unless told that several processes may load it (here they
  # only compile).
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  command = [
    sys.executable,
    "-m",
    "grain_jax.bench.memory",
    "--worker",
    "--config",
    config_spec,
    "--overrides",
    json.dumps(overrides),
  ]
  command += ["--topology", topology] if topology else []
  command += ["--with-collectives"] if with_collectives else []
  command += ["--hlo-path", hlo_path] if hlo_path else []
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"memory analysis of {config_spec} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  """Markdown: one row per config, GiB per device."""
  lines = [
    "| config | hardware | compiler | mesh (data x fsdp x tensor) | batch / device | dtype, remat, accum | "
    "arguments | outputs (aliased) | temporaries | total | device memory | fits |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    gib = {name: row[name] / GIB for name in ("arguments", "outputs", "aliased", "temporaries", "total")}
    mesh = " x ".join(str(size) for size in row["mesh"].values())
    memory = row["memory_gib"]
    fits = "n/a" if memory is None else ("yes" if gib["total"] <= memory else "**no**")
    lines.append(
      f"| `{row['config']}` | {row['hardware']} | {row['compiler']} | {mesh} | {row['per_device_batch']} | "
      f"{row['dtype']}, {'remat' if row['remat'] else 'no remat'}, {row['grad_accum_steps']} | "
      f"{gib['arguments']:.2f} | {gib['outputs']:.2f} ({gib['aliased']:.2f}) | {gib['temporaries']:.2f} | "
      f"{gib['total']:.2f} | {'?' if memory is None else f'{memory:g}'} | {fits} |"
    )
  return "\n".join(lines)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """The flags `memory` and `collectives` share."""
  parser.add_argument("--config", action="append", required=True, help="config path.py[:arg]; repeatable")
  parser.add_argument("--devices", type=int, help="device count (default: the config's mesh preset's machine)")
  parser.add_argument("--grad-accum-steps", type=int, help="override config.train.grad_accum_steps")
  parser.add_argument(
    "--xla-cpu", action="store_true", help="compile with XLA:CPU even where the TPU compiler applies (for comparison)"
  )
  parser.add_argument("--hlo-dir", help="write each config's compiled program (HLO text) to this directory")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--hlo-path", help=argparse.SUPPRESS)
  parser.add_argument("--topology", help=argparse.SUPPRESS)
  parser.add_argument("--with-collectives", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)


def analyze_configs(parser: argparse.ArgumentParser, args, with_collectives: bool = False) -> list[dict]:
  """One `analyze_in_subprocess` row per `--config`, with its `config` and `hardware` filled in."""
  overrides = {} if args.grad_accum_steps is None else {"train.grad_accum_steps": args.grad_accum_steps}
  rows = []
  for spec in args.config:
    machine = None if args.devices else hardware_for(spec)
    if machine is None and not args.devices:
      parser.error(f"--config {spec} names no mesh preset of grain_jax/hardware.py MACHINES; pass --devices")
    devices = args.devices or machine.devices
    topology = None if machine is None or args.xla_cpu else tpu_topology(machine)
    hlo_path = None
    if args.hlo_dir:
      os.makedirs(args.hlo_dir, exist_ok=True)
      hlo_path = os.path.join(args.hlo_dir, re.sub(r"[^\w.,-]+", "_", spec) + ".hlo.txt")
    row = analyze_in_subprocess(spec, devices, topology, overrides, with_collectives, hlo_path)
    row.update(
      config=spec,
      hardware=machine.chip if machine else f"{devices} devices",
      memory_gib=getattr(args, "memory_gib", None) or (machine.memory_gib if machine else None),
    )
    rows.append(row)
    print(f"{spec}: {row['compiler']}, {row['total'] / GIB:.2f} GiB per device", file=sys.stderr, flush=True)
  return rows


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  add_config_flags(parser)
  parser.add_argument("--memory-gib", type=float, help="memory per device (default: the mesh preset's machine's)")
  args = parser.parse_args(argv)
  if args.worker:
    print(
      json.dumps(
        analyze(args.config[0], json.loads(args.overrides), args.topology, args.with_collectives, args.hlo_path)
      )
    )
    return 0
  rows = analyze_configs(parser, args)
  print(
    "Per-device memory of the train step (GiB) from the compiler's buffer assignment of the sharded "
    "program, compiled on abstract shapes:"
  )
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
