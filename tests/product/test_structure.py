"""The package's shape: one folder, layers that point one way, backends behind one registry."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The one package folder, and its wings (pyproject.toml [tool.setuptools] packages).
PACKAGE = ROOT / "bert_compiler"
WINGS = ("cli", "bench", "triton", "stages", "runtime", "models", "engines", "calibration", "core")
BACKEND_NAMES = {"onnxruntime", "tensorrt"}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_one_folder_of_wings():
    """Every product module lives under bert_compiler/, in a wing (or run.py, the pipeline
    that chains the stages, and run_summary.py, what it returns); nothing of the product is left
    at the repository root."""
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        WINGS
    )
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == [
        "__init__.py",
        "run.py",
        "run_summary.py",
    ]
    assert not [name for name in (*WINGS, "pipeline") if (ROOT / name).exists()]


def test_layer_contracts_hold():
    # Run as a developer runs it, from the repository root over the package folder.
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-4000:]
    # Every product module was read.
    assert f"Analyzed {len(_sources())} files" in result.stdout


def test_no_function_level_import_of_our_own_modules():
    # Such an import would hide an import circle from a reader (grimp sees it all the same).
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                if any(n.split(".")[0] == "bert_compiler" for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {function.name}")
    assert found == []


def _names_a_backend(node: ast.expr) -> bool:
    """``backend``, ``x.backend`` or ``x["backend"]``: an expression holding a backend's name."""
    if isinstance(node, ast.Name):
        return node.id == "backend"
    if isinstance(node, ast.Attribute):
        return node.attr == "backend"
    return (
        isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and node.slice.value == "backend"
    )


def test_no_branch_on_a_backend_name_outside_the_engines():
    found = []
    for path in _sources():
        if path.parent.name == "engines":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            literal = any(isinstance(s, ast.Constant) and s.value in BACKEND_NAMES for s in sides)
            if literal and any(_names_a_backend(s) for s in sides):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_the_wheel_installs_only_the_bert_compiler_package(tmp_path):
    source = tmp_path / "src"
    for name in ("bert_compiler", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "wheel"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"bert_compiler", "bert_compiler-0.1.0.dist-info"}
    # The package, its wings, the data and Triton model templates with them.
    for expected in (
        "bert_compiler/__init__.py",
        "bert_compiler/core/artifacts.py",
        "bert_compiler/triton/tokenizer_model.py",
        "bert_compiler/engines/backend.py",
        "bert_compiler/calibration/data/calibration-sentences.tsv",
    ):
        assert expected in names


def test_the_gpu_image_copies_the_package_folder():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY bert_compiler bert_compiler\n" in dockerfile
