#!/usr/bin/env bash
# Installs the project's pinned requirements into .venv with the jax extra of the accelerator:
#
#   launch/install.sh tpu|cuda12|cpu
#
# Python 3.11 comes from uv (TPU VM and many cluster images ship an older python3), so every
# machine of a job gets the same interpreter and pins. Run it on every host from the repository root.
set -euo pipefail

extra="${1:-}"
case "$extra" in
  tpu | cuda12) jax_pin="jax[$extra]==$(sed -n 's/^jax==//p' requirements.txt)" ;;
  cpu) jax_pin="" ;;
  *) echo "usage: launch/install.sh tpu|cuda12|cpu (got '$extra')" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
if ! command -v uv >/dev/null; then
  python3 -m pip install --user --quiet uv
  export PATH="$HOME/.local/bin:$PATH"
fi
[[ -x .venv/bin/python ]] || uv venv --python 3.11 .venv
# shellcheck disable=SC2086  # jax_pin is empty or one word
uv pip install --python .venv/bin/python -r requirements.txt $jax_pin
.venv/bin/python -c "import jax; print(\"installed jax\", jax.__version__)"
