"""Every command line: flags spelled with hyphens, each with help, and `--help` exits 0."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

from grain_jax.bench import __main__ as bench_cli

pytestmark = pytest.mark.integration

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "grain_jax"
# absl's definitions; `config` is the config file, whose fields (`--config.train.num_steps`) keep their names.
ABSL_DEFINES = {
  "DEFINE_string",
  "DEFINE_bool",
  "DEFINE_boolean",
  "DEFINE_integer",
  "DEFINE_float",
  "DEFINE_enum",
  "DEFINE_list",
  "DEFINE_multi_string",
  "DEFINE_config_file",
}
# Entry points whose parser is built by a function taking argv.
ARGPARSE_ENTRY_POINTS = [
  "grain_jax.annotate.__main__:parse_args",
  "grain_jax.annotate.descriptors:parse_args",
  "grain_jax.data.convert:parse_args",
  *(f"grain_jax.bench.{name}:main" for name in bench_cli.available()),
]


def _flag_definitions() -> list[tuple[str, str, ast.Call]]:
  """`(file, flag name, call)` of every argparse `add_argument` and absl `DEFINE_*` in the package."""
  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        continue
      names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
      if node.func.attr == "add_argument":
        found += [(path.name, name, node) for name in names if name.startswith("-")]
      elif node.func.attr in ABSL_DEFINES and names:
        found.append((path.name, "--" + names[0], node))
  return found


def _help(call: ast.Call) -> ast.expr | None:
  keyword = next((k.value for k in call.keywords if k.arg == "help"), None)
  if keyword is None and isinstance(call.func, ast.Attribute) and call.func.attr.startswith("DEFINE_"):
    # absl: DEFINE_x(name, default, help) or DEFINE_enum(name, default, choices, help).
    position = 3 if call.func.attr == "DEFINE_enum" else 2
    keyword = call.args[position] if len(call.args) > position else None
  return keyword


def test_flags_are_hyphenated_and_have_help():
  definitions = _flag_definitions()
  assert len(definitions) > 40
  underscored = [f"{file}: {name}" for file, name, _ in definitions if "_" in name]
  assert not underscored, f"flags are spelled with hyphens: {underscored}"
  silent = [
    f"{file}: {name}"
    for file, name, call in definitions
    if not isinstance(_help(call), (ast.Constant, ast.JoinedStr, ast.Attribute, ast.BinOp))
    or isinstance(_help(call), ast.Constant)
    and not _help(call).value
  ]
  assert not silent, f"flags without help: {silent}"


@pytest.mark.parametrize("entry_point", ARGPARSE_ENTRY_POINTS)
def test_help_exits_zero(entry_point, capsys):
  module, _, function = entry_point.partition(":")
  with pytest.raises(SystemExit) as stop:
    getattr(importlib.import_module(module), function)(["--help"])
  assert stop.value.code == 0
  assert "--" in capsys.readouterr().out


def test_bench_help_lists_the_benchmarks(capsys):
  assert bench_cli.main(["python -m grain_jax.bench", "--help"]) == 0
  usage = capsys.readouterr().out
  assert all(name in usage for name in bench_cli.available())
  assert bench_cli.main(["python -m grain_jax.bench"]) == 2


def test_main_help_exits_zero():
  result = subprocess.run(
    [sys.executable, "-m", "grain_jax.main", "--help"],
    capture_output=True,
    text=True,
    cwd=PACKAGE.parent,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  assert "export-module-prefix" in result.stdout
