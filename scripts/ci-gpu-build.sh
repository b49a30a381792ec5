#!/usr/bin/env bash
# The GPU CI runner's job: check the machine, build and verify every engine the config asks for,
# package them for Triton and gate the repository. Exit status is bert-compile's (README: exit
# codes), so a parity failure (5) or a missing backend (6) fails the job.
#   scripts/ci-gpu-build.sh CONFIG.toml [OUT]
# Machine-readable results land in OUT/ci/: doctor.json, run.json, gate.json.
set -euo pipefail
config=${1:?usage: scripts/ci-gpu-build.sh CONFIG.toml [OUT]}
out=${2:-bert-compile-out}
target=${BERT_COMPILE_TARGET:-auto}
mkdir -p "$out/ci"
last_json() { tail -n 1; }

bert-compile doctor --out "$out" --target "$target" --json | last_json > "$out/ci/doctor.json"
bert-compile run --config "$config" --out "$out" --target "$target" --json \
  | last_json > "$out/ci/run.json"
bert-compile verify --config "$config" --out "$out" --repository "$out/triton" --json \
  | last_json > "$out/ci/gate.json"
echo "ci: engines, reports and the Triton repository are in $out (summaries in $out/ci)" >&2
