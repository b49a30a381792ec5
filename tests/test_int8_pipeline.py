"""The INT8 path of `run` on a tiny model: engine, gate, and the precision fallback."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bert_compiler.engines.backend import BuildSpec
from bert_compiler.pipeline.calibrate import CalibrationSpec
from bert_compiler.pipeline.models import resolve_model
from bert_compiler.pipeline.runner import RunSpec, run_pipeline
from bert_compiler.pipeline.verify import metric_gate_failures
from tests.conftest import TINY_VERIFY, cpu_engine_dir

CALIBRATION = CalibrationSpec(num_samples=64, batch_size=16, bins=512)


def _run(model, out, **verify_changes):
    spec = RunSpec(
        builds=(BuildSpec(precision="int8"),),
        verify=replace(TINY_VERIFY, **verify_changes),
        calibration=CALIBRATION,
    )
    summary = run_pipeline(info=resolve_model(model), out=out, spec=spec)
    (engine,) = summary["engines"]
    return summary, engine


@pytest.fixture(scope="module")
def int8_run(tiny_embedding_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    return out, *_run(tiny_embedding_model, out)


@pytest.mark.e2e
def test_int8_engine_is_built_from_the_calibrated_graph_and_verified(int8_run):
    import json

    out, summary, engine = int8_run
    assert summary["ok"] and engine["precision"] == "int8"
    assert engine["fallback"]["kept_float"] == []
    for name in ("model.onnx", "scales.json", "calibration.cache", "manifest.json"):
        assert (out / "calibrate" / name).is_file()
    manifest = json.loads((cpu_engine_dir(out, "int8") / "manifest.json").read_text())
    assert manifest["inputs"]["onnx"]["path"] == str(out / "calibrate" / "model.onnx")
    assert manifest["spec"]["session"]["lower_int8"] is True
    assert manifest["results"]["packed_regions"] == 2  # one feed-forward block per layer
    assert 0 < engine["parity"]["max_abs_err"] < 1.0  # quantized: close, not identical


@pytest.mark.e2e
def test_int8_engine_runs_every_projection_in_integer_matmuls(int8_run):
    import onnx

    out, _summary, _engine = int8_run
    ops = [n.op_type for n in onnx.load(str(cpu_engine_dir(out, "int8") / "model.onnx")).graph.node]
    # 2 layers x (Q, K, V, output, FFN in, FFN out); float MatMuls left: attention scores only.
    assert ops.count("MatMulIntegerToFloat") == 12


@pytest.mark.e2e
def test_fallback_keeps_sensitive_matmuls_until_the_gate_passes(
    tiny_embedding_model, int8_run, tmp_path
):
    _out, _summary, engine = int8_run
    # Half the error the fully quantized engine showed: only keeping some MatMuls float passes.
    limit = engine["parity"]["max_abs_err"] / 2
    summary, engine = _run(
        tiny_embedding_model, tmp_path, tolerance_overrides=(("max_abs_err", limit),)
    )
    fallback = engine["fallback"]
    assert engine["passed"] and summary["ok"]
    assert 1 <= len(fallback["kept_float"]) <= 12
    errors = [r["error"] for r in fallback["ranking"]]
    assert errors == sorted(errors, reverse=True) and len(errors) == 12
    assert (
        fallback["kept_float"]
        == [r["node"] for r in fallback["ranking"]][: len(fallback["kept_float"])]
    )
    assert [s["passed"] for s in fallback["steps"]] == [False] * (len(fallback["steps"]) - 1) + [
        True
    ]


@pytest.mark.e2e
def test_fallback_reports_failure_when_nothing_is_left(tiny_embedding_model, tmp_path):
    summary, engine = _run(
        tiny_embedding_model, tmp_path, metric_gate=True, min_metric_retention=2.0
    )
    assert not summary["ok"] and not engine["passed"]
    assert len(engine["fallback"]["kept_float"]) == 12  # every MatMul ended in float
    assert any("keeps" in f and "needs 200.0%" in f for f in engine["failures"])


def test_metric_gates():
    from bert_compiler.pipeline.verify import MetricResult, VerifySpec

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
    from bert_compiler.pipeline.verify import MetricResult, VerifySpec

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

    from bert_compiler.engines.backend import get_backend
    from bert_compiler.pipeline.cli import cli

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
        assert get_backend("onnxruntime").from_record(manifest["spec"]).int8_weights == weights
    assert [n.rsplit("-", 2)[1:] for n in names] == [["int8", "s8"], ["int8", "u8"]]
    result = CliRunner().invoke(cli, [*args, "--int8-weights", "s16"])
    assert result.exit_code == 2 and "s16" in result.output
