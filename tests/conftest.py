from __future__ import annotations

import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest

from bert_compiler.stages.verify import VerifySpec
from tests.tiny_models import make_tiny_model

# --- test tiers -----------------------------------------------------------------------------
# Every test is in exactly one tier: `e2e` and `slow` are marked by hand, every other test is
# `unit` (marked here). The unit tier is the fast loop, so a unit test must export no model: the
# guard below fails one that calls torch.onnx.export (in this process or in a Python subprocess
# it starts) or uses a fixture that did, naming what to do. Its hook wraps torch.onnx.export when
# torch.onnx is imported, so it imports nothing heavy itself.

TIERS = ("unit", "e2e", "slow")

# Property tests draw the same examples on every run in CI (CI=true), so a red run reproduces;
# elsewhere they explore. Each test's own @settings (example counts) still apply.
try:
    from hypothesis import settings as _hypothesis

    _hypothesis.register_profile("ci", derandomize=True)
    if os.environ.get("CI") == "true":
        _hypothesis.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
TIER_ADVICE = (
    "The unit tier exports no model: mark the test e2e (@pytest.mark.e2e, or "
    "`pytestmark = pytest.mark.e2e` for a whole file)"
)

# The hook, as a module's source: loaded here, and as sitecustomize.py (from a folder put first
# on PYTHONPATH) in the subprocesses a unit test starts, where it appends a line to the file that
# $BERT_COMPILER_UNIT_GUARD names. Either way the export then goes ahead and the test is failed
# after its phase: code under test that catches exceptions cannot hide the export.
_HOOK_SOURCE = '''
import os
import sys


def _wrap(module, on_export):
    real = module.export
    if getattr(real, "_tier_guard", False):
        return

    def export(*args, **kwargs):
        on_export()
        return real(*args, **kwargs)

    export._tier_guard = True
    module.export = export


class TorchOnnxHook:
    """A meta path finder that wraps torch.onnx.export once torch.onnx has been executed."""

    def __init__(self, on_export):
        self.on_export = on_export

    def find_spec(self, name, path=None, target=None):
        if name != "torch.onnx":
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module, on_export = spec.loader.exec_module, self.on_export

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module, on_export)

        spec.loader.exec_module = exec_and_wrap
        return spec


def install(on_export):
    if "torch.onnx" in sys.modules:
        _wrap(sys.modules["torch.onnx"], on_export)
    else:
        sys.meta_path.insert(0, TorchOnnxHook(on_export))


if os.environ.get("BERT_COMPILER_UNIT_GUARD"):

    def _record():
        with open(os.environ["BERT_COMPILER_UNIT_GUARD"], "a") as marker:
            marker.write(f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\\n")

    install(_record)
'''


class _Guard:
    """Which test is running, which fixtures are being set up, and what exported."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.fixtures: list = []  # the FixtureDefs being set up, outermost first
        self.exporting: dict = {}  # FixtureDef -> the test during whose setup it exported
        self.violations: list[str] = []
        self.folder = Path(tempfile.mkdtemp(prefix="bert-compiler-tier-guard-"))
        (self.folder / "sitecustomize.py").write_text(_HOOK_SOURCE)
        namespace: dict = {"__name__": "tier_guard_hook"}
        exec(compile(_HOOK_SOURCE, str(self.folder / "sitecustomize.py"), "exec"), namespace)
        namespace["install"](self.on_export)

    def on_export(self) -> None:
        for fixturedef in self.fixtures:
            self.exporting.setdefault(fixturedef, self.item.nodeid if self.item else "?")
        if self.item is None or self.item.get_closest_marker("unit") is None:
            return
        here = [
            f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
            for frame in traceback.extract_stack()[:-2]
            if Path(frame.filename).is_relative_to(Path(__file__).parent)
        ]
        where = f" (from {', '.join(here[-3:])})" if here else ""
        if self.fixtures:
            where += f" while setting up fixture {self.fixtures[-1].argname!r}"
        self.violations.append(f"torch.onnx.export was called{where}")

    # A plugin hook, not a conftest one: a session fixture is set up through the session's hooks,
    # which do not include this folder's conftest.
    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        self.fixtures.append(fixturedef)
        try:
            return (yield)
        finally:
            self.fixtures.pop()


_guard: _Guard | None = None


def pytest_configure(config):
    global _guard
    _guard = _Guard()
    config.pluginmanager.register(_guard, "bert-compiler-tier-guard")


def pytest_unconfigure(config):
    if _guard is not None:
        shutil.rmtree(_guard.folder, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers()} & set(TIERS))
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} is in more than one tier: {tiers}")
        if not tiers:
            item.add_marker(pytest.mark.unit)


def _guarded_phase(item: pytest.Item, phase: str):
    """Runs one phase (setup, call, teardown) of a test; a unit test that exported fails it."""
    _guard.item = item
    if item.get_closest_marker("unit") is None:
        try:
            return (yield)
        finally:
            _guard.item = None
    violations = []
    if phase == "setup":  # a fixture in its closure exported when an earlier test set it up
        in_use = getattr(item, "_fixtureinfo", None)
        violations += [
            f"it uses fixture {defs[-1].argname!r}, which exported a model in "
            f"{_guard.exporting[defs[-1]]}"
            for defs in (in_use.name2fixturedefs.values() if in_use else ())
            if defs and defs[-1] in _guard.exporting
        ]
    marker = _guard.folder / f"subprocess-exports-{os.getpid()}"
    marker.unlink(missing_ok=True)
    saved = {name: os.environ.get(name) for name in ("BERT_COMPILER_UNIT_GUARD", "PYTHONPATH")}
    os.environ["BERT_COMPILER_UNIT_GUARD"] = str(marker)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(_guard.folder), saved["PYTHONPATH"]])
    )
    _guard.violations = []
    problem = None
    try:
        result = yield
    except BaseException as err:  # reported below, after the export (if any) is named
        problem = err
    finally:
        _guard.item = None
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    violations += dict.fromkeys(_guard.violations)
    if marker.exists():
        first = marker.read_text().splitlines()[0]
        violations.append(f"torch.onnx.export was called in a subprocess ({first})")
    if violations:
        message = f"{item.nodeid} is a unit test but exports a model: {'; '.join(violations)}."
        pytest.fail(f"{message} {TIER_ADVICE}.", pytrace=False)
    if problem is not None:
        raise problem
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _guarded_phase(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _guarded_phase(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded_phase(item, "teardown"))


# A random model embeds every sentence almost identically, so 1e-7 differences reorder STS-B
# cosines and its Spearman moves by a point or more: the metric gate is meaningless there and is
# exercised on purpose-built failures and on the real model instead.
TINY_VERIFY = VerifySpec(metric_limit=200, parity_sentences=40, metric_gate=False)


@pytest.fixture(scope="session")
def tiny_embedding_model(tmp_path_factory) -> Path:
    """A tiny sentence-transformers-style BERT (mean pooling + normalize)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-embed")


@pytest.fixture(scope="session")
def tiny_classifier_model(tmp_path_factory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-cls", task="sequence-classification"
    )


@pytest.fixture()
def tiny_model_copy(tiny_embedding_model, tmp_path) -> Path:
    """A private copy of the tiny embedding model that a test may damage."""
    target = tmp_path / "model"
    shutil.copytree(tiny_embedding_model, target)
    return target


@pytest.fixture(scope="session")
def tiny_run(tiny_embedding_model, tmp_path_factory):
    """One full pipeline run on the tiny embedding model, shared by read-only tests."""
    from bert_compiler.models.loading import resolve_model
    from bert_compiler.run import RunSpec, run_pipeline

    info = resolve_model(tiny_embedding_model)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    spec = RunSpec(verify=TINY_VERIFY)
    summary = run_pipeline(info=info, out=out, spec=spec)
    return info, out, spec, summary


def run_fp32_and_int8(folder: Path, out: Path, metric_limit: int = 100) -> tuple[Any, dict]:
    """`run --precision fp32 --precision int8` on a tiny model folder (random weights: the
    metric gate off, as TINY_VERIFY), both engines passing, then `verify --repository` accepting
    the repository it packaged. Returns the run's CLI result and its summary."""
    from click.testing import CliRunner

    from bert_compiler.cli.commands import cli

    common = ["--model", str(folder), "--out", str(out), "--json"]
    gates = ["--metric-limit", str(metric_limit), "--no-metric-gate"]
    precisions = ["--precision", "fp32", "--precision", "int8"]
    result = CliRunner().invoke(
        cli, ["run", *common, *gates, "--num-samples", "64", *precisions], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"]
    passed = {e["precision"]: e["passed"] for e in summary["engines"]}
    assert passed == {"fp32": True, "int8": True}
    repository = summary["repository"]["path"]
    checked = CliRunner().invoke(cli, ["verify", *common, *gates, "--repository", repository])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout.strip().splitlines()[-1])["ok"]
    return result, summary


def cpu_engine_dir(out: Path, precision: str = "fp32", stage: str = "engines") -> Path:
    """The one CPU ONNX Runtime engine folder (or its verify folder) of ``precision`` in a run:
    OUT/<stage>/<model>/ort<version>-cpu-<precision>."""
    (folder,) = sorted(Path(out).glob(f"{stage}/*/ort*-cpu-{precision}"))
    return folder


def pytest_terminal_summary(terminalreporter):
    """How many hostile cases and fuzzed inputs this session tried (tests/product/test_hostile.py,
    tests/product/test_fuzz.py), so CI's log says how large the pass over bad input was."""
    import sys

    hostile = sys.modules.get("tests.product.test_hostile")
    fuzz = sys.modules.get("tests.product.test_fuzz")
    lines = []
    if hostile is not None and hostile.TRIED:
        lines.append(f"hostile corpus: {len(hostile.TRIED)} cases tried")
    if fuzz is not None and fuzz.TRIED:
        tried = ", ".join(f"{name} {count}" for name, count in sorted(fuzz.TRIED.items()))
        lines.append(f"fuzzed inputs: {sum(fuzz.TRIED.values())} ({tried})")
    for line in lines:
        terminalreporter.write_line(line)


@pytest.fixture()
def pb_utils(monkeypatch):
    """A stand-in for triton_python_backend_utils: a request is a dict name -> array."""
    import sys
    import types

    from tests.triton_fakes import FakeError, FakeResponse, FakeTensor

    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor
    module.InferenceResponse = FakeResponse
    module.TritonError = FakeError
    module.get_input_tensor_by_name = lambda request, name: FakeTensor(name, request[name])
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module
