"""Dispatches `python -m grain_jax.bench <name> ...` to `grain_jax.bench.<name>.main(argv)`."""

import importlib
import pkgutil
import sys

import grain_jax.bench as bench_package


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(bench_package.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
  names = available()
  usage = (
    f"usage: python -m grain_jax.bench {{{'|'.join(names)}}} [flags]\n"
    "  python -m grain_jax.bench NAME --help describes a benchmark's flags"
  )
  if len(argv) == 2 and argv[1] in ("-h", "--help"):
    print(usage)
    return 0
  if len(argv) < 2 or argv[1] not in names:
    print(usage, file=sys.stderr)
    return 2
  module = importlib.import_module(f"grain_jax.bench.{argv[1]}")
  return module.main(argv[2:]) or 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
