"""Every command documented in README.md, docs/*.md and the config files' headers is checked as far as
that can be done without running it:

- `python -m grain_jax.main ...`, given directly or through a launch script (whose --dry-run prints what
  it would start): parsed by grain_jax.main's own flags, its config file and `--config.*` overrides loaded
  as the run loads them (ml_collections' config flag), main's argument rules applied, and the config
  (every setting x arm of a comparison) validated as the run validates it, descriptor files included
  when it evaluates. Folders under the bucket's or cluster's mount (/gcs/..., /shared/...) are
  placeholders: a descriptors folder there stands for one holding every file the config reads.
- the other tools (`python -m grain_jax.data.convert`, `grain_jax.annotate`, `grain_jax.bench`): their
  arguments parsed by the tool's own parser, and every `--config` file of a benchmark loaded.
- the launch scripts: run with --dry-run, which must succeed (`launch/install.sh`, which has none: its
  argument must be one it takes).
- `pip install -r FILE`: FILE exists; `pytest -m MARKER`: the marker is declared.
- Python code blocks compile and import only names that exist.

In markdown a command is a line of a fenced code block (continuation lines joined), or an inline code
span that starts with `python -m grain_jax.` and has a flag; in configs/*.py, a line of the header that
starts with `python -m grain_jax.` or `launch/`. Other tools' commands (gcloud, docker, tfds, xpk) are
not checked. Every markdown link to a file of the repository must name one that exists, and its
`#anchor` a heading of that file.
"""

import argparse
import ast
import copy
import importlib
import json
import pathlib
import re
import shlex
import subprocess
import tomllib

import pytest
from absl import flags
from ml_collections import config_flags

from grain_jax import errors, files
from grain_jax import main as grain_main
from grain_jax.config import apply_overrides, load_config, parse_arm, validate
from grain_jax.eval import datasets

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))
# How each command that starts a training run begins; the launch scripts pass the words after `--` on
# to grain_jax.main.
STARTS = (
  "python -m grain_jax.main ",
  "launch/tpu_pod.sh up ",
  "launch/gke_xpk.sh run ",
  "launch/slurm_gpu.sh ",
  "launch/local_multiprocess.sh ",
)
PLACEHOLDER = re.compile(r"^/(gcs|shared)/")
FENCE = re.compile(r"^```\s*(\S*)\s*$")
SHELL = ("", "bash", "sh", "shell")
INLINE = re.compile(r"`(python -m grain_jax\.[^`]* --[^`]*)`")
ENVIRONMENT = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# The flags grain_jax.main defines, copied into a fresh set for each command.
MAIN_FLAGS = flags.FLAGS.flags_by_module_dict()[grain_main.__name__]
# ml_collections' config flag loads a config file with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
  """(language, body) of every fenced code block of a markdown text."""
  blocks, language, body = [], None, []
  for line in text.splitlines():
    match = FENCE.match(line.strip())
    if match and language is None:
      language, body = match[1], []
    elif match and not match[1]:
      blocks.append((language, "\n".join(body)))
      language = None
    elif language is not None:
      body.append(line)
  return blocks


def outside_blocks(text: str) -> str:
  """A markdown text without its fenced code blocks."""
  kept, inside = [], False
  for line in text.splitlines():
    if FENCE.match(line.strip()):
      inside = not inside
    elif not inside:
      kept.append(line)
  return "\n".join(kept)


def commands_of(path: pathlib.Path) -> list[str]:
  """The commands `path` documents, each on one line."""
  if path.suffix == ".py":
    text = path.read_text().replace("\\\n", " ")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return [line for line in lines if line.startswith(("python -m grain_jax.", "launch/"))]
  text = path.read_text()
  found = []
  for language, body in fenced_blocks(text):
    if language in SHELL:
      found += [
        " ".join(line.split())
        for line in body.replace("\\\n", " ").splitlines()
        if line.strip() and not line.strip().startswith("#")
      ]
  found += [" ".join(span.split()) for span in INLINE.findall(outside_blocks(text))]
  return found


def words_of(command: str) -> list[str]:
  """The command's words, without a trailing comment and leading environment assignments."""
  words = shlex.split(command, comments=True)
  while words and ENVIRONMENT.fullmatch(words[0]):
    words.pop(0)
  return words


def checked(command: str) -> bool:
  """Whether `command` is one of the kinds this test checks (not another tool's); one of ours that
  does not split into words (an unclosed quote) is, and fails."""
  try:
    words = words_of(command)
  except ValueError:
    return command.startswith(("python -m grain_jax", "launch/", "pip install -r", "pytest"))
  return bool(words) and (
    words[:2] == ["python", "-m"]
    and words[2].startswith("grain_jax")
    or words[0].startswith("launch/")
    or words[:3] == ["pip", "install", "-r"]
    or words[0] == "pytest"
  )


def documented_commands() -> list[tuple[str, str]]:
  """(document, command) of every command the test checks, in every document."""
  return [
    (str(path.relative_to(ROOT)), command)
    for path in [*MARKDOWN, *CONFIG_FILES]
    for command in commands_of(path)
    if checked(command)
  ]


def launcher_main_arguments(words: list[str]) -> list[str] | None:
  """Runs a launch script with --dry-run (which must succeed); the arguments grain_jax.main gets from it,
  or None when it starts no run."""
  script = words[0]
  if script == "launch/install.sh":
    usage = re.search(r"launch/install\.sh (\S+)", (ROOT / script).read_text())[1].split("|")
    assert words[1:] and words[1] in usage, f"{script} takes one of {usage}, got {words[1:]}"
    return None
  assert "--dry-run)" in (ROOT / script).read_text(), f"{script} has no --dry-run to check it by"
  end = words.index("--") if "--" in words else len(words)
  result = subprocess.run(
    ["bash", *words[:end], "--dry-run", *words[end:]], capture_output=True, text=True, cwd=ROOT, timeout=60
  )
  assert result.returncode == 0, f"{' '.join(words)} --dry-run failed:\n{result.stdout}\n{result.stderr}"
  if end == len(words):
    return None
  for line in result.stdout.splitlines():
    line_words = shlex.split(line)
    for i, word in enumerate(line_words):
      if word == "launch/slurm_gpu.sbatch":  # the batch script runs grain_jax.main with its arguments
        return line_words[i + 1 :]
      if line_words[i : i + 2] == ["-m", "grain_jax.main"]:
        return line_words[i + 2 :]
      if "-m grain_jax.main " in word:
        return shlex.split(word.split("-m grain_jax.main ", 1)[1])
  raise AssertionError(f"{' '.join(words)} runs no grain_jax.main:\n{result.stdout}")


def parsed_main_flags(arguments: list[str]) -> flags.FlagValues:
  """grain_jax.main's flags parsed from `arguments` as the command line parses them (relative paths
  from the current directory)."""
  grain_main.check_config_flags(arguments)
  values = flags.FlagValues()
  for flag in MAIN_FLAGS:
    if flag.name != "config":
      values[flag.name] = copy.deepcopy(flag)
  config_flags.DEFINE_config_file(
    "config", None, "Config file, path.py[:arg].", flag_values=values, lock_config=True, sys_argv=["python", *arguments]
  )
  unparsed = values(["python", *arguments])
  assert unparsed == ["python"], f"arguments grain_jax.main does not take: {unparsed[1:]}"
  return values


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
  (folder / "val_large").mkdir(parents=True, exist_ok=True)
  (folder / "categories_places365.txt").write_text("/a/airfield 0\n")
  (folder / "places365_val.txt").write_text("")
  return str(folder)


def check_main(arguments: list[str], where: str, tmp_path: pathlib.Path) -> None:
  """What grain_jax.main checks before it runs, and the validation of every config it would run."""
  values = parsed_main_flags(arguments)
  mode, workdir, output_dir = values.mode, values.workdir, values["output-dir"].value
  assert workdir, f"{where}: no --workdir"
  files.check_location(workdir, "--workdir")
  files.check_location(output_dir, "--output-dir")
  assert not (output_dir and mode == "train"), f"{where}: --output-dir is for --mode eval and export"
  config = values.config.copy_and_resolve_references()
  experiment = config.experiment
  evaluates = mode == "eval" or (mode == "train" and experiment.evaluate)
  with config.unlocked():
    if evaluates and PLACEHOLDER.match(config.eval.descriptors_dir):
      config.eval.descriptors_dir = descriptors_folder(config, tmp_path / "descriptors")
    if evaluates and PLACEHOLDER.match(config.eval.places365_dir):
      config.eval.places365_dir = places365_download(tmp_path / "places365")
  if mode != "train" or not experiment.arms:
    assert mode != "train" or not (experiment.worlds or experiment.settings), f"{where}: worlds/settings without arms"
    validate(config, evaluation_files=evaluates)
    return
  assert experiment.evaluate, f"{where}: a comparison (experiment.arms) must evaluate"
  arms = [parse_arm(entry) for entry in experiment.arms]
  settings = [parse_arm(entry, "settings") for entry in experiment.settings] or [("", {})]
  for setting, setting_overrides in settings:
    for name, overrides in arms:
      validate(
        apply_overrides(config, {**setting_overrides, **overrides}, f"{where}: {setting} {name}"), evaluation_files=True
      )


class Parsed(BaseException):
  """Raised by a tool's argument parser once its arguments parsed, before the tool runs."""


def check_tool(module: str, arguments: list[str], monkeypatch) -> None:
  """`python -m MODULE ARGUMENTS`: the arguments parsed by the tool's own parser (and its checks of
  them); a benchmark's --config files loaded."""
  if module == "grain_jax.data.convert":
    importlib.import_module(module).parse_args(arguments)
  elif module == "grain_jax.annotate" and arguments[:1] == ["descriptors"]:
    importlib.import_module("grain_jax.annotate.descriptors").parse_args(arguments[1:])
  elif module == "grain_jax.annotate":
    importlib.import_module("grain_jax.annotate.__main__").parse_args(arguments)
  elif module == "grain_jax.bench":
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(parser, args=None, namespace=None):
      raise Parsed(parse_args(parser, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    with pytest.raises(Parsed) as stopped:
      importlib.import_module("grain_jax.bench.__main__").main(["bench", *arguments])
    config = getattr(stopped.value.args[0], "config", None)
    for spec in [config] if isinstance(config, str) else config or []:
      load_config(spec)
  else:
    raise AssertionError(f"no check for `python -m {module}`: add one to this test")


def check_command(document: str, command: str, tmp_path: pathlib.Path, monkeypatch) -> None:
  monkeypatch.chdir(ROOT)
  words = words_of(command)
  where = f"{document}: {command}"
  if words[0] == "pytest":
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    if "-m" in words:
      assert words[words.index("-m") + 1] in {m.split(":")[0] for m in markers}, where
  elif words[:3] == ["pip", "install", "-r"]:
    for i, word in enumerate(words):
      if word == "-r":
        assert (ROOT / words[i + 1]).is_file(), f"{where}: no {words[i + 1]}"
  elif words[0].startswith("launch/"):
    arguments = launcher_main_arguments(words)
    if arguments is not None:
      check_main(arguments, where, tmp_path)
  elif words[2] == "grain_jax.main":
    check_main(words[3:], where, tmp_path)
  else:
    check_tool(words[2], words[3:], monkeypatch)


COMMANDS = documented_commands()


def test_the_commands_are_found():
  commands = " ".join(command for _, command in COMMANDS)
  assert all(start in commands for start in STARTS)
  documents = {document for document, _ in COMMANDS}
  assert {"README.md", "configs/cc3m_b16.py", "configs/cc12m_b16.py", "docs/authors_differences.md"} <= documents
  assert any("--config.experiment.arms=" in command for _, command in COMMANDS)


@pytest.mark.parametrize("document, command", COMMANDS, ids=[f"{d}: {c[:70]}" for d, c in COMMANDS])
def test_a_documented_command_is_valid(document, command, tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")  # the id-labelled sets' class counts come from tfds's builder info
  try:
    check_command(document, command, tmp_path, monkeypatch)
  except (*errors.USER_ERRORS, ValueError, SystemExit) as error:
    raise AssertionError(f"{document}: {command}\n{type(error).__name__}: {error}") from error


# What the extras install (requirements-export.txt, requirements-annotate.txt): a block using one of these
# runs with the extras' tests (`pytest -m extras`).
EXTRA_PACKAGES = ("torch", "safetensors", "transformers", "tokenizers", "huggingface_hub")


def python_blocks() -> list:
  """(document, code) of every python block, marked `extras` when it imports an extra's package."""
  blocks = []
  for path in MARKDOWN:
    for language, body in fenced_blocks(path.read_text()):
      if language == "python":
        imported = {
          alias.name.split(".")[0]
          for node in ast.walk(ast.parse(body))
          if isinstance(node, ast.Import)
          for alias in node.names
        }
        marks = [pytest.mark.extras] if imported & set(EXTRA_PACKAGES) else []
        blocks.append(pytest.param(str(path.relative_to(ROOT)), body, marks=marks))
  return blocks


@pytest.mark.parametrize("document, code", python_blocks())
def test_a_documented_python_block_imports_what_exists(document, code):
  tree = ast.parse(code, document)
  for node in ast.walk(tree):  # a block for an extra (torch, ...) skips without it, as its modules need it
    if isinstance(node, ast.Import):
      for alias in node.names:
        if not alias.name.startswith("grain_jax"):
          pytest.importorskip(
            alias.name.split(".")[0],
            reason=f"{document}'s block needs {alias.name}, which that document says how to install",
          )
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module.startswith("grain_jax"):
      module = importlib.import_module(node.module)
      missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
      assert not missing, f"{document}: {node.module} has no {missing}"
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("grain_jax"):
          importlib.import_module(alias.name)


def anchors(path: pathlib.Path) -> set[str]:
  """The anchors GitHub makes of the headings of a markdown file."""
  found, seen = set(), {}
  for line in outside_blocks(path.read_text()).splitlines():
    match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if match:
      slug = re.sub(r"[^\w\- ]", "", match[1].lower()).replace(" ", "-")
      count = seen.get(slug, 0)
      seen[slug] = count + 1
      found.add(slug if count == 0 else f"{slug}-{count}")
  return found


def test_every_link_names_an_existing_file_and_heading():
  broken = []
  for path in MARKDOWN:
    for target in LINK.findall(outside_blocks(path.read_text())):
      if re.match(r"[a-z]+:", target):
        continue  # a web address
      file, _, anchor = target.partition("#")
      linked = (path.parent / file).resolve() if file else path
      if not linked.exists():
        broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, broken
