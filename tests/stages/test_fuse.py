"""Fusion: structure (which ops result), numbers (ORT before vs after), and loud failure."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bert_compiler.core.errors import FusionError
from bert_compiler.models.loading import resolve_model
from bert_compiler.stages.fuse import compare_fusions, fuse


def test_compare_fusions_sums_the_gelu_family():
    expected = {"Attention": 2, "*Gelu": 2}
    assert compare_fusions({"Attention": 2, "BiasGelu": 1, "FastGelu": 1}, expected) == []
    assert compare_fusions({"Attention": 1, "Gelu": 2}, expected) == [
        "Attention: expected 2, got 1"
    ]


@pytest.mark.e2e
def test_fused_graph_structure(tiny_run):
    _info, out, _spec, _summary = tiny_run
    ops = {node.op_type for node in onnx.load(str(out / "fuse" / "model.onnx")).graph.node}
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= ops
    assert "Softmax" not in ops and "Erf" not in ops


@pytest.mark.e2e
def test_fused_graph_numbers_match_unfused(tiny_run):
    _info, out, _spec, _summary = tiny_run
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 80, size=(3, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    results = [
        ort.InferenceSession(
            str(out / stage / "model.onnx"), providers=["CPUExecutionProvider"]
        ).run(None, feeds)[0]
        for stage in ("simplify", "fuse")
    ]
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)


@pytest.mark.e2e
def test_unfusable_graph_is_an_error_not_a_slow_engine(tiny_run, tmp_path):
    import onnxsim

    info, out, _spec, _summary = tiny_run
    # onnxsim with its MatMul+Add -> Gemm passes on: the form ORT cannot fuse.
    model = onnx.load(str(out / "export" / "model.onnx"))
    gemm_form, ok = onnxsim.simplify(model, certify=False)
    assert ok and any(n.op_type == "Gemm" for n in gemm_form.graph.node)
    source = tmp_path / "gemm.onnx"
    onnx.save(gemm_form, str(source))
    with pytest.raises(FusionError, match="Attention: expected 2, got 0"):
        fuse(info=info, source=source, out_dir=tmp_path / "fuse")
    assert not (tmp_path / "fuse" / "manifest.json").exists()


def test_fuse_uses_the_models_head_count(tiny_embedding_model):
    info = resolve_model(tiny_embedding_model)
    assert (info.num_heads, info.hidden_size, info.num_layers) == (2, 32, 2)
    assert info.architecture.expected_fusions(info.config)["SkipLayerNormalization"] == 4
