"""ORT's packing mode on the fused graph (engines/packed_attention.py): structure, the token
counts it reads, and loud failure.

The packed operators have CUDA kernels only, so the numbers test (packed engine vs the padded
fp16 engine) is in test_gpu_engines.py; here ORT on the CPU checks the one input the rewrite
relies on: what every Attention reads as its mask is each row's count of valid tokens.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bert_compiler.core.errors import InputError
from bert_compiler.engines.backend import BuildSpec, get_backend
from bert_compiler.engines.fp16 import convert_to_fp16
from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
from bert_compiler.engines.packed_attention import pack_attention, require_packable
from bert_compiler.models.loading import resolve_model
from bert_compiler.stages.export import export
from bert_compiler.stages.fuse import fuse
from bert_compiler.stages.simplify import simplify
from tests.tiny_models import make_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tiny_roberta_fused(tmp_path_factory) -> Path:
    """A tiny RoBERTa's fused graph: its embeddings stay standard ops, so its Attention nodes
    read a ReduceSum of the mask rather than EmbedLayerNormalization's mask index."""
    root = tmp_path_factory.mktemp("roberta")
    info = resolve_model(make_tiny_model(root / "model", model_type="roberta"))
    exported = export(info=info, out_dir=root / "export")
    simplified = simplify(source=exported.output("model.onnx"), out_dir=root / "simplify")
    return fuse(info=info, source=simplified.output("model.onnx"), out_dir=root / "fuse").output(
        "model.onnx"
    )


def _fused_graphs(tiny_run, roberta: Path) -> dict[str, onnx.ModelProto]:
    _info, out, _spec, _summary = tiny_run
    bert = onnx.load(str(out / "fuse" / "model.onnx"))
    return {
        "bert": bert,
        "bert-fp16": convert_to_fp16(bert),
        "roberta": onnx.load(str(roberta)),
    }


def _signature(values) -> list[tuple]:
    return [
        (v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in _dims(v)])
        for v in values
    ]


def _dims(value):
    return value.type.tensor_type.shape.dim


def test_packing_mode_structure_keeps_inputs_and_outputs(tiny_run, tiny_roberta_fused):
    for name, fused in _fused_graphs(tiny_run, tiny_roberta_fused).items():
        layers = Counter(n.op_type for n in fused.graph.node)["Attention"]
        packed = pack_attention(fused, where=name)
        ops = Counter(n.op_type for n in packed.graph.node)
        assert layers == 2, name
        assert ops["RemovePadding"] == 1 and ops["RestorePadding"] == 1, name
        assert ops["PackedAttention"] == layers and ops["Attention"] == 0, name
        assert _signature(packed.graph.input) == _signature(fused.graph.input), name
        assert _signature(packed.graph.output) == _signature(fused.graph.output), name
        # RemovePadding reads the token counts every Attention read; the caller's graph is intact.
        (remove,) = [n for n in packed.graph.node if n.op_type == "RemovePadding"]
        assert remove.input[1] == require_packable(fused, where=name)
        assert Counter(n.op_type for n in fused.graph.node)["Attention"] == layers
        onnx.checker.check_model(packed)


def test_the_mask_every_attention_reads_is_each_rows_token_count(tiny_run, tiny_roberta_fused):
    ids = np.full((4, 9), 7, dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 1:] = 0  # one token
    for name, fused in _fused_graphs(tiny_run, tiny_roberta_fused).items():
        counts = require_packable(fused, where=name)
        fused.graph.output.append(onnx.helper.make_tensor_value_info(counts, 6, None))  # int32
        session = ort.InferenceSession(
            fused.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
        (got,) = session.run([counts], feeds)
        np.testing.assert_array_equal(got, mask.sum(axis=1), err_msg=name)


def test_a_graph_without_fused_attention_is_one_line(tiny_run):
    _info, out, _spec, _summary = tiny_run
    standard = onnx.load(str(out / "simplify" / "model.onnx"))
    with pytest.raises(InputError, match="has none") as caught:
        pack_attention(standard, where="simplify/model.onnx")
    message = str(caught.value)
    assert "\n" not in message and "without --packed-attention" in message
    # The build checks it before touching an earlier engine (prepare), not after exporting.
    packed = OnnxRuntimeBuildOptions(packed_attention=True)
    spec = BuildSpec(device="cuda", precision="fp16", options=packed)
    job = get_backend("onnxruntime").build_job(
        out / "simplify" / "model.onnx", spec, input_names=()
    )
    with pytest.raises(InputError, match="has none"):
        job.prepare()


def test_attention_reading_the_raw_mask_is_refused(tiny_run):
    _info, out, _spec, _summary = tiny_run
    fused = onnx.load(str(out / "fuse" / "model.onnx"))
    for node in fused.graph.node:
        if node.op_type == "Attention":
            node.input[3] = "attention_mask"  # [batch, sequence]: not a token count
    with pytest.raises(InputError, match="one per-row token count") as caught:
        pack_attention(fused, where="fuse/model.onnx")
    assert "\n" not in str(caught.value)
