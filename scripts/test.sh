#!/usr/bin/env bash
# Fresh-machine test command: set up .venv, lint, then run the whole suite (about 3 minutes on 2
# cores). Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --triton-server
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
