"""The INT8 path of `run` on a tiny model: engine, gate, and the precision fallback."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bert_compiler.calibration import datasets
from bert_compiler.engines.backend import BuildSpec
from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
from bert_compiler.models.loading import resolve_model
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.run_summary import FloatOps
from bert_compiler.stages import fallback as fallback_module
from bert_compiler.stages.calibrate import CalibrationSpec
from bert_compiler.stages.fallback import FallbackSpec
from bert_compiler.stages.verify import metric_gate_failures
from tests.closeness import assert_passed_at_the_gate
from tests.conftest import TINY_VERIFY, cpu_engine_dir

CALIBRATION = CalibrationSpec(num_samples=64, batch_size=16, bins=512)


def _run(
    model,
    out,
    fallback: FallbackSpec | None = None,
    calibration: CalibrationSpec = CALIBRATION,
    **verify_changes,
):
    spec = RunSpec(
        builds=(BuildSpec(precision="int8"),),
        verify=replace(TINY_VERIFY, **verify_changes),
        calibration=calibration,
        fallback=fallback or FallbackSpec(),
    )
    summary = run_pipeline(info=resolve_model(model), out=out, spec=spec)
    (engine,) = summary.engines
    return summary, engine


@pytest.fixture(scope="module")
def int8_run(tiny_embedding_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return out, *_run(tiny_embedding_model, out)


@pytest.mark.e2e
def test_int8_engine_is_built_from_the_calibrated_graph_and_verified(int8_run):
    import json

    out, summary, engine = int8_run
    assert summary.ok and engine.precision == "int8"
    assert engine.fallback.record["kept_float"] == []
    for name in ("model.onnx", "scales.json", "ranges.json", "calibration.cache", "manifest.json"):
        assert (out / "calibrate" / name).is_file()
    manifest = json.loads((cpu_engine_dir(out, "int8") / "manifest.json").read_text())
    assert manifest["inputs"]["onnx"]["path"] == str(out / "calibrate" / "model.onnx")
    assert manifest["spec"]["session"]["lower_int8"] is True
    assert manifest["results"]["packed_regions"] == 2  # one feed-forward block per layer
    assert_passed_at_the_gate(engine, "int8")


@pytest.mark.e2e
def test_int8_engine_runs_every_projection_in_integer_matmuls(int8_run):
    import onnx

    out, _summary, _engine = int8_run
    ops = [n.op_type for n in onnx.load(str(cpu_engine_dir(out, "int8") / "model.onnx")).graph.node]
    # 2 layers x (Q, K, V, output, FFN in, FFN out); float MatMuls left: attention scores only.
    # By default (--int8-dynamic all) each quantizes its input from the batch's own range.
    assert ops.count("DynamicQuantizeMatMul") == 12 and "MatMulIntegerToFloat" not in ops


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("scope", "weights", "dynamic"),
    [("none", "s8", 0), ("ffn-down", "s8", 2), ("ffn-down", "u8", 2), ("all", "u8", 12)],
)
def test_int8_dynamic_scopes_lower_to_their_operators_and_stay_close(
    tiny_embedding_model, tmp_path, scope, weights, dynamic
):
    import onnx

    spec = RunSpec(
        builds=(
            BuildSpec(
                precision="int8",
                options=OnnxRuntimeBuildOptions(int8_weights=weights, int8_dynamic=scope),
            ),
        ),
        verify=TINY_VERIFY,
        calibration=replace(CALIBRATION, smooth_alpha=0.5),
    )
    summary = run_pipeline(info=resolve_model(tiny_embedding_model), out=tmp_path, spec=spec)
    (engine,) = summary.engines
    assert summary.ok and engine.passed
    manifest = json.loads(engine.manifest.read_text())
    assert manifest["results"]["int8_dynamic"] == scope
    assert f"dynamic-{scope}" in engine.name or scope == "all"  # the default keeps its name
    graph = onnx.load(str(engine.path))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == dynamic
    assert ops.count("MatMulIntegerToFloat") == 12 - dynamic
    assert engine.float_ops == FloatOps(0, 12)
    # Quantized, so not float-exact; bounded (unit-norm embeddings: 1e-2 is 1% of the largest
    # possible component).
    assert 0 < engine.parity.max_abs_err < 1e-2
    assert engine.parity.min_cosine > 0.999


@pytest.mark.e2e
def test_fallback_keeps_the_fewest_sensitive_matmuls_that_pass(
    tiny_embedding_model, int8_run, tmp_path
):
    import json

    _out, _summary, engine = int8_run
    assert engine.float_ops == FloatOps(0, 12)
    # Half the error the fully quantized engine showed: only keeping some MatMuls float passes.
    limit = engine.parity.max_abs_err / 2
    summary, engine = _run(
        tiny_embedding_model,
        tmp_path,
        fallback=FallbackSpec(max_float=1.0),
        tolerance_overrides=(("max_abs_err", limit),),
    )
    fallback = engine.fallback
    assert engine.passed and summary.ok and fallback.failure is None
    kept = fallback.record["kept_float"]
    assert 1 <= len(kept) <= 12
    errors = [r["error"] for r in fallback.record["ranking"]]
    assert errors == sorted(errors, reverse=True) and len(errors) == 12
    assert kept == [r["node"] for r in fallback.record["ranking"]][: len(kept)]
    # Growing groups and bisection: far fewer rounds than one per MatMul, and every round that
    # kept fewer in float failed (the result is the smallest that passed).
    steps = fallback.record["steps"]
    assert fallback.rounds == len(steps) - 1 <= 2 * 4 + 1
    assert steps[-1]["passed"] and steps[-1]["kept_float"] == kept
    assert all(not s["passed"] for s in steps if len(s["kept_float"]) < len(kept))
    assert engine.float_ops == FloatOps(len(kept), 12)
    manifest = json.loads((cpu_engine_dir(tmp_path, "int8") / "manifest.json").read_text())
    assert sorted(manifest["results"]["float_ops"]["float_nodes"]) == sorted(kept)
    # Calibrated once: the last round's calibration reused the first one's ranges.
    calibration = json.loads((tmp_path / "calibrate" / "manifest.json").read_text())
    assert calibration["results"]["ranges"] == "reused"
    assert calibration["results"]["kept_float"] == kept


_REPORTING = {datasets.STSB_DEV.resolve(): "dev", datasets.SST2_DEV.resolve(): "dev"}
_SELECTION = {
    datasets.STSB_SELECTION.resolve(): "selection",
    datasets.SST2_SELECTION.resolve(): "selection",
}
_RECORDING: list[list[tuple[str, str]]] = []


def _record_reads(event: str, args: tuple) -> None:
    # Every file open in the process (io.open, os.open: reads for hashing included), while a
    # test records; audit hooks cannot be removed, so this one is installed once and idles.
    if not _RECORDING or event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
        return
    path = Path(os.fsdecode(args[0])).resolve()
    role = _REPORTING.get(path) or _SELECTION.get(path)
    if role:
        _RECORDING[-1].append((role, path.name))


sys.addaudithook(_record_reads)


@pytest.mark.e2e
def test_fallback_rounds_never_read_the_reporting_set(tiny_embedding_model, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    calibrate = fallback_module.calibrate

    def calibrate_round(**kwargs):
        events.append(("round", ""))
        return calibrate(**kwargs)

    monkeypatch.setattr(fallback_module, "calibrate", calibrate_round)
    _RECORDING.append(events)
    try:
        _summary, engine = _run(
            tiny_embedding_model, tmp_path, metric_gate=True, min_metric_retention=2.0
        )
    finally:
        _RECORDING.remove(events)
    # Four rounds (0..3 MatMuls float), each gated on the selection split; the dev set is read
    # only after the last round's selection verify, to report the engine left on disk.
    roles = [role for role, _ in events]
    assert roles.count("round") == 4 == len(engine.fallback.record["steps"])
    last_round = max(i for i, role in enumerate(roles) if role == "round")
    first_dev = roles.index("dev")
    assert "selection" in roles[last_round:first_dev]
    assert set(roles[first_dev:]) == {"dev"}
    assert {name for role, name in events if role == "selection"} == {
        "stsb-selection.tsv",
        "sst2-selection.tsv",
    }
    assert {step["split"] for step in engine.fallback.record["steps"]} == {"selection"}
    decided = engine.fallback.record["decided_by"]
    assert decided["kept_float"]["metric"] == str(datasets.STSB_SELECTION)
    assert "still fails" in engine.fallback.failure
    assert "selection split" in engine.fallback.failure
    report = json.loads(engine.report.read_text())
    assert report["split"] == "reporting"
    selection = tmp_path / "select" / engine.report.parent.relative_to(tmp_path / "verify")
    manifest = json.loads((selection / "manifest.json").read_text())
    assert manifest["spec"]["split"] == "selection"
    assert manifest["inputs"]["data"]["metric"]["path"] == str(datasets.STSB_SELECTION)


@pytest.mark.e2e
def test_fallback_off_verifies_on_the_reporting_set_only(tiny_embedding_model, tmp_path):
    events: list[tuple[str, str]] = []
    _RECORDING.append(events)
    try:
        _summary, engine = _run(
            tiny_embedding_model, tmp_path, fallback=FallbackSpec(enabled=False)
        )
    finally:
        _RECORDING.remove(events)
    assert {role for role, _ in events} == {"dev"}
    assert engine.fallback.record["decided_by"]["kept_float"] is None
    assert not (tmp_path / "select").exists()


@pytest.mark.e2e
def test_fallback_stops_at_the_float_limit_and_fails(tiny_embedding_model, tmp_path):
    summary, engine = _run(
        tiny_embedding_model, tmp_path, metric_gate=True, min_metric_retention=2.0
    )
    assert not summary.ok and not engine.passed
    fallback = engine.fallback
    # --fallback-max-float 0.25 of 12 MatMuls: rounds at 1, 2, then 3 float, never more.
    assert [len(s["kept_float"]) for s in fallback.record["steps"]] == [0, 1, 2, 3]
    assert fallback.record["float_limit"] == 3 and engine.float_ops == FloatOps(3, 12)
    assert any("keeps" in f and "needs 200.0%" in f for f in engine.failures)
    assert fallback.failure in engine.failures
    assert "still fails with 3/12 MatMuls in float" in fallback.failure


def test_metric_gates():
    from bert_compiler.stages.verify import MetricResult, VerifySpec

    torch_metric = MetricResult("stsb_spearman", 86.72, 1500)
    int8 = VerifySpec(precision="int8")
    assert (
        metric_gate_failures(torch_metric, MetricResult("stsb_spearman", 86.40, 1500), int8) == []
    )
    failures = metric_gate_failures(torch_metric, MetricResult("stsb_spearman", 86.0, 1500), int8)
    assert failures == ["stsb_spearman 86.00 keeps 99.17% of PyTorch's 86.72 (needs 99.5%)"]
    fp32 = VerifySpec(precision="fp32")
    assert (
        metric_gate_failures(torch_metric, MetricResult("stsb_spearman", 86.70, 1500), fp32) == []
    )
    assert (
        "0.070 points below"
        in metric_gate_failures(torch_metric, MetricResult("stsb_spearman", 86.65, 1500), fp32)[0]
    )


def test_retention_of_a_non_positive_metric_is_refused():
    from bert_compiler.stages.verify import MetricResult, VerifySpec

    failures = metric_gate_failures(
        MetricResult("stsb_spearman", -6.3, 100),
        MetricResult("stsb_spearman", -9.9, 100),
        VerifySpec(precision="int8"),
    )
    assert len(failures) == 1 and "is not positive" in failures[0]


@pytest.mark.e2e
def test_an_explicit_int8_weight_type_names_its_engine_and_is_recorded(
    tiny_embedding_model, tmp_path
):
    """--int8-weights s8 and u8 build two engines side by side (verify judges each); the
    saturating s8 kernel of a CPU without VNNI is allowed only because verify gates it."""
    from click.testing import CliRunner

    from bert_compiler.cli.commands import cli
    from bert_compiler.engines.backend import get_backend

    args = ["run", "--model", str(tiny_embedding_model), "--out", str(tmp_path), "--precision"]
    args += ["int8", "--no-package", "--metric-limit", "50", "--no-metric-gate", "--json"]
    names = []
    for weights in ("s8", "u8"):
        result = CliRunner().invoke(cli, [*args, "--int8-weights", weights])
        assert result.exit_code == 0, result.output
        (engine,) = json.loads(result.stdout.strip().splitlines()[-1])["engines"]
        names.append(engine["name"])
        manifest = json.loads(Path(engine["manifest"]).read_text())
        assert manifest["spec"]["session"]["int8_weights"] == weights
        assert manifest["spec"]["int8_weights"] == weights
        assert (
            get_backend("onnxruntime").from_record(manifest["spec"]).options.int8_weights == weights
        )
    assert [n.rsplit("-", 2)[1:] for n in names] == [["int8", "s8"], ["int8", "u8"]]
    result = CliRunner().invoke(cli, [*args, "--int8-weights", "s16"])
    assert result.exit_code == 2 and "s16" in result.output


@pytest.mark.parametrize("limit", [1, 2, 3, 9, 12, 36])
def test_search_finds_the_smallest_passing_prefix_in_few_rounds(limit):
    import math

    from bert_compiler.calibration.sensitivity import smallest_passing_prefix

    bound = 2 * math.ceil(math.log2(limit)) + 1 if limit > 1 else 1
    for needed in range(1, limit + 2):
        tried = []

        def passes(size, needed=needed, tried=tried):
            tried.append(size)
            return size >= needed

        found = smallest_passing_prefix(limit, passes)
        assert found == (needed if needed <= limit else None), (needed, tried)
        assert len(tried) <= bound and max(tried) <= limit, (needed, tried)
        assert len(set(tried)) == len(tried)  # no size tried twice
    assert smallest_passing_prefix(0, lambda size: True) is None


@pytest.mark.unit
@pytest.mark.parametrize("task", ["feature-extraction", "sequence-classification"])
def test_a_selection_split_equal_to_the_reporting_set_is_refused(task, tmp_path):
    from types import SimpleNamespace

    from bert_compiler.core.errors import InputError
    from bert_compiler.stages.fallback import int8_with_fallback

    reporting = datasets.SST2_DEV if task == "sequence-classification" else datasets.STSB_DEV
    copy = tmp_path / "copy.tsv"
    copy.write_bytes(reporting.read_bytes())
    default = FallbackSpec().selection_split(SimpleNamespace(task=task, pairs=False))
    assert default.metric != reporting and default.parity != datasets.SST2_DEV

    def never(*_args):
        raise AssertionError("nothing is built before the split is checked")

    for selection in (reporting, copy):
        with pytest.raises(InputError, match="the same rows as the set verify reports"):
            int8_with_fallback(
                info=SimpleNamespace(task=task, pairs=False),
                float_graph=tmp_path / "model.onnx",
                calibrate_dir=tmp_path / "calibrate",
                calibration=CALIBRATION,
                fallback=FallbackSpec(selection_data=selection),
                build_and_verify=never,
                reporting=reporting,
                force=False,
                stages={},
            )
