"""The ORT engine's graph rewrites: INT8 lowering and feed-forward token packing.

Each has a structure test (which operators result) and a numbers test (ORT on CPU, before, after).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bert_compiler.calibration.qdq import insert_qdq, quantizable_matmuls
from bert_compiler.engines.ort_int8 import lower_qdq_matmuls, weight_type_for_this_cpu
from bert_compiler.engines.token_packing import find_feed_forward_regions, pack_feed_forward


def _run(model, feeds, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        # The exact reference: DequantizeLinear then a float MatMul, no integer kernels.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)[0]


def _feeds(lengths, width, vocab=80, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="module")
def graphs(tiny_run):
    info, out, _spec, _summary = tiny_run
    float_graph = onnx.load(str(out / "simplify" / "model.onnx"))
    amax = {t.activation: 4.0 for t in quantizable_matmuls(float_graph)}
    qdq, _ = insert_qdq(float_graph, amax)
    return info, float_graph, qdq


@pytest.mark.e2e
def test_lowering_structure(graphs):
    info, float_graph, qdq = graphs
    ops = Counter(n.op_type for n in lower_qdq_matmuls(qdq).graph.node)
    assert ops["MatMulIntegerToFloat"] == len(quantizable_matmuls(float_graph)) == 12
    assert ops["DequantizeLinear"] == 0
    assert ops["QuantizeLinear"] == 4 * info.num_layers  # Q, K and V share one
    # Every projection's bias Add is folded in: only residual and mask Adds remain.
    assert ops["Add"] < Counter(n.op_type for n in qdq.graph.node)["Add"] - 10


@pytest.mark.e2e
def test_lowering_numbers_match_the_qdq_graph(graphs):
    _info, _float_graph, qdq = graphs
    feeds = _feeds([9, 4, 1], 9)
    exact = _run(qdq, feeds, optimize=False)
    lowered = lower_qdq_matmuls(qdq, weights=weight_type_for_this_cpu())
    np.testing.assert_allclose(_run(lowered, feeds), exact, atol=1e-5)
    # u8 weights are the same integers shifted by 128: exact on every CPU.
    np.testing.assert_allclose(_run(lower_qdq_matmuls(qdq, weights="u8"), feeds), exact, atol=1e-5)


@pytest.mark.e2e
def test_u8_weights_are_the_int8_weights_shifted(graphs):
    _info, _float_graph, qdq = graphs
    s8, u8 = (lower_qdq_matmuls(qdq, weights=w) for w in ("s8", "u8"))
    node = next(n for n in u8.graph.node if n.op_type == "MatMulIntegerToFloat")
    twin = next(n for n in s8.graph.node if n.name == node.name)
    inits = {i.name: numpy_helper.to_array(i) for g in (s8, u8) for i in g.graph.initializer}
    weight, zero = inits[node.input[1]], inits[node.input[5]]
    assert weight.dtype == zero.dtype == np.uint8 and (zero == 128).all()
    np.testing.assert_array_equal(weight.astype(np.int16) - 128, inits[twin.input[1]])
    assert not any(
        i.dtype == np.int8 and i.ndim == 2 for i in map(numpy_helper.to_array, u8.graph.initializer)
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse avx2 avx512f avx512_vnni", "s8"),
        ("fpu sse avx2 avx_vnni", "s8"),
        ("fpu sse avx2 fma", "u8"),
        ("", "u8"),
    ],
)
def test_weight_type_follows_vnni(flags, expected):
    assert weight_type_for_this_cpu(f"processor\t: 0\nflags\t\t: {flags}\n") == expected


@pytest.mark.e2e
def test_packing_finds_one_region_per_layer_and_rewires_it(graphs):
    info, float_graph, _qdq = graphs
    regions = find_feed_forward_regions(float_graph)
    assert len(regions) == info.num_layers
    assert all(r.hidden == info.hidden_size for r in regions)
    ops = Counter(n.op_type for n in pack_feed_forward(float_graph).graph.node)
    assert ops["NonZero"] == 1 and ops["Gather"] >= info.num_layers
    assert ops["ScatterND"] == info.num_layers


@pytest.mark.e2e
@pytest.mark.parametrize("lengths", [[9, 4, 1], [9, 9], [1], [9, 2, 2, 7, 3]])
def test_packing_keeps_float_outputs(graphs, lengths):
    _info, float_graph, _qdq = graphs
    feeds = _feeds(lengths, max(lengths))
    np.testing.assert_allclose(
        _run(pack_feed_forward(float_graph), feeds), _run(float_graph, feeds), atol=1e-5
    )


@pytest.mark.e2e
def test_packing_int8_stays_close(graphs):
    # Float reordering can flip an INT8 rounding, so INT8 is close rather than identical.
    _info, _float_graph, qdq = graphs
    lowered = lower_qdq_matmuls(qdq)
    feeds = _feeds([9, 4, 1], 9)
    a, b = _run(pack_feed_forward(lowered), feeds), _run(lowered, feeds)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.999


@pytest.mark.e2e
def test_fused_graph_has_no_packable_region(tiny_run):
    _info, out, _spec, _summary = tiny_run
    fused = onnx.load(str(out / "fuse" / "model.onnx"))
    assert find_feed_forward_regions(fused) == []
    assert pack_feed_forward(fused) == fused
