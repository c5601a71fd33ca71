#!/usr/bin/env bash
# The test command: makes sure the environments are set up, then runs the test suite.
# Extra arguments go to pytest (e.g. `-m slow`, `-k parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
