"""Device memory of the train step: `python -m grain_jax.bench memory --config CONFIG [--config ...]`.

Compiles the real jitted train step (`trainer.build_training(..., abstract=True)`: the same
program a run executes, on abstract shapes, no parameter allocated) for the config's mesh and
reports XLA's per-device buffer assignment from `.compile().memory_analysis()`: arguments
(parameters, optimizer state, batch), outputs, temporaries, and their total against the device's
memory. Each config compiles in its own process with `JAX_NUM_CPU_DEVICES` set to the
hardware's device count, so an XLA:CPU mesh of that size stands in for the pod.

The device count and memory come from the mesh preset named in the config argument
(`grain_jax/defaults/meshes.py` HARDWARE, e.g. `configs/cc12m_b16.py:grain,tpu_v5p_128`), or from
`--devices` and `--memory-gib`.
"""

import argparse
import json
import os
import subprocess
import sys

import jax
from jax.sharding import NamedSharding

from grain_jax import sharding
from grain_jax.bench.step import synthetic_batch
from grain_jax.config import load_config, validate
from grain_jax.defaults import meshes
from grain_jax.train import trainer

GIB = 2 ** 30


def hardware_for(config_spec: str) -> dict | None:
  """The HARDWARE entry of the mesh preset named in `config_spec`'s argument, or None."""
  names = config_spec.partition(":")[2].split(",")
  return next((meshes.HARDWARE[name] for name in names if name in meshes.HARDWARE), None)


def abstract_batch(config, mesh):
  """`jax.ShapeDtypeStruct`s of one global batch sharded over the mesh's batch axes; text cut to
  the buckets the benchmark batch (captions of 20, descriptions of 12 tokens) falls in."""
  one = trainer.text_to_bucket(synthetic_batch(config, 1), config.model.text.context_buckets)
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch",)))
  return {key: jax.ShapeDtypeStruct((config.data.batch_size, *value.shape[1:]), value.dtype, sharding=batch_sharding)
          for key, value in one.items()}


def analyze(config_spec: str, overrides: dict) -> dict:
  """Compiles the train step of `config_spec` (with `overrides`, dotted field names -> values) on
  this process's devices; per-device bytes."""
  config = load_config(config_spec)
  config.update_from_flattened_dict(overrides)
  validate(config, num_devices=jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    training = trainer.build_training(config, mesh, abstract=True)
    stats = training.step_fn.lower(training.state, abstract_batch(config, mesh)).compile().memory_analysis()
  total = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
  return dict(devices=jax.device_count(), mesh=dict(zip(mesh.axis_names, mesh.devices.shape)),
              per_device_batch=config.data.batch_size // jax.device_count(), dtype=config.model.dtype,
              remat=config.model.remat, grad_accum_steps=config.train.grad_accum_steps,
              arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
              aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes, total=total)


def analyze_in_subprocess(config_spec: str, devices: int, overrides: dict) -> dict:
  """`analyze` in a fresh process whose CPU backend has `devices` devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
  command = [sys.executable, "-m", "grain_jax.bench.memory", "--worker", "--config", config_spec,
             "--overrides", json.dumps(overrides)]
  result = subprocess.run(command, env=env, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"memory analysis of {config_spec} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
  """Markdown: one row per config, GiB per device."""
  lines = ["| config | hardware | mesh (data x fsdp x tensor) | batch / device | dtype, remat, accum | "
           "arguments | outputs (aliased) | temporaries | total | device memory | fits |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    gib = {name: row[name] / GIB for name in ("arguments", "outputs", "aliased", "temporaries", "total")}
    mesh = " x ".join(str(size) for size in row["mesh"].values())
    memory = row["memory_gib"]
    fits = "n/a" if memory is None else ("yes" if gib["total"] <= memory else "**no**")
    lines.append(
        f"| `{row['config']}` | {row['hardware']} | {mesh} | {row['per_device_batch']} | "
        f"{row['dtype']}, {'remat' if row['remat'] else 'no remat'}, {row['grad_accum_steps']} | "
        f"{gib['arguments']:.2f} | {gib['outputs']:.2f} ({gib['aliased']:.2f}) | {gib['temporaries']:.2f} | "
        f"{gib['total']:.2f} | {'?' if memory is None else f'{memory:g}'} | {fits} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m grain_jax.bench memory", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", action="append", required=True, help="config path.py[:arg]; repeatable")
  parser.add_argument("--devices", type=int, help="device count (default: the config's hardware preset)")
  parser.add_argument("--memory-gib", type=float, help="memory per device (default: the hardware preset's)")
  parser.add_argument("--grad-accum-steps", type=int, help="override config.train.grad_accum_steps")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(analyze(args.config[0], json.loads(args.overrides))))
    return 0

  overrides = {} if args.grad_accum_steps is None else {"train.grad_accum_steps": args.grad_accum_steps}
  rows = []
  for spec in args.config:
    hardware = hardware_for(spec) or {}
    devices = args.devices or hardware.get("devices")
    if devices is None:
      parser.error(f"--config {spec} names no hardware preset of grain_jax/defaults/meshes.py HARDWARE; pass --devices")
    row = analyze_in_subprocess(spec, devices, overrides)
    row.update(config=spec, hardware=hardware.get("device", f"{devices} devices"),
               memory_gib=args.memory_gib or hardware.get("memory_gib"))
    rows.append(row)
    print(f"{spec}: {row['total'] / GIB:.2f} GiB per device", file=sys.stderr, flush=True)
  print("Per-device memory of the train step (GiB) from XLA:CPU's buffer assignment of the same sharded "
        "program, compiled on abstract shapes:")
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
