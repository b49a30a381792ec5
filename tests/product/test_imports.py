"""Every module imports, and every --help runs, without pulling heavy or GPU-only packages."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import bert_compiler

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(bert_compiler.__path__, f"{bert_compiler.__name__}.")
)
HEAVY = (
    "torch",
    "onnxruntime",
    "tensorrt",
    "transformers",
    "onnxsim",
    "onnx",
    "tokenizers",
    "tritonclient",
    "grpc",
)


def _heavy_modules_loaded_by(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; return the heavy packages it ended up importing."""
    loaded = f"sorted(set({HEAVY!r}) & set(sys.modules))"
    probe = f"{code}\nimport json, sys\nprint(json.dumps({loaded}))\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_module_imports_lazily():
    assert "bert_compiler.engines.onnxruntime" in MODULES
    assert "bert_compiler.cli.commands" in MODULES
    code = f"import importlib\nfor name in {MODULES!r}:\n    importlib.import_module(name)"
    assert _heavy_modules_loaded_by(code) == []


def test_every_help_runs_without_heavy_imports():
    code = (
        "from click.testing import CliRunner\n"
        "from bert_compiler.cli.commands import cli\n"
        "for cmd in ([], ['run'], ['export'], ['simplify'], ['fuse'], ['build'], ['verify'],\n"
        "            ['targets'], ['package'], ['doctor'], ['serve']):\n"
        "    r = CliRunner().invoke(cli, cmd + ['--help'])\n"
        "    assert r.exit_code == 0, (cmd, r.output)\n"
    )
    assert _heavy_modules_loaded_by(code) == []
