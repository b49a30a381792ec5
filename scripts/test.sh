#!/usr/bin/env bash
# Fresh-machine test command: set up .venv, lint, type-check the TensorRT backend, then run the
# whole suite (about 3 minutes on 2 cores). Extra arguments go to pytest, e.g.
# scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --triton-server
.venv/bin/ruff check .
# Type-checks the TensorRT backend against the TensorRT API stubs (pyproject.toml [tool.mypy]):
# TensorRT cannot run here, so this is what catches a misused TensorRT API before a GPU does.
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
