"""GPU engines on a real GPU: ONNX Runtime CUDA (marked gpu) and TensorRT (marked tensorrt).

Each builds, runs and verifies a tiny BERT through the pipeline on the GPU it finds; where the
package or the GPU is missing, the test is skipped with a reason naming what is missing. Nothing
here fakes a backend: the CPU-side logic of both backends is tested in test_targets.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bert_compiler.core.errors import EnvironmentProblem
from bert_compiler.engines.backend import BuildSpec, load_engine
from bert_compiler.engines.batching import row_sizes
from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
from bert_compiler.engines.tensorrt_options import Profile, TensorRTOptions
from bert_compiler.models.loading import resolve_model
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.run_summary import EngineReport
from tests.closeness import assert_passed_at_the_gate
from tests.conftest import TINY_VERIFY

pytestmark = pytest.mark.e2e


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def _ort_cuda_reason() -> str | None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (
            f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
            "(the onnxruntime-gpu package is not installed)"
        )
    return _cuda_reason()


def _tensorrt_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as err:
        return f"import tensorrt failed: {err}"
    return _cuda_reason()


def _skip_unless(reason: str | None) -> None:
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
def test_ort_cuda_fp16_engine_builds_runs_and_verifies(tiny_embedding_model, tmp_path):
    _skip_unless(_ort_cuda_reason())
    info = resolve_model(tiny_embedding_model)
    builds = (
        BuildSpec(device="cuda", precision="fp16"),
        BuildSpec(
            device="cuda", precision="fp16", options=OnnxRuntimeBuildOptions(cuda_graph=True)
        ),
        BuildSpec(device="cuda", precision="fp32"),
    )
    summary = run_pipeline(info=info, out=tmp_path, spec=RunSpec(builds=builds, verify=TINY_VERIFY))
    assert summary.ok, summary.engines
    names = [e.name for e in summary.engines]
    assert all("-cuda-sm" in n for n in names) and names[1].endswith("-fp16-cudagraph")
    for engine in summary.engines:
        manifest = json.loads(engine.manifest.read_text())
        assert manifest["results"]["provider"] == "CUDAExecutionProvider"
        assert manifest["spec"]["providers"][0][0] == "CUDAExecutionProvider"
    fp16 = json.loads(summary.engines[0].manifest.read_text())
    assert fp16["results"]["fp16_weight_fraction"] > 0.9


@pytest.mark.gpu
def test_ort_cuda_engine_refused_on_another_gpu(tiny_embedding_model, tmp_path):
    _skip_unless(_ort_cuda_reason())
    info = resolve_model(tiny_embedding_model)
    spec = RunSpec(builds=(BuildSpec(device="cuda", precision="fp16"),), verify=TINY_VERIFY)
    summary = run_pipeline(info=info, out=tmp_path / "run", spec=spec)
    engine_dir = summary.engines[0].manifest.parent
    moved = tmp_path / "other-gpu"
    shutil.copytree(engine_dir, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["results"]["compute_capability"] = "7.0"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EnvironmentProblem, match="compute capability 7.0"):
        load_engine(moved)


def _engine_config(repository: Path, name: str):
    from bert_compiler.triton.config import parse

    path = repository / name / "config.pbtxt"
    return parse(path.read_text(), path)


@pytest.mark.gpu
def test_gpu_and_cpu_engines_in_one_triton_repository(tiny_embedding_model, tmp_path):
    """ORT CUDA fp16 + fp32 and the CPU engine packaged together; verify --repository loads the
    file named for this GPU's compute capability and re-verifies every engine."""
    _skip_unless(_ort_cuda_reason())
    # Triton configs are written through tritonclient's protobuf (a product dependency the GPU
    # machine's image lacks: there this test said "No module named 'tritonclient'").
    pytest.importorskip("tritonclient.grpc")
    from bert_compiler.core.targets import current_gpu
    from bert_compiler.triton.gate import verify_repository
    from bert_compiler.triton.package_spec import PackageSpec

    info = resolve_model(tiny_embedding_model)
    builds = (
        BuildSpec(device="cuda", precision="fp16"),
        BuildSpec(device="cuda", precision="fp32"),
        BuildSpec(),
    )
    spec = RunSpec(builds=builds, verify=TINY_VERIFY, package=PackageSpec())
    summary = run_pipeline(info=info, out=tmp_path, spec=spec)
    assert summary.ok, summary.engines
    repository = summary.repository.path
    capability, _ = current_gpu("the test")
    filename = f"model.sm{capability.replace('.', '')}.onnx"
    fp16 = _engine_config(repository, f"{info.name}-ort-cuda-fp16")
    assert dict(fp16.cc_model_filenames) == {capability: filename}
    assert not fp16.default_model_filename and (repository / fp16.name / "1" / filename).is_file()
    assert fp16.instance_group[0].kind == fp16.instance_group[0].KIND_GPU
    fp32 = _engine_config(repository, f"{info.name}-ort-cuda-fp32")
    (accelerator,) = fp32.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "cuda" and accelerator.parameters["use_tf32"] == "0"
    cpu = _engine_config(repository, f"{info.name}-ort-cpu-fp32")
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU
    gate = verify_repository(
        info=info, repository=repository, out_root=tmp_path / "gate", spec=TINY_VERIFY
    )
    assert gate.ok, gate
    assert sorted((e.model, e.status) for e in gate.engines) == [
        (f"{info.name}-ort-cpu-fp32", "passed"),
        (f"{info.name}-ort-cuda-fp16", "passed"),
        (f"{info.name}-ort-cuda-fp32", "passed"),
    ]


@pytest.mark.tensorrt
def test_tensorrt_engine_builds_runs_and_verifies(tiny_embedding_model, tmp_path):
    _skip_unless(_tensorrt_reason())
    info = resolve_model(tiny_embedding_model)
    two_profiles = TensorRTOptions(
        profiles=(Profile(1, 8, 16, 1, 16, 16), Profile(1, 16, 64, 17, 128, 128))
    )
    builds = (
        BuildSpec(backend="tensorrt", device="cuda", precision="fp16", options=two_profiles),
        BuildSpec(backend="tensorrt", device="cuda", precision="fp32", options=two_profiles),
    )
    from bert_compiler.triton.gate import verify_repository
    from bert_compiler.triton.package_spec import PackageSpec

    summary = run_pipeline(
        info=info,
        out=tmp_path,
        spec=RunSpec(builds=builds, verify=TINY_VERIFY, package=PackageSpec()),
    )
    assert summary.ok, summary.engines
    fp16, fp32 = summary.engines
    repository = summary.repository.path
    config = _engine_config(repository, f"{info.name}-trt-fp16")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert list(config.instance_group[0].profile) == ["0", "1"]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    (plan,) = config.cc_model_filenames.values()
    assert (repository / config.name / "1" / plan).is_file()
    gate = verify_repository(
        info=info, repository=repository, out_root=tmp_path / "gate", spec=TINY_VERIFY
    )
    assert gate.ok and {e.status for e in gate.engines} == {"passed"}
    assert fp16.name.startswith("trt") and "-sm" in fp16.name
    engine, manifest = load_engine(fp16.manifest.parent)
    assert manifest["results"]["profiles"] == [str(p) for p in two_profiles.profiles]
    # A shape in each profile, then one outside all of them.
    import numpy as np

    for batch, seq in ((2, 5), (3, 40)):
        feeds = {n: np.ones((batch, seq), dtype=np.int64) for n in info.architecture.input_names}
        (out,) = engine.run(feeds).values()
        assert out.shape[0] == batch and np.isfinite(out).all()
    from bert_compiler.core.errors import InputError

    with pytest.raises(InputError, match="outside every profile"):
        engine.run({n: np.ones((65, 8), dtype=np.int64) for n in info.architecture.input_names})
    # The timing cache written by the first build is read by a forced rebuild.
    rebuilt = run_pipeline(
        info=info,
        out=tmp_path,
        spec=RunSpec(builds=builds[:1], verify=TINY_VERIFY),
        force=True,
    )
    manifest = json.loads(rebuilt.engines[0].manifest.read_text())
    assert manifest["results"]["timing_cache_hit"] is True


def run_tensorrt_engine(model, out: Path, precision: str) -> EngineReport:
    """`run` of one TensorRT engine of ``precision`` from ``model`` into ``out``: its summary."""
    spec = RunSpec(
        builds=(BuildSpec(backend="tensorrt", device="cuda", precision=precision),),
        verify=replace(TINY_VERIFY, precision=precision),
    )
    (engine,) = run_pipeline(info=resolve_model(model), out=out, spec=spec).engines
    return engine


@pytest.mark.tensorrt
def test_tensorrt_int8_engine_from_qdq_graph(tiny_embedding_model, tmp_path):
    _skip_unless(_tensorrt_reason())
    engine = run_tensorrt_engine(tiny_embedding_model, tmp_path, "int8")
    assert engine.name.endswith("-int8")
    assert_passed_at_the_gate(engine, "int8")


@pytest.mark.gpu
def test_runtime_on_a_cuda_graph_engine_matches_one_row_at_a_time(tiny_embedding_model, tmp_path):
    """The runtime's GPU path (one upload through kept pinned buffers, batches gathered on the
    device and queued without host waits, ladder-padded shapes, bounded row counts) gives each
    row what the engine gives it alone, in input order, on the host or left on the GPU."""
    _skip_unless(_ort_cuda_reason())
    from bert_compiler.runtime.encoder import Encoder

    info = resolve_model(tiny_embedding_model)
    graphs = OnnxRuntimeBuildOptions(cuda_graph=True)
    builds = (BuildSpec(device="cuda", precision="fp16", options=graphs),)
    summary = run_pipeline(info=info, out=tmp_path, spec=RunSpec(builds=builds, verify=TINY_VERIFY))
    assert summary.ok, summary.engines
    encoder = Encoder.open(summary.engines[0].manifest.parent, info)
    texts = [("word " * (i % 23)).strip() for i in range(300)]
    embeddings = encoder.encode(texts)["sentence_embedding"]
    assert encoder.on_gpu and encoder.batching.ladder and encoder.batching.round_rows
    assert encoder.stats.shapes <= len(encoder.batching.ladder) * len(row_sizes(1024))
    # ORT computes on the stream it was given: runs are ordered by events, not host waits.
    assert encoder.engine.stream is not None
    for i in (0, 1, 5, 22, 299):
        alone = encoder.engine.run(
            encoder.tokenize([texts[i]]).matrices(encoder.engine.input_names, 0)
        )
        np.testing.assert_allclose(embeddings[i], alone["sentence_embedding"][0], atol=2e-3)
    # Twice more: the kept pinned buffers are rewritten, results already returned are not.
    kept = encoder.encode(texts, device_outputs=True)["sentence_embedding"]
    again = encoder.encode(texts[::-1])["sentence_embedding"]
    assert kept.is_cuda and kept.shape == embeddings.shape
    np.testing.assert_allclose(kept.cpu().numpy(), embeddings, atol=1e-6)
    np.testing.assert_allclose(again[::-1], embeddings, atol=2e-3)
    assert np.isfinite(embeddings).all() and len(np.unique(embeddings[:, 0])) > 10


@pytest.mark.gpu
def test_packed_attention_engine_matches_the_padded_fp16_engine(tiny_embedding_model, tmp_path):
    """ORT's packing mode (RemovePadding, PackedAttention, RestorePadding) built, verified against
    PyTorch and run through the runtime without CUDA graphs: every row as the padded fp16 engine
    gives it, within fp16 tolerance, on batches mixing an empty text with long ones."""
    _skip_unless(_ort_cuda_reason())
    import onnx

    from bert_compiler.runtime.encoder import Encoder

    info = resolve_model(tiny_embedding_model)
    padded = BuildSpec(device="cuda", precision="fp16")
    builds = (
        padded,
        replace(padded, options=OnnxRuntimeBuildOptions(packed_attention=True)),
        BuildSpec(
            device="cuda", precision="fp32", options=OnnxRuntimeBuildOptions(packed_attention=True)
        ),
    )
    summary = run_pipeline(info=info, out=tmp_path, spec=RunSpec(builds=builds, verify=TINY_VERIFY))
    assert summary.ok, summary.engines
    names = [e.name for e in summary.engines]
    assert not names[0].endswith("-packed-attention")
    assert names[1].endswith("-fp16-packed-attention") and names[2].endswith(
        "-fp32-packed-attention"
    )
    folders = [e.manifest.parent for e in summary.engines]
    for folder in folders[1:]:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["spec"]["session"]["packed_attention"] is True
        assert manifest["results"]["packed_attention_ops"] == {
            "RemovePadding": 1,
            "PackedAttention": 2,
            "RestorePadding": 1,
        }
        ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
        assert {
            "RemovePadding",
            "PackedAttention",
            "RestorePadding",
        } <= ops and "Attention" not in ops

    reference, packed = (Encoder.open(folder, info) for folder in folders[:2])
    assert packed.on_gpu and not packed.engine.options.cuda_graph
    texts = ["", *[("word " * (i % 37)).strip() + f" {i}" for i in range(299)]]
    expected = reference.encode(texts)["sentence_embedding"]
    got = packed.encode(texts)["sentence_embedding"]
    assert np.isfinite(got).all() and len(np.unique(got[:, 0])) > 10
    np.testing.assert_allclose(got, expected, atol=2e-3)
    # One batch padded to its longest row (an empty text, a long one, a short one) straight
    # through the engines, and left on the GPU through the runtime.
    feeds = packed.tokenize(["", "word " * 60, "a b"]).matrices(packed.engine.input_names, 0)
    np.testing.assert_allclose(
        packed.engine.run(feeds)["sentence_embedding"],
        reference.engine.run(feeds)["sentence_embedding"],
        atol=2e-3,
    )
    on_device = packed.encode(texts, device_outputs=True)["sentence_embedding"]
    np.testing.assert_allclose(on_device.cpu().numpy(), got, atol=1e-6)
