#!/usr/bin/env bash
# The GPU CI runner's job: check the machine, build and verify every engine the config asks for,
# package them for Triton and gate the repository. Exit status is bert-compile's (docs/guides/ci.md: exit
# codes), so a parity failure (5) or a missing backend (6) fails the job.
#   scripts/ci-gpu-build.sh CONFIG.toml [OUT]
# Machine-readable results land in OUT/ci/: doctor.json, run.json, gate.json.
set -euo pipefail
config=${1:?usage: scripts/ci-gpu-build.sh CONFIG.toml [OUT]}
out=${2:-bert-compile-out}
target=${BERT_COMPILE_TARGET:-auto}
last_json() { tail -n 1; }
# bert-compile writes only into an empty folder or one that carries its marker
# (bert_compiler/core/outdir.py).
# This script is bert-compile's own entry point: a new OUT gets the marker here, so the summaries
# can go into OUT/ci from the first step on; an existing folder without it is left to `run` to
# refuse, and the summaries then stay out of it.
if [ ! -e "$out" ]; then
  mkdir -p "$out"
  printf '{"tool": "bert-compiler", "created_by": "scripts/ci-gpu-build.sh"}\n' \
    > "$out/.bert-compile.json"
fi
summaries=$(mktemp -d)
collect() {
  if [ -f "$out/.bert-compile.json" ]; then
    mkdir -p "$out/ci" && cp "$summaries"/*.json "$out/ci/" 2>/dev/null || true
  fi
  rm -rf "$summaries"
}
trap collect EXIT

bert-compile doctor --out "$out" --target "$target" --json | last_json > "$summaries/doctor.json"
bert-compile run --config "$config" --out "$out" --target "$target" --json \
  | last_json > "$summaries/run.json"
bert-compile verify --config "$config" --out "$out" --repository "$out/triton" --json \
  | last_json > "$summaries/gate.json"
echo "ci: engines, reports and the Triton repository are in $out (summaries in $out/ci)" >&2
