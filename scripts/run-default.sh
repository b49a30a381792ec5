#!/usr/bin/env bash
# Fresh-machine main job: set up .venv, then compile and verify all-MiniLM-L6-v2 (the packaged
# default) into ./bert-compile-out: GPU engines where this machine has a GPU backend, otherwise the
# CPU engine (--target auto). Extra arguments go to `bert-compile run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/bert-compile run --out bert-compile-out "$@"
# `run` itself has printed the summary and the Triton repository paths; MODEL is
# all-MiniLM-L6-v2 unless --model was given.
echo "engines: bert-compile-out/engines/MODEL/*/ (each with its manifest.json)" >&2
echo "reports: bert-compile-out/verify/MODEL/*/report.json" >&2
