"""SmoothQuant-style activation smoothing: exact in float, and it is what makes an outlier
channel quantizable."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest

from bert_compiler.calibration.qdq import quantizable_matmuls
from bert_compiler.calibration.ranges import collect_channel_amax
from bert_compiler.calibration.smooth import apply_smoothing, smoothed_name, smoothing_factors
from bert_compiler.core.errors import InputError
from bert_compiler.stages.calibrate import CalibrationSpec, calibrate

QUICK = CalibrationSpec(num_samples=64, batch_size=16, bins=512, method="minmax")


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])


def _gemm_graph(trans_b: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    weight = rng.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="act"),
        helper.make_node("Gemm", ["h", "w", "b"], ["y"], name="proj", transB=trans_b),
        helper.make_node("Add", ["h", "h"], ["residual"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6]),
            helper.make_tensor_value_info("residual", TensorProto.FLOAT, [3, 4]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.full(6, 0.5, dtype=np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.unit
@pytest.mark.parametrize("trans_b", [0, 1])
def test_smoothing_is_exact_in_float_and_leaves_other_readers_alone(trans_b):
    model = _gemm_graph(trans_b)
    x = np.random.default_rng(6).uniform(-1, 1, (3, 4)).astype(np.float32)
    x[:, 2] *= 100  # an outlier channel
    channel = np.abs(np.maximum(x, 0)).max(axis=0)
    factors = smoothing_factors(model, {"h": channel}, alpha=0.5)
    assert list(factors) == ["h"] and len(factors["h"]) == 4
    smoothed = apply_smoothing(model, factors)
    onnx.checker.check_model(smoothed)
    (target,) = quantizable_matmuls(smoothed)
    # The MatMul reads the smoothed tensor; the residual add still reads the original.
    assert target.activation == smoothed_name("h")
    residual = next(n for n in smoothed.graph.node if n.name == "residual")
    assert list(residual.input) == ["h", "h"]
    before = _session(model).run(None, {"x": x})
    after = _session(smoothed).run(None, {"x": x})
    for expected, got in zip(before, after, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_smoothing_factors_balance_activation_and_weight_ranges():
    model = _gemm_graph(0)
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])
    w_max = np.abs(weight).max(axis=1)
    a_max = np.array([1.0, 4.0, 100.0, 0.0])
    s = np.asarray(smoothing_factors(model, {"h": a_max}, alpha=0.5)["h"])
    np.testing.assert_allclose(s[:3], np.sqrt(a_max[:3] / w_max[:3]), rtol=1e-6)
    assert s[3] == 1.0  # a channel never seen non-zero is left alone
    # After smoothing, activation and weight ranges are equal per channel (alpha 0.5).
    np.testing.assert_allclose(a_max[:3] / s[:3], w_max[:3] * s[:3], rtol=1e-5)
    with pytest.raises(InputError, match="must be in"):
        smoothing_factors(model, {"h": a_max}, alpha=1.5)
    with pytest.raises(InputError, match="no quantizable MatMul reads"):
        apply_smoothing(model, {"x": [1.0] * 4})


def _with_outlier_channel(model, scale: float = 60.0):
    """The tiny BERT with one LayerNorm output channel ``scale`` times wider: the shape of the
    outliers real BERTs have (the float model stays a valid, if odd, network)."""
    from onnx import numpy_helper

    outlier = onnx.ModelProto()
    outlier.CopyFrom(model)
    names = {n.input[1] for n in outlier.graph.node if n.op_type == "LayerNormalization"}
    for init in outlier.graph.initializer:
        if init.name in names:
            gamma = numpy_helper.to_array(init).copy()
            gamma[3] *= scale
            init.CopyFrom(numpy_helper.from_array(gamma, init.name))
    return outlier


@pytest.mark.e2e
def test_smoothed_tiny_bert_is_float_equal_and_quantizes_an_outlier_channel_better(
    tiny_run, tmp_path
):
    from bert_compiler.core.onnx_io import sample_token_feeds

    info, out, _spec, _summary = tiny_run
    model = _with_outlier_channel(onnx.load(str(out / "simplify" / "model.onnx")))
    source = tmp_path / "outlier.onnx"
    onnx.save(model, str(source))
    feeds = sample_token_feeds(model, batch=4, sequence=12)

    # Exact in float on the whole network (every quantizable MatMul input smoothed).
    activations = sorted({t.activation for t in quantizable_matmuls(model)})
    channel = collect_channel_amax(model, activations, [feeds])
    smoothed = apply_smoothing(model, smoothing_factors(model, channel, alpha=0.5))
    reference = _session(model).run(None, feeds)[0]
    np.testing.assert_allclose(
        _session(smoothed).run(None, feeds)[0], reference, rtol=1e-4, atol=1e-5
    )

    # Quantized: the smoothed graph's error is bounded, and smaller than without smoothing.
    errors = {}
    for alpha in (None, 0.5):
        result = calibrate(
            info=info,
            source=source,
            out_dir=tmp_path / f"alpha-{alpha}",
            spec=replace(QUICK, smooth_alpha=alpha),
        )
        quantized = onnx.load(str(result.output("model.onnx")))
        got = _session(quantized).run(None, feeds)[0]
        errors[alpha] = float(np.abs(got - reference).max() / np.abs(reference).max())
        ranges = json.loads(result.output("ranges.json").read_text())
        assert ("smooth" in ranges) == (alpha is not None)
    assert errors[0.5] < 0.05
    assert errors[0.5] < errors[None] / 2, errors


@pytest.mark.e2e
def test_smoothing_survives_a_ranges_reuse(tiny_run, tmp_path):
    info, out, _spec, _summary = tiny_run
    spec = replace(QUICK, smooth_alpha=0.5)
    source = out / "simplify" / "model.onnx"
    first = calibrate(info=info, source=source, out_dir=tmp_path, spec=spec)
    node = first.results["quantized_matmuls"][0]
    again = calibrate(
        info=info, source=source, out_dir=tmp_path, spec=replace(spec, keep_float=(node,))
    )
    assert again.results["ranges"] == "reused"
    graph = onnx.load(str(again.output("model.onnx")))
    muls = [n for n in graph.graph.node if n.name.endswith("_Smooth")]
    assert len(muls) == 4 * info.num_layers  # one per quantized activation, as the first time
    assert (
        json.loads(again.output("ranges.json").read_text())["smooth"]
        == json.loads(first.output("ranges.json").read_text())["smooth"]
    )
