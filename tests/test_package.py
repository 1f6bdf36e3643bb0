"""The package installs what it imports, its config files stand alone, and its layers import downwards.

Read from the source with `ast` (nothing is installed or imported): a wheel built in a fresh virtual
environment would say the same about dependencies, in minutes instead of a second.
"""

import ast
import pathlib
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPOSITORY / "grain_jax"
# Import names that differ from the distribution's name.
DISTRIBUTIONS = {
  "PIL": "pillow",
  "absl": "absl-py",
  "orbax": "orbax-checkpoint",
  "tensorflow_datasets": "tensorflow-datasets",
}
# Modules that exist only for an extra: they may import its packages at their top.
EXTRA_MODULES = {"export/torch_modules.py": "export", "bench/_reference_step.py": "export"}
# The extras and the requirements file that pins each.
PIN_FILES = {
  None: "requirements.txt",
  "export": "requirements-export.txt",
  "annotate": "requirements-annotate.txt",
  "test": "requirements.txt",
}
# Subpackages and modules of grain_jax, lowest first: each imports only from those before it.
LAYERS = (
  "errors",
  "hardware",
  "processes",
  "files",
  "checksums",
  "sharding",
  "ops",
  "data",
  "models",
  "losses",
  "torch_format",
  "eval",
  "config",
  "train",
  "export",
  "experiment",
  "annotate",
  "bench",
  "main",
)


def _project() -> dict:
  return tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]


def _declared() -> dict[str | None, dict[str, Requirement]]:
  """`{None: runtime requirements, extra: its requirements}`, each by canonical distribution name."""
  project = _project()
  groups = {None: project["dependencies"], **project["optional-dependencies"]}
  return {
    group: {canonicalize_name(Requirement(line).name): Requirement(line) for line in lines}
    for group, lines in groups.items()
  }


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
  """`(top-level module, imported at the module's top)` for every absolute import in `path`."""
  tree = ast.parse(path.read_text(), str(path))
  top = {id(node) for node in tree.body}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name.split(".")[0], id(node) in top) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      found.append((node.module.split(".")[0], id(node) in top))
  return found


def _distribution(module: str) -> str:
  return canonicalize_name(DISTRIBUTIONS.get(module, module))


def _third_party_imports() -> list[tuple[str, str, bool]]:
  """`(file relative to grain_jax/, distribution, at the module's top)` for every non-stdlib import."""
  return [
    (str(path.relative_to(PACKAGE)), _distribution(module), at_top)
    for path in sorted(PACKAGE.rglob("*.py"))
    for module, at_top in _imports(path)
    if module not in sys.stdlib_module_names and module != "grain_jax"
  ]


def _pins(file: str) -> dict[str, str]:
  pins = {}
  for line in (REPOSITORY / file).read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
      name, _, version = line.partition("==")
      assert version, f"{file}: {line!r} is not an exact pin"
      pins[canonicalize_name(name)] = version
  return pins


def test_every_import_is_declared():
  """Imported at a module's top: a runtime dependency (or its extra's, in a module only that extra
  uses); imported inside a function: a runtime or an extra's dependency."""
  declared = _declared()
  anywhere = set().union(*declared.values())
  missing = []
  for file, distribution, at_top in _third_party_imports():
    allowed = set(declared[None])
    if file in EXTRA_MODULES:
      allowed |= set(declared[EXTRA_MODULES[file]])
    elif not at_top:
      allowed = anywhere
    if distribution not in allowed:
      missing.append(f"{file}: {distribution}")
  assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_runtime_dependencies_leave_out_the_test_runner():
  assert "pytest" not in _declared()[None]
  assert "pytest" in _declared()["test"]


def test_python_version_admits_the_tested_one():
  assert _project()["requires-python"] == ">=3.11"


@pytest.mark.parametrize("group", list(PIN_FILES))
def test_pins_satisfy_the_declared_lower_bounds(group):
  pins = _pins(PIN_FILES[group])
  for name, requirement in _declared()[group].items():
    assert name in pins, f"{requirement} is declared but {PIN_FILES[group]} pins no version of it"
    assert requirement.specifier.contains(pins[name]), (
      f"{PIN_FILES[group]} pins {name}=={pins[name]} outside {requirement}"
    )
    assert any(spec.operator == ">=" for spec in requirement.specifier), f"{requirement} has no lower bound"


def test_config_files_import_grain_jax_and_no_configs_package():
  assert not (REPOSITORY / "configs" / "__init__.py").exists(), "configs/ is a folder of files, not a package"
  files = sorted((REPOSITORY / "configs").glob("*.py"))
  assert files
  for path in files:
    tree = ast.parse(path.read_text(), str(path))
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree)), path.name
    modules = {module for module, _ in _imports(path)}
    assert "configs" not in modules, f"configs/{path.name} imports the configs folder as a package"
    assert modules <= set(sys.stdlib_module_names) | {"grain_jax", "ml_collections"}, (path.name, modules)


def _layer(path: pathlib.Path) -> str:
  return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_layers_import_only_from_below():
  upward = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name == "__init__.py" and path.parent == PACKAGE:
      continue
    layer = _layer(path)
    assert layer in LAYERS, f"grain_jax.{layer} has no place in LAYERS of {__file__}"
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [f"{node.module}.{alias.name}" for alias in node.names]
      else:
        names = []
      for name in names:
        parts = name.split(".")
        if parts[0] == "grain_jax" and parts[1] != layer and parts[1] in LAYERS:
          if LAYERS.index(parts[1]) > LAYERS.index(layer):
            upward.append(f"{path.relative_to(REPOSITORY)} imports grain_jax.{parts[1]}")
  assert not upward, upward


def _exported(package: pathlib.Path) -> list[str]:
  """The names a package's `__init__.py` lists in `__all__`."""
  init = package / "__init__.py"
  for node in ast.parse(init.read_text()).body if init.is_file() else []:
    if isinstance(node, ast.Assign) and any(getattr(target, "id", "") == "__all__" for target in node.targets):
      return list(ast.literal_eval(node.value))
  return []


def _names_a_missing_module(dotted: str) -> bool:
  """Whether `grain_jax.a.b...` runs into a name that is neither a subpackage, a module nor a name the
  package exports before it reaches a module (after a module come its attributes)."""
  path = REPOSITORY
  for part in dotted.split("."):
    if (path / part).is_dir():
      path = path / part
    else:
      return not ((path / f"{part}.py").is_file() or part in _exported(path))
  return False


def test_code_and_documents_name_existing_modules():
  texts = [
    *PACKAGE.rglob("*.py"),
    *PACKAGE.rglob("*.md"),
    *REPOSITORY.glob("*.md"),
    *REPOSITORY.glob("docs/*.md"),
    *REPOSITORY.glob("configs/*.py"),
    *REPOSITORY.glob("launch/*"),
  ]
  dangling = []
  for path in sorted(texts):
    text = path.read_text()
    dangling += [
      f"{path.relative_to(REPOSITORY)}: {name}"
      for name in re.findall(r"\bgrain_jax(?:\.[a-z_]+)+", text)
      if _names_a_missing_module(name)
    ]
    files = re.findall(r"\b(?:grain_jax|configs)/[\w/]+\.py\b", text)
    dangling += [f"{path.relative_to(REPOSITORY)}: {name}" for name in files if not (REPOSITORY / name).is_file()]
  assert not dangling, dangling
