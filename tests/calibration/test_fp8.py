"""fp8: the float8 e4m3fn Q/DQ graph of calibrate --format fp8 (structure, numbers on ONNX Runtime
CPU), the TensorRT-only fp8 precision and its one-line refusals elsewhere, and the sweep's fp8
rows. The TensorRT fp8 engine itself is built only where TensorRT imports on a GPU of compute
capability 8.9+ (marked tensorrt); nothing here fakes TensorRT."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from bert_compiler.calibration.qdq import (
    FP8,
    float_matmuls,
    insert_qdq,
    quantizable_matmuls,
    quantize_values,
)
from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import EnvironmentProblem, InputError
from bert_compiler.core.targets import Environment
from bert_compiler.engines.backend import BuildSpec
from bert_compiler.engines.targets import plan_targets
from bert_compiler.engines.tensorrt import prepare_network_graph
from bert_compiler.models.loading import resolve_model
from bert_compiler.stages.calibrate import CalibrationSpec
from bert_compiler.stages.layout import Layout
from tests.closeness import assert_passed_at_the_gate, assert_tracks_float, sentence_feeds
from tests.gpus import A100, H100, L4, ORT_CUDA

# e4m3 keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself (relative); below the
# smallest normal (2^-6, in units of the scale) the spacing is 2^-9, so the absolute error is at
# most 2^-10 scales.
E4M3_RELATIVE = 2.0**-4
E4M3_SUBNORMAL = 2.0**-10


def _matmul_graph(rng: np.random.Generator, *, gemm_trans_b: int | None = None):
    """x [3, 8] times a constant weight, plus a bias: MatMul (weight [8, 6]) or Gemm, opset 17 as
    the exporter writes it, with a ReduceL2 whose axes move to an input at opset 18."""
    weight = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    if gemm_trans_b is None:
        core = [
            helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
            helper.make_node("Add", ["xw", "b"], ["y"], name="bias"),
        ]
    else:
        weight = weight.T.copy() if gemm_trans_b else weight
        core = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="mm", transB=gemm_trans_b)]
    norm = helper.make_node("ReduceL2", ["y"], ["norm"], name="norm", axes=[1], keepdims=1)
    graph = helper.make_graph(
        [*core, norm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6]),
            helper.make_tensor_value_info("norm", TensorProto.FLOAT, [3, 1]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.linspace(-1, 1, 6, dtype=np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _weights(model) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("gemm_trans_b", [None, 0, 1])
def test_fp8_graph_checks_runs_on_ort_cpu_within_e4m3_rounding(granularity, gemm_trans_b):
    rng = np.random.default_rng(7)
    model = _matmul_graph(rng, gemm_trans_b=gemm_trans_b)
    # Inside the calibrated range (amax 3), so nothing clips: only rounding is left.
    x = rng.uniform(-3, 3, (3, 8)).astype(np.float32)
    quantized, record = insert_qdq(
        model, {"x": 3.0}, weight_granularity=granularity, format=FP8.name
    )
    onnx.checker.check_model(quantized, full_check=True)
    assert {o.domain: o.version for o in quantized.opset_import}[""] == 19
    float_y, float_norm = _run(model, x)
    fp8_y, fp8_norm = _run(quantized, x)
    # The same graph otherwise: the ReduceL2 the converter rewrote agrees with itself.
    np.testing.assert_allclose(fp8_norm[:, 0], np.linalg.norm(fp8_y, axis=1), rtol=1e-5, atol=1e-6)
    weight = numpy_helper.to_array(_weights(model)["w"]).astype(np.float64)
    weight = weight.T if gemm_trans_b else weight  # [in, out]
    s_x = record["x"]["scale"]
    s_w = np.broadcast_to(np.asarray(record["w"]["scale"], dtype=np.float64), (6,))
    # Per product term: x and w each within E4M3_RELATIVE of themselves, plus the subnormal floor.
    dx = E4M3_RELATIVE * np.abs(x) + E4M3_SUBNORMAL * s_x  # [3, 8]
    dw = E4M3_RELATIVE * np.abs(weight) + E4M3_SUBNORMAL * s_w  # [8, 6]
    bound = (np.abs(x) + dx) @ (np.abs(weight) + dw) - np.abs(x) @ np.abs(weight)
    error = np.abs(fp8_y.astype(np.float64) - float_y)
    assert (error <= bound + 1e-5).all(), (error / bound).max()
    # And fp8 is not float: the rounding shows.
    assert error.max() > 0


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_weights_are_float8_initializers_with_their_scales(granularity):
    model = _matmul_graph(np.random.default_rng(3))
    quantized, record = insert_qdq(
        model, {"x": 2.0}, weight_granularity=granularity, format=FP8.name
    )
    weights = _weights(quantized)
    stored = weights["w_fp8_q"]
    assert stored.data_type == TensorProto.FLOAT8E4M3FN and list(stored.dims) == [8, 6]
    float_weight = numpy_helper.to_array(_weights(model)["w"])
    amax = (
        np.abs(float_weight).max(axis=0) if granularity == "channel" else np.abs(float_weight).max()
    )
    scale = numpy_helper.to_array(weights["w_fp8_scale"])
    np.testing.assert_allclose(scale, amax / 448, rtol=1e-6)
    assert scale.shape == ((6,) if granularity == "channel" else ())
    assert record["w"]["axis"] == (1 if granularity == "channel" else None)
    # Quantized ahead of time by round-to-nearest-even e4m3fn, saturating at 448.
    expected = quantize_values(float_weight / scale, FP8)
    assert (numpy_helper.to_array(stored).view(np.uint8) == expected.view(np.uint8)).all()
    assert np.abs(numpy_helper.to_array(stored).astype(np.float32)).max() == 448
    for name in ("w_fp8_zero_point", "x_fp8_zero_point"):
        assert weights[name].data_type == TensorProto.FLOAT8E4M3FN
    assert record["x"]["scale"] == pytest.approx(2.0 / 448)
    (dq,) = [n for n in quantized.graph.node if n.op_type == "DequantizeLinear" and "w_" in n.name]
    axis = {a.name: a.i for a in dq.attribute}.get("axis")
    assert axis == (1 if granularity == "channel" else None)
    assert float_matmuls(quantized) == {"float": 0, "total": 1, "float_nodes": []}


def test_int8_stays_the_default_and_at_the_exported_opset():
    model = _matmul_graph(np.random.default_rng(3))
    quantized, _ = insert_qdq(model, {"x": 2.0})
    assert {o.domain: o.version for o in quantized.opset_import}[""] == 17
    assert _weights(quantized)["w_int8_q"].data_type == TensorProto.INT8
    assert CalibrationSpec().format == "int8" and "calibration.cache" in CalibrationSpec().outputs
    assert "calibration.cache" not in CalibrationSpec(format="fp8").outputs
    with pytest.raises(InputError, match="--format 'fp4'"):
        CalibrationSpec(format="fp4").validate()
    with pytest.raises(InputError, match="quantized format 'fp4'"):
        insert_qdq(model, {"x": 2.0}, format="fp4")


def test_tensorrt_network_graph_takes_only_its_own_qdq_format():
    model = _matmul_graph(np.random.default_rng(5))
    fp8_graph, _ = insert_qdq(model, {"x": 2.0}, format=FP8.name)
    int8_graph, _ = insert_qdq(model, {"x": 2.0})
    with pytest.raises(InputError, match="calibrate --format fp8"):
        prepare_network_graph(int8_graph, precision="fp8")
    with pytest.raises(InputError, match="int8 TensorRT engines need"):
        prepare_network_graph(fp8_graph, precision="int8")
    network = prepare_network_graph(fp8_graph, precision="fp8")
    # Everything but the float8 values in fp16 (strongly typed: the rest runs in fp16), the
    # weights still float8, inputs and outputs float32.
    types = {init.name: init.data_type for init in network.graph.initializer}
    assert types["w_fp8_q"] == TensorProto.FLOAT8E4M3FN
    assert types["w_fp8_scale"] == types["x_fp8_scale"] == TensorProto.FLOAT16
    assert network.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).uniform(-2, 2, (3, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(network, x)[0], _run(fp8_graph, x)[0], rtol=0.02, atol=0.02)


def test_fp8_is_planned_for_tensorrt_on_compute_capability_8_9_and_up_only():
    env = Environment(gpus=(H100, L4, A100), tensorrt="10.13.3", ort_providers=ORT_CUDA)
    plan = plan_targets("auto", ("fp16", "fp8"), env)
    fp8 = [(e["backend"], e["compute_capability"]) for e in plan.engines if e["precision"] == "fp8"]
    assert fp8 == [("tensorrt", "9.0"), ("tensorrt", "8.9")]
    assert any("TensorRT only" in note for note in plan.notes)
    assert any("8.0 (below 8.9)" in note for note in plan.notes)
    explicit = plan_targets("tensorrt", ("fp8",), env)
    assert [e["compute_capability"] for e in explicit.engines] == ["9.0", "8.9"]
    with pytest.raises(EnvironmentProblem, match="compute capability 8.0"):
        plan_targets("tensorrt", ("fp8",), Environment(gpus=(A100,), tensorrt="10.13.3"))
    for target in ("cpu", "cuda"):
        with pytest.raises(InputError, match=f"--target {target}: --precision fp8 is built by"):
            plan_targets(target, ("fp8",), env)
    with pytest.raises(InputError, match="no GPU with TensorRT"):
        plan_targets("auto", ("fp8",), Environment())


def test_only_tensorrt_builds_fp8_and_from_its_own_calibration():
    with pytest.raises(InputError, match="GemmFloat8|TensorRT only|built by TensorRT"):
        BuildSpec(device="cuda", precision="fp8").validate()
    with pytest.raises(InputError, match="built by TensorRT"):
        BuildSpec(precision="fp8").validate()
    trt = BuildSpec(backend="tensorrt", device="cuda", precision="fp8")
    trt.validate()
    with pytest.raises(InputError, match="compute capability 8.0"):
        replace(trt, compute_capability="8.0").validate()
    replace(trt, compute_capability="8.9").validate()
    # The backend names the folder the runner and `calibrate --format fp8` write.
    layout = Layout(Path("/out"))
    assert layout.root / trt.source_stage == layout.calibration(FP8.name)
    assert layout.calibration("int8") == layout.calibrate


@pytest.mark.parametrize(
    ("command", "target"), [("build", "cpu"), ("build", "cuda"), ("run", "cpu"), ("run", "auto")]
)
def test_fp8_refusals_are_one_line_with_exit_3(tmp_path, command, target):
    result = CliRunner().invoke(
        cli,
        [command, "--out", str(tmp_path / "o"), "--target", target, "--precision", "fp8"],
    )
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "built by TensorRT only" in lines[0] and "use --target tensorrt" in lines[0]
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("manifest.json"))


@pytest.mark.e2e
def test_calibrate_format_fp8_writes_its_own_graph_and_records_the_format(
    tiny_embedding_model, tmp_path
):
    import onnxruntime as ort

    out = tmp_path / "out"
    common = ["--model", str(tiny_embedding_model), "--out", str(out), "--json"]
    quick = ["--num-samples", "64"]
    for stage in ("export", "simplify"):
        assert CliRunner().invoke(cli, [stage, *common]).exit_code == 0
    result = CliRunner().invoke(cli, ["calibrate", *common, *quick, "--format", "fp8"])
    assert result.exit_code == 0, result.output
    folder = Layout(out).calibration("fp8")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["spec"]["format"] == "fp8" and manifest["results"]["format"] == "fp8"
    assert not (folder / "calibration.cache").exists()
    assert not (out / "calibrate").exists()  # the INT8 calibration is not touched
    quantized = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(quantized, full_check=True)
    float_model = onnx.load(str(out / "simplify" / "model.onnx"))
    info = float_matmuls(quantized)
    assert info is not None and info["float"] == 0
    assert info["total"] == len(quantizable_matmuls(float_model))
    model = resolve_model(tiny_embedding_model)
    feeds = sentence_feeds(model, [i.name for i in float_model.graph.input])
    outputs = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, feeds
        )[0]
        for m in (float_model, quantized)
    ]
    assert_tracks_float(outputs[0], outputs[1], "fp8")
    # What TensorRT would parse: the fp8 graph with its float parts in fp16, a valid graph (the
    # float32 head's Casts sorted in front of their consumers).
    onnx.checker.check_model(prepare_network_graph(quantized, precision="fp8"), full_check=True)


@pytest.mark.e2e
def test_sweep_fp8_rows_are_scored_and_not_timed(tiny_embedding_model, tmp_path):
    out = tmp_path / "out"
    args = ["calibrate", "--sweep", "--model", str(tiny_embedding_model), "--out", str(out)]
    grid = [
        *("--sweep-methods", "percentile:99.99", "--sweep-dynamic", "none"),
        *("--sweep-weight-granularity", "channel,tensor", "--sweep-formats", "int8,fp8"),
    ]
    small = ["--sweep-pairs", "20", "--sweep-sentences", "32", "--sweep-rounds", "1"]
    result = CliRunner().invoke(cli, [*args, *grid, *small, "--no-sweep-peers", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    fp8 = [r for r in rows if r.get("format") == "fp8"]
    int8 = [r for r in rows if r.get("format") == "int8"]
    assert sorted(r["weight_granularity"] for r in fp8) == ["channel", "tensor"]
    assert len(int8) == 2 and all(r["vs_torch"] > 0 for r in int8)
    torch_row = rows[0]
    assert torch_row["runner"] == "torch fp32"
    for row in fp8:
        assert row["runner"].startswith("fp8 ") and row["vs_torch"] is None
        # Scored, not timed: the fp8 graph's Spearman is the float model's to a few points.
        for split in ("selection", "dev"):
            assert abs(row[split] - torch_row[split]) <= 5, (row, torch_row)
    fp8_lines = [line for line in result.stderr.splitlines() if line.startswith("fp8 ")]
    assert len(fp8_lines) == 2 and all(line.rstrip().endswith("n/a") for line in fp8_lines)


def _tensorrt_fp8_reason() -> str | None:
    """Why no TensorRT fp8 engine can be built here (None: it can)."""
    from tests.engines.test_gpu_engines import _tensorrt_reason

    reason = _tensorrt_reason()
    if reason is None:
        import torch

        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            reason = f"GPU compute capability {capability} has no fp8 (< 8.9)"
    return reason


@pytest.mark.e2e
@pytest.mark.tensorrt
def test_tensorrt_fp8_engine_from_the_fp8_qdq_graph(tiny_embedding_model, tmp_path):
    from tests.engines.test_gpu_engines import run_tensorrt_engine

    reason = _tensorrt_fp8_reason()
    if reason:
        pytest.skip(reason)
    engine = run_tensorrt_engine(tiny_embedding_model, tmp_path, "fp8")
    assert engine.name.endswith("-fp8")
    assert_passed_at_the_gate(engine, "fp8")
    assert (tmp_path / "calibrate-fp8" / "model.onnx").is_file()
