"""Every `python -m grain_jax.main` command in README.md, docs/scale_and_launch.md and the config
files' headers, launched directly or through a launch script, passes `validate` as the run would call
it (descriptor files included when it evaluates). Folders under the bucket's or cluster's mount
(/gcs/..., /shared/...) are placeholders: a descriptors folder there stands for one holding every file
the config reads."""

import json
import pathlib
import re
import shlex
import subprocess

import pytest

from grain_jax.config import apply_overrides, load_config, parse_arm, validate
from grain_jax.eval import datasets

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "scale_and_launch.md", *sorted((ROOT / "configs").glob("*.py"))]
# How each kind of command starts; the launch scripts pass the words after `--` on to grain_jax.main.
STARTS = ("python -m grain_jax.main ", "launch/tpu_pod.sh up ", "launch/gke_xpk.sh run ", "launch/slurm_gpu.sh ")
PLACEHOLDER = re.compile(r"^/(gcs|shared)/")


def documented_commands() -> list[tuple[str, str]]:
  """(document, command) of every command in the documents, continuation lines joined."""
  found = []
  for document in DOCUMENTS:
    text = document.read_text().replace("\\\n", " ")
    for line in text.splitlines():
      line = " ".join(line.split())
      if line.startswith(STARTS):
        found.append((document.name, line))
  return found


def main_arguments(command: str) -> list[str]:
  """The arguments grain_jax.main gets from `command` (a launch script's as its --dry-run prints them)."""
  words = shlex.split(command)
  if words[:3] == ["python", "-m", "grain_jax.main"]:
    return words[3:]
  end = words.index("--")
  result = subprocess.run(["bash", *words[:end], "--dry-run", *words[end:]], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
  for line in result.stdout.splitlines():
    for i, word in enumerate(shlex.split(line)):
      if word == "launch/slurm_gpu.sbatch":  # the batch script runs grain_jax.main with its arguments
        return shlex.split(line)[i + 1:]
      if "-m grain_jax.main " in word:
        return shlex.split(word.split("-m grain_jax.main ", 1)[1])
  raise AssertionError(f"{command!r} runs no grain_jax.main:\n{result.stdout}")


def parsed(arguments: list[str]) -> tuple[str, str, dict]:
  """(config spec, mode, overrides) of grain_jax.main's arguments, the overrides typed as arms' are."""
  spec, mode, items = None, "train", []
  for i, word in enumerate(arguments):
    if word.startswith("--config."):
      items.append(word[len("--config."):])
    elif word in ("--config", "--mode"):
      spec, mode = (arguments[i + 1], mode) if word == "--config" else (spec, arguments[i + 1])
  return spec, mode, parse_arm("command: " + "; ".join(items))[1]


def descriptors_folder(config, folder: pathlib.Path) -> str:
  """`folder` filled with the descriptor file of every registry set in `config.eval.classification`
  (ImageNet's keyed by its classes' first WordNet names in label order, numbered where two share one)."""
  folder.mkdir(exist_ok=True)
  for name in config.eval.classification:
    spec = datasets.spec_of(name)
    if spec is not None:
      names = datasets.registry_class_names(name)
      if spec.wnid_labels:
        first = [names[0] for names in datasets.wnid_class_names()]
        names = [n if first.count(n) == 1 else f"{n} {i}" for i, n in enumerate(first)]
      (folder / spec.descriptors_file).write_text(json.dumps({n: [f"a feature of {n}"] for n in names}))
  return str(folder)


def places365_download(folder: pathlib.Path) -> str:
  """`folder` laid out as torchvision's Places365 download, which `places365:full` reads."""
  (folder / "val_large").mkdir(parents=True)
  (folder / "categories_places365.txt").write_text("/a/airfield 0\n")
  (folder / "places365_val.txt").write_text("")
  return str(folder)


COMMANDS = documented_commands()


def test_the_recipe_commands_are_found():
  commands = " ".join(command for _, command in COMMANDS)
  assert all(start in commands for start in STARTS)
  assert {"cc3m_b16.py", "cc12m_b16.py"} <= {document for document, _ in COMMANDS}


@pytest.mark.parametrize("document, command", COMMANDS, ids=[f"{d}: {c[:70]}" for d, c in COMMANDS])
def test_a_documented_command_passes_validation(document, command, tmp_path):
  pytest.importorskip("tensorflow_datasets")  # the id-labelled sets' class counts come from tfds's builder info
  spec, mode, overrides = parsed(main_arguments(command))
  assert spec, f"{document}: {command!r} gives no --config"
  path, colon, arg = spec.partition(":")
  config = apply_overrides(load_config(f"{ROOT / path}{colon}{arg}"), overrides, f"{document}: {command}")
  evaluates = mode == "eval" or (mode == "train" and config.experiment.evaluate)
  if evaluates and PLACEHOLDER.match(config.eval.descriptors_dir):
    with config.unlocked():
      config.eval.descriptors_dir = descriptors_folder(config, tmp_path / "descriptors")
  if evaluates and PLACEHOLDER.match(config.eval.places365_dir):
    with config.unlocked():
      config.eval.places365_dir = places365_download(tmp_path / "places365")
  arms = [parse_arm(entry) for entry in config.experiment.arms] if mode == "train" else []
  for name, arm_overrides in arms or [("", {})]:
    validate(apply_overrides(config, arm_overrides, f"{document}: arm {name}"), evaluation_files=evaluates)
