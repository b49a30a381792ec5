#!/usr/bin/env bash
# Fresh-machine test command: set up .venv, lint, type-check the TensorRT backend, then run
# pytest; extra arguments go to pytest. Every test is in one tier (tests/conftest.py): unit
# (exports no model), e2e (the CLI and the pipeline end to end on tiny models) or slow (the real
# default model). Measured on 2 cores with .venv in place: the whole suite 3 to 4 minutes on a quiet
# machine, 6.5 minutes with other jobs on the cores;
# the fast loop, scripts/test.sh -m unit, about 30 seconds (16 of them pytest; the rest is the
# setup check, ruff and mypy).
# --mutants instead runs the mutation check (scripts/mutants.py: named bugs planted one at a time,
# each must fail its tests; docs/mutants.md), not part of every CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --triton-server
if [ "${1:-}" = --mutants ]; then
  shift
  exec .venv/bin/python scripts/mutants.py "$@"
fi
.venv/bin/ruff check .
# Type-checks the package (pyproject.toml [tool.mypy]), the TensorRT backend strictly against
# the TensorRT API stubs: TensorRT cannot run here, so this is what catches a misused TensorRT
# API before a GPU does.
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
