#!/usr/bin/env bash
# The test command: makes sure the environments are set up, then runs the test suite.
# Extra arguments go to pytest (e.g. `-m slow`, `-k parity`). Tests run in TEST_WORKERS
# processes (default 2, pytest-xdist; 1 runs them in this process): most of their time is
# XLA compiling programs, one core each (2 cores: 14.5 min against 22.8 min in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${TEST_WORKERS:-2}
if [ "$workers" = 1 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist worksteal "$@"
