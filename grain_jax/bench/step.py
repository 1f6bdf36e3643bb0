"""Train-step benchmark: `python -m grain_jax.bench step [--config configs/base.py:small] [--batch 16]
[--scan-layers true|false] [--reference true]`.

Times the full jitted step (image tower, decoder, one text-tower pass on captions and 5 descriptions per
image, matching for every supervised layer, the three losses, backward, AdamW) on one device, and
compares its model FLOP/s (the step's matmuls, counted from its jaxpr, so scanned and unrolled
layer stacks count alike) with the machine's measured float32 matmul rate and, on a device whose
bf16 peak is known (config.train.peak_flops_per_device, else grain_jax/hardware.py), with
that peak (MFU; the arithmetic is grain_jax/train/throughput.py's, as in training's metrics). Model
FLOPs leave out the forward pass that remat computes again.

`--reference true` also times the reference implementation's step, rebuilt in PyTorch from the same
parameters on the same batch (see `_reference_step.py`; needs requirements-export.txt), and prints
how many times faster ours is on this machine.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from grain_jax import sharding
from grain_jax.config import load_config, validate
from grain_jax.data.tokenizer import EOT_ID, SOT_ID
from grain_jax.torch_format import layout, param_tree
from grain_jax.train import throughput, trainer
from grain_jax.train.flops import matmul_flops


def token_ids(rng: np.random.Generator, count: int, words: int) -> np.ndarray:
  """`[count, 77]` CLIP-style ids holding `words` random tokens each."""
  ids = np.zeros((count, 77), np.int32)
  ids[:, 0], ids[:, words + 1] = SOT_ID, EOT_ID
  ids[:, 1 : words + 1] = rng.integers(1, SOT_ID, (count, words))
  return ids


def synthetic_batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A batch shaped like the pipeline's: every region slot valid, captions of 20 and descriptions of
  12 tokens (typical MLLM outputs)."""
  rng = np.random.default_rng(seed)
  size, slots = config.model.image.image_size, config.model.decoder.num_region_queries
  centers = rng.uniform(0.3, 0.7, (batch, slots, 2))
  sizes = rng.uniform(0.1, 0.4, (batch, slots, 2))
  return dict(
    image=rng.normal(size=(batch, size, size, 3)).astype(np.float32),
    caption_ids=token_ids(rng, batch, 20),
    boxes=np.concatenate([centers, sizes], -1).astype(np.float32),
    box_valid=np.ones((batch, slots), bool),
    desc_ids=token_ids(rng, batch * slots, 12).reshape(batch, slots, 77),
    desc_text_id=np.arange(batch * slots, dtype=np.int32).reshape(batch, slots),
  )


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul rate of the default device, FLOP/s: the median of `repeats` products
  of two `[n, n]` matrices, 2 n^3 FLOPs each."""
  a = jnp.ones((n, n), jnp.float32)
  product = jax.jit(lambda x: x @ x)
  product(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    product(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return throughput.per_second(2 * n**3, statistics.median(times))


def _spread(times: list[float]) -> str:
  return f"median {statistics.median(times):.3f} s of {len(times)} (min {min(times):.3f}, max {max(times):.3f})"


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="python -m grain_jax.bench step")
  parser.add_argument("--config", default="configs/base.py:small", help="config path.py[:arg] of the model to time")
  parser.add_argument("--batch", type=int, default=16, help="global batch of the timed step (one device)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
  parser.add_argument(
    "--scan-layers", choices=("true", "false"), help="scan or unroll the layer stacks (default: as the config says)"
  )
  parser.add_argument(
    "--reference",
    choices=("true", "false"),
    default="false",
    help="also time the reference's step rebuilt in PyTorch (needs torch)",
  )
  args = parser.parse_args(argv)
  reference_step = None
  if args.reference == "true":
    try:
      from grain_jax.bench import _reference_step as reference_step
    except ImportError as error:
      parser.error(f"--reference true needs torch and scipy: pip install -r requirements-export.txt ({error})")

  config = load_config(args.config)
  config.data.batch_size = args.batch
  if args.scan_layers:
    config.model.scan_layers = args.scan_layers == "true"
  validate(config, num_devices=1, training=True)
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  full_batch = synthetic_batch(config, args.batch)
  packed = trainer.pack_texts(full_batch, config, 1)
  with jax.set_mesh(mesh), sharding.axis_rules(config.sharding_rules):
    training = trainer.build_training(config, mesh)
    initial = reference_step and layout.to_reference(
      param_tree.flatten(training.state.params), config.model, fetch=param_tree.to_host
    )
    batch = trainer.global_batch(packed, mesh)
    start = time.perf_counter()
    compiled = training.step_fn.lower(training.state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = matmul_flops(training.flops_fn, training.state, batch)
    state, metrics = compiled(training.state, batch)
    jax.block_until_ready(metrics)
    reference = reference_step and reference_step.ReferenceStep(config, initial)
    if reference:
      reference(full_batch)
    times, reference_times = [], []
    # With --reference the two steps alternate, so a machine that slows down mid-run (shared
    # hosts do) weighs on both alike.
    for _ in range(args.steps):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
      if reference:
        start = time.perf_counter()
        reference_loss = reference(full_batch)
        reference_times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  peak = matmul_flops_per_second()
  device = jax.devices()[0]
  print(
    f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
    f"device {device.platform} ({device.device_kind}); jax {jax.__version__}"
  )
  print(
    f"config {args.config}, batch {args.batch}, {config.model.decoder.num_region_queries} regions per image, "
    f"{config.model.decoder.depth} decoder layers, matching {config.matching.method}, "
    f"layers {'scanned' if config.model.scan_layers else 'unrolled'}"
  )
  real = np.count_nonzero(packed["text_segments"])
  print(
    f"texts: {len(full_batch['caption_ids'])} captions and {int(full_batch['box_valid'].sum())} descriptions packed "
    f"into {packed['text_tokens'].shape[0]} rows of {packed['text_tokens'].shape[1]} tokens "
    f"({1 - real / packed['text_tokens'].size:.0%} padding), one pass of the text tower"
  )
  print(f"compile: {compile_s:.1f} s")
  print(f"step: {_spread(times)}")
  print(f"throughput: {throughput.per_second(args.batch, step_s):.1f} images/s")
  print(
    f"model FLOPs per step (matmuls): {flops / 1e9:.1f} G, {flops / args.batch / 1e9:.2f} G per image; "
    f"achieved {throughput.per_second(flops, step_s) / 1e9:.1f} GFLOP/s"
  )
  print(
    f"measured f32 matmul rate: {peak / 1e9:.1f} GFLOP/s; "
    f"utilization {throughput.model_flops_utilization(flops, step_s, 1, peak):.1%}"
  )
  bf16_peak = throughput.peak_flops_per_device(device.device_kind, config.train.peak_flops_per_device)
  if bf16_peak is None:
    print(f"MFU: no bf16 peak known for a {device.device_kind!r} device")
  else:
    print(
      f"MFU (of the {device.device_kind}'s bf16 peak, {bf16_peak / 1e12:.0f} TFLOP/s): "
      f"{throughput.model_flops_utilization(flops, step_s, 1, bf16_peak):.1%}"
    )
  print(f"loss {float(metrics['loss']):.3f} (finite: {bool(np.isfinite(float(metrics['loss'])))})")
  if reference:
    ratios = [theirs / ours for theirs, ours in zip(reference_times, times)]
    print(
      f"reference step (PyTorch {reference_step.torch.__version__}, eager, 77-token texts, matching on the host, "
      f"alternating with ours): {_spread(reference_times)}; loss {reference_loss:.3f}"
    )
    print(
      f"speedup over the reference: {statistics.median(reference_times) / step_s:.2f}x "
      f"(per pair of steps: median {statistics.median(ratios):.2f}x, min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
    )
  return 0
