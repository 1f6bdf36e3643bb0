r"""Annotates images with an MLLM's caption and descriptions and a detector's boxes, or (the
`descriptors` command, see grain_jax/annotate/descriptors.py) writes the descriptor file of an
evaluation set with an LLM.

  python -m grain_jax.annotate --images DIR|RECORDS --out DIR [--captions captions.csv]
      [--mllm MODEL_ID] [--detector MODEL_ID] [--num-chunks N --chunk-index I]

--images is a folder of image files (searched recursively; alt-text from --captions or sidecar
.txt files) or a record dataset (its images and alt-texts are re-annotated). The output is a
record dataset for training (--config.data.train_dir=DIR). Re-running the same command resumes;
run chunk I of N on each of N hosts or GPUs, all with the same --out.

  python -m grain_jax.annotate descriptors --dataset NAME | --classes FILE --out DIR [--llm MODEL_ID]
"""

import argparse
import os
import sys
from collections.abc import Sequence

from grain_jax.annotate import descriptors, detector, mllm, run
from grain_jax.errors import check_local_path, run_command


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.annotate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--images", required=True, help="folder of images, or a record dataset (a folder with manifest.json)"
  )
  parser.add_argument("--out", required=True, help="output directory of shards + manifest.json")
  parser.add_argument(
    "--captions", default="", help="captions.csv (image_path,caption rows) with alt-texts of a folder"
  )
  parser.add_argument(
    "--mllm", default=mllm.DEFAULT_MODEL, help="hub id or directory of an image-text-to-text model with a chat template"
  )
  parser.add_argument(
    "--detector", default=detector.DEFAULT_MODEL, help="hub id or directory of an OWLv2 / OWL-ViT detector"
  )
  parser.add_argument(
    "--threshold", type=float, default=detector.DEFAULT_THRESHOLD, help="keep boxes whose detector score is above this"
  )
  parser.add_argument(
    "--max-descriptions", type=int, default=10, help="descriptions kept per image (the first ones the MLLM lists)"
  )
  parser.add_argument("--max-new-tokens", type=int, default=256, help="longest MLLM answer, in tokens")
  parser.add_argument("--batch-size", type=int, default=8, help="images per model call")
  parser.add_argument(
    "--shard-size", type=int, default=256, help="images per shard, the unit of resuming and of chunking"
  )
  parser.add_argument("--num-chunks", type=int, default=1, help="split the shards over N runs")
  parser.add_argument("--chunk-index", type=int, default=0, help="which of them this run is")
  parser.add_argument(
    "--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads reading and decoding images"
  )
  parser.add_argument(
    "--max-side", type=int, default=512, help="re-encode images whose longer side exceeds this (0 = keep all bytes)"
  )
  parser.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda, cuda:1")
  parser.add_argument(
    "--dtype", default="auto", help="auto (float16 on GPUs, float32 on CPUs), float32, float16, bfloat16"
  )
  parser.add_argument(
    "--max-bad-fraction",
    type=float,
    default=0.05,
    help="stop with an error when more than this fraction of images is bad",
  )
  args = parser.parse_args(argv)
  for flag in ("batch_size", "shard_size", "num_chunks", "workers", "max_descriptions", "max_new_tokens"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  if not 0 <= args.chunk_index < args.num_chunks:
    parser.error(f"--chunk-index={args.chunk_index} is not in [0, --num-chunks={args.num_chunks})")
  if not 0 <= args.threshold < 1:
    parser.error(f"--threshold={args.threshold} is not in [0, 1)")
  for flag in ("images", "out", "captions"):
    check_local_path(getattr(args, flag), f"--{flag}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a user's error is one message and exit status 2 (grain_jax.errors)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["descriptors"]:
    return run_command(lambda: descriptors.write_descriptors(descriptors.parse_args(argv[1:])))
  return run_command(lambda: run.annotate(parse_args(argv)))


if __name__ == "__main__":
  sys.exit(main())
