"""INT8 calibration on tiny models: each method, the Q/DQ graph, scales, cache, bad data."""

from __future__ import annotations

import json
import struct
from collections import Counter

import numpy as np
import onnx
import pytest

from bert_compiler.calibration import datasets
from bert_compiler.calibration.qdq import (
    insert_qdq,
    optional_inputs,
    quantizable_matmuls,
    tensor_weight_scale,
    weight_scales,
)
from bert_compiler.calibration.ranges import (
    TensorHistogram,
    amax_entropy,
    amax_percentile,
    compute_amax,
)
from bert_compiler.core.errors import InputError
from bert_compiler.stages.calibrate import (
    TRT_CACHE_HEADER,
    CalibrationSpec,
    calibrate,
    trt_calibration_cache,
)
from tests.closeness import assert_tracks_float, sentence_feeds

QUICK = CalibrationSpec(num_samples=64, batch_size=16, bins=512)


def _hist(values, bins=2048):
    values = np.abs(np.asarray(values, dtype=np.float64))
    counts, _ = np.histogram(values, bins=bins, range=(0, values.max()))
    return TensorHistogram(float(values.max()), counts)


def test_percentile_and_entropy_clip_outliers_minmax_keeps_them():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 100_000), [80.0]])
    hist = _hist(values)
    amax = compute_amax({"t": hist}, "minmax")["t"]
    assert amax == pytest.approx(80.0)
    assert 3.0 < amax_percentile(hist, 99.99) < 6.0
    assert 2.0 < amax_entropy(hist) < 20.0


@pytest.mark.unit
def test_mse_is_the_least_squared_error_clip():
    from bert_compiler.calibration.ranges import amax_mse, quantization_mse

    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 1, 100_000), [80.0]])
    hist = _hist(values)
    clip = amax_mse(hist)
    # A squared error counts the outlier too: it clips part of the way, unlike the percentile.
    assert amax_percentile(hist, 99.99) < clip < hist.amax_seen
    others = [hist.amax_seen, amax_percentile(hist, 99.99), clip * 0.9, clip * 1.1]
    errors = quantization_mse(hist, np.array([clip, *others]))
    assert errors[0] == errors.min() and errors[0] < errors[1]
    # Uniform values: clipping anything only adds error, the maximum wins (to a bin).
    flat = _hist(rng.uniform(-1, 1, 100_000))
    assert amax_mse(flat) == pytest.approx(flat.amax_seen, rel=0.01)
    assert compute_amax({"t": hist}, "mse")["t"] == clip


def test_unknown_method_and_bad_percentile():
    with pytest.raises(InputError, match="--method 'kl'"):
        compute_amax({}, "kl")
    with pytest.raises(InputError, match="--percentile 0"):
        compute_amax({}, "percentile", percentile=0)


def test_weight_scales_are_symmetric_per_output_channel():
    weight = np.array([[1.0, -4.0, 0.0], [-2.0, 2.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(weight_scales(weight), [2 / 127, 4 / 127, 1.0])


@pytest.fixture(scope="module")
def calibrated(tiny_run, tmp_path_factory):
    info, out, _spec, _summary = tiny_run
    results = {}
    for method in ("minmax", "percentile", "entropy"):
        results[method] = calibrate(
            info=info,
            source=out / "simplify" / "model.onnx",
            out_dir=tmp_path_factory.mktemp(method),
            spec=CalibrationSpec(**{**QUICK.__dict__, "method": method}),
        )
    return info, out, results


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_each_method_writes_a_qdq_graph_that_runs_close_to_float(calibrated, method):
    import onnxruntime as ort

    info, out, results = calibrated
    result = results[method]
    graph = onnx.load(str(result.output("model.onnx")))
    float_graph = onnx.load(str(out / "simplify" / "model.onnx"))
    targets = quantizable_matmuls(float_graph)
    assert len(targets) == 6 * info.num_layers  # Q, K, V, output, FFN in, FFN out
    ops = [n.op_type for n in graph.graph.node]
    # One pair per activation tensor (4 per layer: Q/K/V share one), one DQ per weight.
    assert ops.count("QuantizeLinear") == 4 * info.num_layers
    assert ops.count("DequantizeLinear") == 4 * info.num_layers + len(targets)
    for node in graph.graph.node:  # LayerNorm, Softmax and GELU stay in float
        if node.op_type in ("LayerNormalization", "Softmax", "Erf"):
            assert all("int8" not in i for i in node.input)
    weights = [i for i in graph.graph.initializer if i.name.endswith("_int8_q")]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)

    feeds = sentence_feeds(info, [i.name for i in float_graph.graph.input])
    outputs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (out / "simplify" / "model.onnx", result.output("model.onnx"))
    ]
    assert_tracks_float(outputs[0], outputs[1], "int8")


@pytest.mark.e2e
def test_scales_are_recorded_everywhere(calibrated):
    _info, _out, results = calibrated
    result = results["percentile"]
    scales = json.loads(result.output("scales.json").read_text())
    assert scales == result.manifest["results"]["scales"]
    activations = {n: r for n, r in scales.items() if r["kind"] == "activation"}
    weights = {n: r for n, r in scales.items() if r["kind"] == "weight"}
    assert len(activations) == 4 * 2 and len(weights) == 6 * 2  # per layer: 4 inputs, 6 weights
    for record in activations.values():
        assert record["scale"] == pytest.approx(record["amax"] / 127)
    cache = result.output("calibration.cache").read_text().splitlines()
    assert cache[0] == TRT_CACHE_HEADER and len(cache) == 1 + len(activations)
    name, _, hex_scale = cache[1].rpartition(": ")
    assert struct.unpack(">f", bytes.fromhex(hex_scale))[0] == pytest.approx(
        activations[name]["scale"], rel=1e-6
    )


@pytest.mark.e2e
def test_methods_differ_and_minmax_is_widest(calibrated):
    _info, _out, results = calibrated

    def amaxes(method):
        scales = results[method].manifest["results"]["scales"]
        return {n: r["amax"] for n, r in scales.items() if r["kind"] == "activation"}

    minmax, percentile = amaxes("minmax"), amaxes("percentile")
    assert all(percentile[n] <= minmax[n] + 1e-9 for n in minmax)
    assert amaxes("entropy") != minmax


@pytest.mark.e2e
def test_keep_float_leaves_matmuls_unquantized(tiny_run):
    info, out, _spec, _summary = tiny_run
    model = onnx.load(str(out / "simplify" / "model.onnx"))
    targets = quantizable_matmuls(model)
    amax = {t.activation: 1.0 for t in targets}
    quantized, record = insert_qdq(model, amax, exclude=frozenset({targets[0].node_name}))
    node = next(n for n in quantized.graph.node if n.name == targets[0].node_name)
    assert list(node.input) == [targets[0].activation, targets[0].weight]
    assert targets[0].weight not in record


def test_trt_cache_format():
    text = trt_calibration_cache({"b": 1 / 127, "a": 0.5})
    assert text == f"{TRT_CACHE_HEADER}\na: 3f000000\nb: 3c010204\n"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "dataset file is empty"),
        ("bad.txt", b"ok\n\xff\xfe\n", ":2: not valid UTF-8"),
        ("long.txt", b"x" * (11 << 20) + b"\n", ":1: line is"),
        ("few.txt", b"one\ntwo\nthree\n", "3 distinct sentences, calibration needs at least 32"),
        ("dups.txt", b"same\n" * 100, "1 distinct sentences"),
        ("bad.jsonl", b'{"sentence": "a"}\n{oops\n', ":2: not valid JSON"),
        ("nokey.jsonl", b'{"other": "a"}\n', ":1: no string field 'sentence'"),
        ("data.csv", b"a,b\n", "unsupported dataset type '.csv'"),
    ],
)
def test_bad_calibration_data_fails_before_writing(tiny_run, tmp_path, name, content, message):
    info, out, _spec, _summary = tiny_run
    data = tmp_path / name
    data.write_bytes(content)
    target = tmp_path / "calibrate"
    with pytest.raises(InputError) as caught:
        calibrate(
            info=info,
            source=out / "simplify" / "model.onnx",
            out_dir=target,
            spec=CalibrationSpec(data=data),
        )
    assert message in str(caught.value)
    assert not (target / "model.onnx").exists() and not (target / "manifest.json").exists()


def test_user_text_formats(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "hello there"}\n\n{"text": "general kenobi"}\n')
    assert datasets.load_texts(tmp_path / "s.jsonl", column="text") == [
        "hello there",
        "general kenobi",
    ]
    (tmp_path / "s.tsv").write_text("id\ttext\n1\tfirst one\n")
    assert datasets.load_texts(tmp_path / "s.tsv", column="text") == ["first one"]


def _gemm_graph(trans_b):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((6, 4) if trans_b else (4, 6)).astype(np.float32)
    weight[0] *= 10  # one output channel (trans_b) or input row (not) much wider than the rest
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="proj", transB=trans_b)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.full(6, 0.5, dtype=np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weights_are_quantized_per_output_channel(trans_b):

    model = _gemm_graph(trans_b)
    (target,) = quantizable_matmuls(model)
    assert target.weight_axis == (0 if trans_b else 1)
    quantized, record = insert_qdq(model, {"x": 3.0})
    assert len(record["w"]["scale"]) == 6 and record["w"]["axis"] == target.weight_axis
    onnx.checker.check_model(quantized)
    run = _run_on_uniform_x(model, quantized)
    np.testing.assert_allclose(run[1], run[0], rtol=0.05, atol=0.15)


def _run_on_uniform_x(*models) -> list[np.ndarray]:
    """Each model's output on one x drawn uniformly within the calibrated range of 3."""
    import onnxruntime as ort

    x = np.random.default_rng(4).uniform(-3, 3, (3, 4)).astype(np.float32)
    return [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        for m in models
    ]


@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_tensor_weights_have_one_scale_and_stay_close_to_float(trans_b):

    model = _gemm_graph(trans_b)
    quantized, record = insert_qdq(model, {"x": 3.0}, weight_granularity="tensor")
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])
    assert record["w"]["axis"] is None
    assert record["w"]["scale"] == pytest.approx(float(np.abs(weight).max()) / 127)
    onnx.checker.check_model(quantized)
    run = _run_on_uniform_x(model, quantized)
    # Rounding bound of a 4-term dot product: each term off by at most |x| * s_w / 2 +
    # |w| * s_x / 2 + s_x * s_w / 4 (x is within its range of 3, so never clipped).
    s_x, s_w = 3 / 127, record["w"]["scale"]
    bound = 4 * (3 * s_w / 2 + np.abs(weight).max() * s_x / 2 + s_x * s_w / 4)
    assert np.abs(run[1] - run[0]).max() <= bound


def test_per_tensor_weight_scale_is_the_largest_magnitude_over_127():
    weight = np.array([[1.0, -4.0, 0.0], [-2.0, 2.0, 0.0]], dtype=np.float32)
    assert tensor_weight_scale(weight).shape == ()
    assert float(tensor_weight_scale(weight)) == pytest.approx(4 / 127)
    assert float(tensor_weight_scale(np.zeros((2, 2), dtype=np.float32))) == 1.0
    with pytest.raises(InputError, match="weight granularity 'row'"):
        insert_qdq(_gemm_graph(0), {"x": 3.0}, weight_granularity="row")
    with pytest.raises(InputError, match="--weight-granularity"):
        CalibrationSpec(weight_granularity="row").validate()


@pytest.mark.e2e
def test_per_tensor_calibration_is_recorded_and_its_int8_engine_tracks_float(tiny_run, tmp_path):
    from bert_compiler.engines.backend import BuildSpec, load_engine
    from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
    from bert_compiler.stages.build import build

    info, out, _spec, _summary = tiny_run
    result = calibrate(
        info=info,
        source=out / "simplify" / "model.onnx",
        out_dir=tmp_path / "calibrate",
        spec=CalibrationSpec(**{**QUICK.__dict__, "weight_granularity": "tensor"}),
    )
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["spec"]["weight_granularity"] == "tensor"
    graph = onnx.load(str(result.output("model.onnx")))
    initializers = {i.name: i for i in graph.graph.initializer}
    weight_dqs = [
        n
        for n in graph.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in initializers
    ]
    assert len(weight_dqs) == 6 * info.num_layers
    assert all(list(initializers[n.input[1]].dims) == [] for n in weight_dqs)
    built = build(
        source=result.output("model.onnx"),
        out_dir=tmp_path / "engine",
        spec=BuildSpec(precision="int8", options=OnnxRuntimeBuildOptions(intra_op_num_threads=1)),
    )
    engine, _manifest = load_engine(built.path)
    float_graph = onnx.load(str(out / "simplify" / "model.onnx"))
    feeds = sentence_feeds(info, [i.name for i in float_graph.graph.input])
    import onnxruntime as ort

    reference = ort.InferenceSession(
        str(out / "simplify" / "model.onnx"), providers=["CPUExecutionProvider"]
    ).run(None, feeds)[0]
    outputs = engine.run(feeds)
    quantized = outputs[engine.output_names[0]] if isinstance(outputs, dict) else outputs[0]
    assert_tracks_float(reference, quantized, "int8")


@pytest.mark.e2e
def test_optional_ops_stay_float_unless_configured(calibrated, tiny_run, tmp_path):
    import onnxruntime as ort

    info, out, results = calibrated
    default_ops = Counter(
        n.op_type for n in onnx.load(str(results["minmax"].output("model.onnx"))).graph.node
    )
    configured = calibrate(
        info=info,
        source=out / "simplify" / "model.onnx",
        out_dir=tmp_path / "c",
        spec=CalibrationSpec(
            **{
                **QUICK.__dict__,
                "method": "minmax",
                "quantize_ops": ("LayerNormalization", "Softmax"),
            }
        ),
    )
    graph = onnx.load(str(configured.output("model.onnx")))
    for node in graph.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert node.input[0].endswith("_int8_dq"), node.name
    ops = Counter(n.op_type for n in graph.graph.node)
    assert ops["QuantizeLinear"] > default_ops["QuantizeLinear"]
    float_graph = onnx.load(str(out / "simplify" / "model.onnx"))
    feeds = sentence_feeds(info, [i.name for i in float_graph.graph.input])
    a, b = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (out / "simplify" / "model.onnx", configured.output("model.onnx"))
    )
    assert_tracks_float(a, b, "int8")
    with pytest.raises(InputError, match="--quantize-op \\['MatMul'\\]"):
        optional_inputs(float_graph, ("MatMul",))


def test_ranges_come_from_real_tokens_only():
    """Padding positions hold the largest values of the batch: the amax and histogram are the
    real tokens' alone, equal to an independent masked max."""
    from onnx import TensorProto, helper

    from bert_compiler.calibration.ranges import collect_histograms

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT)],
        "cast",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    batches = []
    for lengths in ([3, 5, 2], [4, 1]):
        mask = (np.arange(6)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        ids = np.where(mask == 1, rng.integers(1, 50, mask.shape), 10_000)
        batches.append({"input_ids": ids, "attention_mask": mask})
    histograms = collect_histograms(model, ["x"], batches, bins=64)
    real = max(float(b["input_ids"][b["attention_mask"] == 1].max()) for b in batches)
    assert histograms["x"].amax_seen == real < 10_000
    assert histograms["x"].counts.sum() == sum(int(b["attention_mask"].sum()) for b in batches)
