"""The chain on tiny random BERTs: outputs, manifests, skipping, tamper detection, the gates."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest

from bert_compiler.core.errors import ArtifactError
from bert_compiler.engines.backend import load_engine
from bert_compiler.models.loading import resolve_model
from bert_compiler.run import run_pipeline
from bert_compiler.runtime.encoder import Encoder
from bert_compiler.stages.layout import Layout
from bert_compiler.stages.verify import run_verification
from tests.conftest import TINY_VERIFY, cpu_engine_dir


@pytest.mark.e2e
def test_run_produces_a_verified_engine(tiny_run):
    info, out, _spec, summary = tiny_run
    assert summary.ok
    (engine,) = summary.engines
    assert (engine.backend, engine.device, engine.precision) == (
        "onnxruntime",
        "cpu",
        "fp32",
    )
    assert engine.parity.passed and engine.parity.min_cosine > 0.9999
    assert engine.parity.max_abs_err < 1e-4
    assert engine.metric.name == "stsb_spearman"
    assert summary.fused_operators == {
        "EmbedLayerNormalization": 1,
        "Attention": 2,
        "BiasGelu": 2,
        "SkipLayerNormalization": 4,
    }
    recorded = json.loads((out / "run.json").read_text())
    (written,) = recorded["engines"]
    assert written["path"] == str(engine.path) and written["passed"] is True
    assert written["parity"]["min_cosine"] == engine.parity.min_cosine
    assert written["metric"] == {"name": "stsb_spearman", "value": engine.metric.value}
    assert set(recorded["stages"]) == set(summary.stages) and "notes" not in recorded


@pytest.mark.e2e
def test_exported_graph_has_dynamic_axes_and_one_embedding_output(tiny_run):
    _info, out, _spec, _summary = tiny_run
    model = onnx.load(str(out / "export" / "model.onnx"))
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.input) + list(model.graph.output)
    }
    assert (
        dims["input_ids"]
        == dims["attention_mask"]
        == dims["token_type_ids"]
        == ["batch", "sequence"]
    )
    assert dims["sentence_embedding"][0] == "batch" and len(dims["sentence_embedding"]) == 2
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]


@pytest.mark.e2e
def test_manifests_record_inputs_versions_and_outputs(tiny_run):
    _info, out, _spec, _summary = tiny_run
    layout = Layout(out)
    export_manifest = json.loads((layout.export / "manifest.json").read_text())
    assert export_manifest["complete"] and export_manifest["stage"] == "export"
    assert "model.safetensors" in export_manifest["inputs"]["model"]["files"]
    for key in ("torch", "transformers", "onnx", "onnxruntime", "onnxsim", "python"):
        assert key in export_manifest["versions"]
    simplify_manifest = json.loads((layout.simplify / "manifest.json").read_text())
    assert (
        simplify_manifest["inputs"]["onnx"]["sha256"]
        == (export_manifest["outputs"]["model.onnx"]["sha256"])
    )
    assert (
        simplify_manifest["results"]["nodes_after"] < simplify_manifest["results"]["nodes_before"]
    )
    engine_manifest = json.loads((cpu_engine_dir(out, "fp32") / "manifest.json").read_text())
    assert engine_manifest["spec"]["session"]["offline_level"] == "extended"
    verify_manifest = json.loads(
        (cpu_engine_dir(out, "fp32", "verify") / "manifest.json").read_text()
    )
    assert verify_manifest["results"]["parity"]["sentence_embedding"]["passed"]


@pytest.mark.e2e
def test_engine_loads_in_a_fresh_process(tiny_run):
    _info, out, _spec, _summary = tiny_run
    code = (
        "import sys, numpy as np\n"
        "from bert_compiler.engines.backend import load_engine\n"
        "engine, manifest = load_engine(sys.argv[1])\n"
        "ids = np.array([[2, 10, 11, 3]], dtype=np.int64)\n"
        "out = engine.run({'input_ids': ids, 'attention_mask': np.ones_like(ids),"
        " 'token_type_ids': np.zeros_like(ids)})\n"
        "print(engine.provider, out['sentence_embedding'].shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(cpu_engine_dir(out, "fp32"))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "CPUExecutionProvider (1, 32)"


@pytest.mark.e2e
def test_rerun_skips_every_stage(tiny_run):
    info, out, spec, _summary = tiny_run
    again = run_pipeline(info=info, out=out, spec=spec)
    assert all(stage.skipped for stage in again.stages.values())


@pytest.mark.e2e
def test_tampered_engine_is_refused_before_loading(tiny_run, tmp_path):
    import shutil

    _info, out, _spec, _summary = tiny_run
    engine_dir = tmp_path / "engine"
    shutil.copytree(cpu_engine_dir(out, "fp32"), engine_dir)
    data = bytearray((engine_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (engine_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_engine(engine_dir)


@pytest.mark.e2e
def test_parity_failure_is_reported_per_output(tiny_embedding_model, tiny_run):
    _info, out, _spec, _summary = tiny_run
    info = resolve_model(tiny_embedding_model)
    engine, _ = load_engine(cpu_engine_dir(out, "fp32"))

    class Perturbed:
        device, max_batch = engine.device, engine.max_batch
        path, input_names, output_names = engine.path, engine.input_names, engine.output_names
        packed_rows, concurrent_runs = False, False

        def run(self, feeds):
            outputs = engine.run(feeds)
            return {k: v + np.float32(1e-2) for k, v in outputs.items()}

    outcome = run_verification(
        info=info, encoder=Encoder(Perturbed(), info), pooling_in_graph=True, spec=TINY_VERIFY
    )
    assert not outcome.passed
    report = outcome.parity["sentence_embedding"]
    assert abs(report["max_abs_err"] - 1e-2) < 1e-3
    assert any("max_abs_err" in f for f in outcome.failures)


@pytest.mark.e2e
def test_metric_gate_is_separate_from_parity(tiny_embedding_model, tiny_run):
    _info, out, _spec, _summary = tiny_run
    info = resolve_model(tiny_embedding_model)
    engine, _ = load_engine(cpu_engine_dir(out, "fp32"))
    # A negative allowance demands the engine beat PyTorch by a point: an engine with perfect
    # parity must then fail on the metric alone.
    outcome = run_verification(
        info=info,
        encoder=Encoder(engine, info),
        pooling_in_graph=True,
        spec=replace(TINY_VERIFY, metric_gate=True, max_metric_drop=-1.0),
    )
    assert outcome.parity["sentence_embedding"]["passed"]
    assert not outcome.passed
    assert len(outcome.failures) == 1 and "points below PyTorch's" in outcome.failures[0]


@pytest.mark.e2e
def test_classifier_and_host_pooling_variants(
    tiny_classifier_model, tiny_embedding_model, tmp_path
):
    from bert_compiler.run import RunSpec
    from bert_compiler.stages.export import ExportSpec

    classifier = run_pipeline(
        info=resolve_model(tiny_classifier_model),
        out=tmp_path / "cls",
        spec=RunSpec(verify=TINY_VERIFY),
    )
    assert classifier.ok and classifier.engines[0].metric.name == "sst2_accuracy"
    host_pooled = run_pipeline(
        info=resolve_model(tiny_embedding_model),
        out=tmp_path / "tok",
        spec=RunSpec(export=ExportSpec(pooling_in_graph=False), verify=TINY_VERIFY),
    )
    assert host_pooled.ok
    model = onnx.load(str(tmp_path / "tok" / "fuse" / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]


def test_parity_batches_cover_sizes_and_edge_rows(tiny_embedding_model):
    from bert_compiler.models.loading import load_tokenizer
    from bert_compiler.runtime.text import PARITY_BATCH_SIZES, parity_batches, tokenize

    info = resolve_model(tiny_embedding_model)
    tokenizer = load_tokenizer(info)
    batches = parity_batches(["one short sentence", "two"] * 48, max_length=64)
    sizes = [len(b) for b in batches]
    assert sizes[: len(PARITY_BATCH_SIZES)] == list(PARITY_BATCH_SIZES)
    lengths = [tokenize(tokenizer, b, info, 64)["attention_mask"].sum(axis=1) for b in batches]
    every_row = np.concatenate(lengths)
    assert every_row.min() == 2  # the empty string: [CLS] [SEP]
    assert every_row.max() == 64  # truncated exactly at the limit
    mixed = tokenize(tokenizer, batches[-3], info, 64)["attention_mask"].sum(axis=1)
    assert len(set(mixed.tolist())) == 3  # one batch mixing short and maximal rows


@pytest.mark.e2e
def test_the_run_summary_gives_a_labelled_speed_figure(tiny_run):
    """Issue 15 item 3: each engine's summary says how fast verify's metric pass ran through the
    runtime, and says that it is a rough figure."""
    _info, _out, spec, summary = tiny_run
    (engine,) = summary.engines
    speed = engine.speed
    # Embedding models: both columns of the STS-B pairs.
    assert speed.sentences == 2 * spec.verify.metric_limit and speed.sentences_per_s > 0
    assert "bench" in speed.measured and "tokenization included" in speed.measured
    line = engine.lines(summary.pytorch_fp32_metric)
    assert "sentences/s" in line and "rough" in line
    assert "speed" not in replace(engine, speed=None).lines(summary.pytorch_fp32_metric)
