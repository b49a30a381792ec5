"""Every module imports on a CPU machine without pulling heavy or GPU-only packages."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import calibration
import engines
import pipeline

MODULES = sorted(
    f"{package.__name__}.{info.name}"
    for package in (pipeline, engines, calibration)
    for info in pkgutil.iter_modules(package.__path__)
)


def test_every_module_imports_lazily():
    assert "engines.onnxruntime" in MODULES and "pipeline.cli" in MODULES
    code = (
        "import importlib, sys\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "heavy = {'torch', 'onnxruntime', 'tensorrt', 'transformers', 'onnxsim', 'onnx'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
