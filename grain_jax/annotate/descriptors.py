r"""Writes a descriptor file (`{class name: [descriptor, ...]}`, Menon & Vondrick's format) with an LLM.

  python -m grain_jax.annotate descriptors --dataset NAME --out DIR [--llm MODEL_ID]
  python -m grain_jax.annotate descriptors --classes classes.txt --out DIR [--name descriptors_x.json]

For a registry set (grain_jax/eval/datasets.py) the classes are its own, named as evaluation names
them (tfds's builder info gives the label names without a download), and the file is the one
`config.eval.descriptors_dir` is read for (`DIR/descriptors_cifar10.json`, ...). The LLM is asked,
as Menon & Vondrick asked GPT-3, with two worked examples and the question "What are useful visual
features for distinguishing a <class> in a photo?", and its bullet list is kept. Decoding is greedy,
but classes are answered in left-padded batches, and padding can change the arithmetic (float16 on
GPUs especially), so an answer may differ with the other classes of its batch; `--batch-size 1`
makes each answer depend only on the model, the prompt, the dtype and the device. Each finished
class is appended to `<file>.partial.jsonl`; re-running the same command resumes from it, and the
file is written when every class has its list.
"""

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import tqdm

from grain_jax.annotate import hf, parse
from grain_jax.data import records
from grain_jax.errors import ArgumentError, check_local_path
from grain_jax.eval import datasets

DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"
# Two answered questions set the form of the answer: short visual features, one "- " line each.
_EXAMPLES = (
  (
    "zebra",
    [
      "a horse-like animal",
      "black and white stripes",
      "a short, upright mane",
      "a long face with dark muzzle",
      "hooves",
      "a tufted tail",
      "grassland or savanna",
    ],
  ),
  (
    "teapot",
    [
      "a round or pear-shaped vessel",
      "a spout on one side",
      "a handle on the other side",
      "a lid with a small knob",
      "ceramic, porcelain, glass or metal",
      "a cup or saucer nearby",
    ],
  ),
)


def _article(name: str) -> str:
  return "an" if name[:1].lower() in "aeiou" else "a"


def _question(name: str) -> str:
  return (
    f"Q: What are useful visual features for distinguishing {_article(name)} {name} in a photo?\n"
    f"A: There are several useful visual features to tell there is {_article(name)} {name} in a photo:\n"
  )


def prompt(name: str) -> str:
  """The text the LLM continues for class `name`: the worked examples, then its question and "-"."""
  examples = "".join(_question(n) + "".join(f"- {f}\n" for f in features) + "\n" for n, features in _EXAMPLES)
  return examples + _question(name) + "-"


def descriptors_from_answer(answer: str, max_descriptors: int) -> list[str]:
  """The LLM's continuation of `prompt(...)` -> its features, up to the next question or blank line."""
  lines = []
  for line in ("-" + answer).splitlines():
    if not line.strip() or line.lstrip().startswith("Q:"):
      break
    lines.append(line)
  return parse.parse_response("\n".join(lines), max_descriptors)[1]


class Writer:
  """A causal LLM that answers the prompts of a batch of classes."""

  def __init__(
    self, model_id: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 128
  ):
    self.torch, _ = hf.import_torch_and_transformers()
    self.device, self.dtype = hf.device_and_dtype(device, dtype)
    self.tokenizer, self.model = hf.load("AutoModelForCausalLM", model_id, self.device, self.dtype)
    # Generation continues each row from its last token: pad on the left.
    self.tokenizer.padding_side = "left"
    if self.tokenizer.pad_token is None:
      self.tokenizer.pad_token = self.tokenizer.eos_token
    self.max_new_tokens = max_new_tokens

  def answer(self, names: Sequence[str]) -> list[str]:
    """The LLM's continuation of `prompt(name)` for each class name, special tokens removed."""
    inputs: Any = self.tokenizer([prompt(n) for n in names], padding=True, return_tensors="pt").to(self.device)
    with self.torch.inference_mode():
      tokens = self.model.generate(
        **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
      )
    return self.tokenizer.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m grain_jax.annotate descriptors",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--dataset", choices=sorted(datasets.TFDS_DATASETS), help="a registry set: its classes")
  which.add_argument("--classes", help="a text file of class names, one a line")
  parser.add_argument("--out", required=True, help="folder the descriptor file is written to")
  parser.add_argument(
    "--name", default="", help="the file's name (default: the registry's for --dataset, descriptors.json for --classes)"
  )
  parser.add_argument("--llm", default=DEFAULT_MODEL, help="hub id or directory of a causal language model")
  parser.add_argument("--max-descriptors", type=int, default=10, help="features kept per class")
  parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer, in tokens")
  parser.add_argument(
    "--batch-size", type=int, default=8, help="classes per model call (1: each answer independent of the other classes)"
  )
  parser.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda, cuda:1")
  parser.add_argument(
    "--dtype", default="auto", help="auto (float16 on GPUs, float32 on CPUs), float32, float16, bfloat16"
  )
  args = parser.parse_args(argv)
  for flag in ("max_descriptors", "max_new_tokens", "batch_size"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be at least 1")
  for flag in ("classes", "out"):
    check_local_path(getattr(args, flag) or "", f"--{flag}")
  return args


def class_names(args: argparse.Namespace) -> tuple[list[str], str]:
  """(the classes to describe, the output file's name) for the parsed `args`."""
  if args.classes:
    with open(args.classes) as f:
      names = [line.strip() for line in f if line.strip()]
    if not names:
      raise ArgumentError(f"--classes={args.classes} lists no class")
    return names, args.name or "descriptors.json"
  spec = datasets.TFDS_DATASETS[args.dataset]
  if not spec.readable_labels:
    raise ArgumentError(
      f"--dataset={args.dataset}: its tfds labels are ids, so its class names are known only "
      f"from its published descriptor file ({spec.descriptors_file}, see docs/evaluation.md); "
      "to describe another class list use --classes"
    )
  return datasets.registry_class_names(args.dataset), args.name or spec.descriptors_file


def _read_progress(path: str, settings: dict[str, Any]) -> dict[str, list[str]]:
  """{class: descriptors} already written by a run with the same `settings` (first line of `path`)."""
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if not text.endswith("\n"):  # a run killed while writing a line: drop that line, later ones follow it
    text = text[: text.rfind("\n") + 1] or json.dumps(settings) + "\n"
    with open(path, "w") as f:
      f.write(text)
  lines = text.splitlines()
  if json.loads(lines[0]) != settings:
    raise ArgumentError(f"{path} holds a run with other settings ({lines[0]}); delete it or use another --out")
  return {entry["class"]: entry["descriptors"] for entry in map(json.loads, lines[1:])}


def write_descriptors(args: argparse.Namespace) -> str:
  """Describes every class the parsed CLI `args` name; returns the descriptor file's path."""
  names, file_name = class_names(args)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, file_name)
  progress = path + ".partial.jsonl"
  settings = {
    "llm": args.llm,
    "max_new_tokens": args.max_new_tokens,
    "max_descriptors": args.max_descriptors,
    "prompt": prompt("{}"),
  }
  done = _read_progress(progress, settings)
  todo = [n for n in dict.fromkeys(names) if n not in done]
  if todo:
    writer = Writer(args.llm, args.device, args.dtype, args.max_new_tokens)
    with (
      open(progress, "a") as log,
      tqdm.tqdm(total=len(names), initial=len(names) - len(todo), unit="class", desc=file_name) as bar,
    ):
      for start in range(0, len(todo), args.batch_size):
        batch = todo[start : start + args.batch_size]
        for name, answer in zip(batch, writer.answer(batch)):
          done[name] = descriptors_from_answer(answer, args.max_descriptors)
          log.write(json.dumps({"class": name, "descriptors": done[name], "answer": answer}) + "\n")
        log.flush()
        bar.update(len(batch))
  records.write_json(path, {n: done[n] for n in names})
  empty = [n for n in names if not done[n]]
  print(f"{path}: {len(names)} classes" + (f", {len(empty)} without descriptors: {empty[:10]}" if empty else ""))
  return path
