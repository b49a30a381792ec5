#!/usr/bin/env bash
# Fresh-machine main job: set up .venv, then compile and verify all-MiniLM-L6-v2 (the packaged
# default) into ./bert-compile-out. Extra arguments go to `bert-compile run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/bert-compile run --out bert-compile-out "$@"
echo "engine:  bert-compile-out/engines/onnxruntime-cpu-fp32/model.onnx (+ manifest.json)" >&2
echo "report:  bert-compile-out/verify/onnxruntime-cpu-fp32/report.json; summary: bert-compile-out/run.json" >&2
