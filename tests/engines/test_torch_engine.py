"""The torch backend (engines/torch_encoder.py): built from the fused graph, checked against ONNX
Runtime at build time, run packed through the runtime, verified, refused where it cannot build.

On the CPU the engine attends with scaled_dot_product_attention; the short-row Triton kernel runs
on a GPU (the gpu-marked test) and, where the triton package is installed, under Triton's
interpreter on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from bert_compiler.bench.runners import _packed_fixed
from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import (
    ArtifactError,
    EnvironmentProblem,
    InputError,
    UnsupportedModelError,
)
from bert_compiler.core.targets import Environment
from bert_compiler.engines import torch_module
from bert_compiler.engines.backend import BuildSpec, load_engine
from bert_compiler.engines.batching import BatchingSpec
from bert_compiler.engines.targets import plan_targets
from bert_compiler.engines.torch_encoder import read_encoder
from bert_compiler.engines.torch_layout import EncoderLayout, LayoutError, TorchEngineOptions
from bert_compiler.engines.torch_module import TorchEncoder, graph_bucket, kernel_tiles
from bert_compiler.models.architectures import ARCHITECTURES
from bert_compiler.models.loading import resolve_model
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.runtime import encoder as runtime
from bert_compiler.runtime import tokenizing
from bert_compiler.runtime.encoder import Encoder
from bert_compiler.stages.build import build
from bert_compiler.triton import config as tc
from bert_compiler.triton.package_spec import PYTHON_INSTANCES
from tests.conftest import TINY_VERIFY, cpu_engine_dir
from tests.engines.test_gpu_engines import _cuda_reason, _skip_unless
from tests.gpus import A100, H100, T4
from tests.tiny_models import make_tiny_model

TEXTS = [
    "A man is playing a guitar.",
    "",
    "Two dogs run across a wide green field together before the rain begins. " * 6,
    "Ünïcödé façade — naïve café 東京 🙂",
    "short",
]


@pytest.mark.unit
def test_target_torch_builds_fp16_on_a_gpu_and_fp32_on_the_cpu():
    gpu = Environment(gpus=(H100, H100), torch_cuda="13.0")
    plan = plan_targets("torch", (), gpu)
    # One engine for every GPU: its file is the weights, not a plan compiled for one GPU.
    assert [(e["device"], e["precision"]) for e in plan.engines] == [("cuda", "fp16")]
    cpu = plan_targets("torch", (), Environment(gpus=(H100,)))
    assert [(e["device"], e["precision"]) for e in cpu.engines] == [("cpu", "fp32")]
    assert cpu.notes == ("torch here is a CPU build: building the torch CPU engine",)
    with pytest.raises(EnvironmentProblem, match="no NVIDIA GPU found; fp16 needs a GPU"):
        plan_targets("torch", ("fp16",), Environment())
    with pytest.raises(InputError, match="--target torch --precision fp8: the torch backend"):
        plan_targets("torch", ("fp8",), gpu)


@pytest.mark.unit
def test_torch_int8_is_refused_where_the_gpu_has_no_integer_gemms():
    """torch._int_mm's integer GEMMs need compute capability 8.0: a machine with an older GPU is
    refused in one line, before anything is built; fp8 stays TensorRT's."""
    older = Environment(gpus=(A100, T4), torch_cuda="13.0")
    with pytest.raises(EnvironmentProblem, match="Tesla T4 has compute capability 7.5; .* 8.0"):
        plan_targets("torch", ("int8",), older)
    assert plan_targets("torch", ("int8",), Environment(gpus=(A100,), torch_cuda="13.0")).engines
    with pytest.raises(InputError, match="fp8"):
        BuildSpec(backend="torch", precision="fp8").validate()


@pytest.mark.unit
def test_a_layout_this_tool_did_not_write_is_one_line():
    good = {
        "layers": 2, "hidden": 32, "heads": 2, "epsilon": 1e-12, "activation": "gelu",
        "pooling": "mean", "normalize": True, "output": "sentence_embedding",
        "input_names": ["input_ids", "attention_mask"], "token_types": False,
    }  # fmt: skip
    assert EncoderLayout.from_dict(good, "f").heads == 2
    for bad in (
        {k: v for k, v in good.items() if k != "heads"},
        {**good, "extra": 1},
        {**good, "heads": 0},
        {**good, "heads": 3},
        {**good, "activation": "relu"},
        {**good, "pooling": "max"},
        {**good, "head": ["softmax"]},
        {**good, "input_names": ["input_ids"]},
        {**good, "position_offset": -1},
    ):
        # LayoutError: the run-time module raises no bert-compiler error (the backend's load
        # reports it as an ArtifactError).
        with pytest.raises(LayoutError, match="^f: the engine's layout is not one this tool"):
            EncoderLayout.from_dict(bad, "f")


@pytest.mark.unit
def test_engine_options_this_tool_did_not_write_are_one_line():
    """The options an engine file records: the defaults where it records none (built before
    there were any), else exactly this tool's, or LayoutError (ArtifactError at load)."""
    assert TorchEngineOptions.from_metadata(None, "f") == TorchEngineOptions()
    sdpa = TorchEngineOptions(attention="sdpa", cuda_graphs=False)
    assert TorchEngineOptions.from_metadata(sdpa.to_metadata(), "f") == sdpa
    for bad in ("{", "[]", '{"attention": "flash"}', '{"cuda_graphs": 1}', '{"extra": true}'):
        with pytest.raises(LayoutError, match="^f: the engine file's options"):
            TorchEngineOptions.from_metadata(bad, "f")


@pytest.mark.unit
def test_torch_flags_where_no_torch_engine_is_built_are_refused(tiny_embedding_model, tmp_path):
    argv = ["run", "--model", str(tiny_embedding_model), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, [*argv, "--target", "cpu", "--torch-attention", "sdpa"])
    assert result.exit_code == 3, result.output  # an input error
    assert result.stderr.count("\n") == 1 and "builds no torch engine" in result.stderr
    assert not (tmp_path / "o" / "export").exists()


@pytest.mark.unit
def test_graph_buckets_hold_their_batch_and_pad_by_at_most_half():
    assert [graph_bucket(n, 16) for n in (0, 15, 16, 17, 24, 25, 32, 48, 49, 100, 128)] == [
        16, 16, 16, 24, 24, 32, 32, 48, 64, 128, 128,
    ]  # fmt: skip
    assert [graph_bucket(n, 2) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 2, 3, 4, 6, 6, 8]
    for count in range(1, 20000):
        assert count <= graph_bucket(count, 16) <= max(16, 1.5 * count)


def _build_from_tiny_run(tiny_run, folder: Path, device: str, precision: str) -> Path:
    """The tiny run's fused graph built into a torch engine in ``folder`` (outside the run)."""
    _info, out, _spec, _summary = tiny_run
    spec = BuildSpec(backend="torch", device=device, precision=precision)
    build(source=out / "fuse" / "model.onnx", out_dir=folder, spec=spec)
    return folder


@pytest.fixture(scope="module")
def torch_engine(tiny_run, tmp_path_factory) -> Path:
    """A torch CPU engine of the tiny run."""
    folder = tmp_path_factory.mktemp("torch-engine") / "engine"
    return _build_from_tiny_run(tiny_run, folder, "cpu", "fp32")


@pytest.mark.e2e
def test_torch_engine_matches_the_onnxruntime_engine_through_the_runtime(tiny_run, torch_engine):
    info, out, _spec, _summary = tiny_run
    manifest = json.loads((torch_engine / "manifest.json").read_text())
    results = manifest["results"]
    assert results["layout"]["layers"] == info.num_layers
    assert results["layout"]["pooling"] == "mean" and results["layout"]["normalize"]
    assert results["onnxruntime_check"] < 1e-5
    engine, _ = load_engine(torch_engine)
    encoder = Encoder(engine, info)
    assert encoder.packed and not encoder.batching.ladder
    got = encoder.encode(TEXTS)["sentence_embedding"]
    assert encoder.stats.padding_fraction == 0.0 and encoder.stats.rows == len(TEXTS)
    expected = Encoder.open(cpu_engine_dir(out), info).encode(TEXTS)["sentence_embedding"]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The padded entry points agree with the packed one (bench feeds them in dataset order).
    feeds = encoder.tokenize(TEXTS).matrices(engine.input_names, encoder.pad_id)
    np.testing.assert_allclose(engine.run(feeds)["sentence_embedding"], got, atol=1e-5)


@pytest.mark.e2e
def test_bench_times_a_packed_engine_at_fixed_shapes_as_the_runtime_feeds_it(torch_engine):
    engine, _ = load_engine(torch_engine)
    rng = np.random.default_rng(5)
    vocab = engine.weights["embeddings.word"].shape[0]
    feeds = {
        "input_ids": rng.integers(5, vocab, (3, 12)).astype(np.int64),
        "attention_mask": np.ones((3, 12), np.int64),
        "token_type_ids": rng.integers(0, 2, (3, 12)).astype(np.int64),
    }
    feeds = {name: feeds[name] for name in engine.input_names}
    packed = _packed_fixed(engine)(feeds)["sentence_embedding"].numpy()
    np.testing.assert_allclose(packed, engine.run(feeds)["sentence_embedding"], atol=1e-5)


_INTERPRETED = """
import sys
import numpy as np
import torch
from pathlib import Path
from bert_compiler.engines.backend import load_engine

engine, _ = load_engine(Path(sys.argv[1]))
assert engine.short_attention
rng = np.random.default_rng(3)
lengths = torch.tensor([3, 17, 9, 30, 2])
vocab = engine.weights["embeddings.word"].shape[0]
ids = torch.from_numpy(rng.integers(1, vocab, int(lengths.sum())))
types = torch.zeros_like(ids)
short = engine.run_packed(ids, types, lengths, 30)["sentence_embedding"]
# As a captured graph runs the batch: its spare tokens one extra row after empty ones, that row
# longer than the position table (positions clamped); the batch's own rows are unchanged.
total = engine.weights["embeddings.position"].shape[0] + 40
spare_ids = torch.zeros(total, dtype=torch.int64)
spare_ids[: len(ids)] = ids
spare_types = torch.zeros_like(spare_ids)
spare_lengths = torch.zeros(8, dtype=torch.int64)
spare_lengths[:5], spare_lengths[-1] = lengths, total - len(ids)
spare = engine._forward_packed(spare_ids, spare_types, spare_lengths, 32, spare_row=True)
engine.short_attention = False
reference = engine.run_packed(ids, types, lengths, 30)["sentence_embedding"]
print(float((short - reference).abs().max()))
print(float((spare["sentence_embedding"][:5] - short).abs().max()))
"""


@pytest.mark.e2e
def test_short_row_kernel_under_the_triton_interpreter(torch_engine):
    """The Triton kernel against scaled_dot_product_attention on packed rows, and a batch as a
    CUDA graph runs it (with a spare row), on the CPU through Triton's interpreter (the
    gpu-marked tests run it compiled). A process of its own: Triton reads TRITON_INTERPRET when
    it is first imported."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package is not installed (it comes with torch's CUDA build)")
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED, str(torch_engine)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    against_pytorch, spare_row = (float(v) for v in done.stdout.strip().splitlines()[-2:])
    assert against_pytorch < 1e-5 and spare_row < 1e-6


@pytest.mark.e2e
def test_heads_the_kernel_cannot_tile_fall_back_to_pytorch_attention(tmp_path):
    """A head size that is no power of two (hidden 48, 2 heads: 24) never reaches the Triton
    kernel, which tiles by powers of two; the engine attends with PyTorch there, and agrees
    with the ORT engine."""
    assert [kernel_tiles(d) for d in (8, 16, 24, 32, 64, 96, 128)] == [
        False, True, False, True, True, False, True,
    ]  # fmt: skip
    folder = make_tiny_model(
        tmp_path / "model", config_overrides={"hidden_size": 48, "num_attention_heads": 2}
    )
    info, torch_dir, ort_dir = _torch_and_ort_engines(folder, tmp_path / "out")
    got = Encoder.open(torch_dir, info).encode(TEXTS)["sentence_embedding"]
    expected = Encoder.open(ort_dir, info).encode(TEXTS)["sentence_embedding"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.e2e
def test_an_engine_file_missing_a_tensor_is_refused_in_one_line(torch_engine, tmp_path):
    """The file re-written without one tensor and its hash updated in the manifest (so only
    the layout check stands between it and a KeyError mid-run)."""
    import hashlib
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "engine"
    shutil.copytree(torch_engine, folder)
    path = folder / "encoder.safetensors"
    with safe_open(str(path), framework="pt") as opened:
        metadata = opened.metadata()
    tensors = load_file(str(path))
    del tensors["layers.1.up.weight"]
    save_file(tensors, str(path), metadata=metadata)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = path.read_bytes()
    manifest["outputs"]["encoder.safetensors"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"tensor layers.1.up.weight is missing, the layout"):
        load_engine(folder)


@pytest.mark.e2e
@pytest.mark.usefixtures("pb_utils")
def test_cli_builds_verifies_and_packages_a_torch_text_model(tiny_run, tmp_path, monkeypatch):
    """`run --target torch` builds and verifies the torch engine and packages it as a
    Python-backend text model (torch_text_model.py beside the files it imports); the gate
    re-plans and verifies it, and its model.py, loaded as Triton loads it on the CPU engine,
    answers each request with the runtime's embeddings."""
    from bert_compiler.triton.gate import verify_repository
    from tests.triton.test_package import _load_text_model

    info, _out, _spec, _summary = tiny_run
    out = tmp_path / "out"
    common = ["--model", str(info.path), "--out", str(out)]
    gates = ["--metric-limit", "100", "--no-metric-gate", "--json"]
    result = CliRunner().invoke(cli, ["run", *common, *gates, "--target", "torch"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (engine,) = summary["engines"]
    assert engine["backend"] == "torch" and engine["passed"]
    assert engine["name"].endswith("-cpu-fp32")
    repository = Path(summary["repository"]["path"])
    name = f"{info.name}-pt-cpu-fp32-text"
    folder = repository / name
    assert sorted(p.name for p in (folder / "1").iterdir()) == [
        "encoder.safetensors", "model.py", "token_rows.py", "tokenizer.json",
        "tokenizer_model.py", "torch_layout.py", "torch_module.py",
    ]  # fmt: skip
    manifest = json.loads((repository / "manifest.json").read_text())
    record = manifest["results"]["models"][name]
    assert record["role"] == "torch-text" and record["text_inputs"] == ["TEXT"]
    config = tc.parse((folder / "config.pbtxt").read_text(), folder)
    assert config.backend == "python" and config.max_batch_size == runtime.CPU_BATCHING.max_batch
    (group,) = config.instance_group
    assert group.kind == group.KIND_CPU and group.count == PYTHON_INSTANCES
    assert [t.name for t in config.input] == ["TEXT"]
    assert [t.name for t in config.output] == ["sentence_embedding"]

    gate = verify_repository(
        info=info,
        repository=repository,
        out_root=tmp_path / "gate",
        spec=TINY_VERIFY,
    )
    checked = [e for e in gate.engines if e.model == name]
    assert gate.ok and [e.status for e in checked] == ["passed"]

    model = _load_text_model(folder, config, monkeypatch)
    texts = [*TEXTS, "two dogs run across a wide green field", "a man plays a guitar"]
    requests = [texts[:1], texts[1:4], [], texts[4:]]
    answers = model.engine.run(requests)
    assert answers[2] == "a request with no texts"
    served = np.concatenate([a["sentence_embedding"] for i, a in enumerate(answers) if i != 2])
    expected = Encoder.open(out / "engines" / info.name / engine["name"], info).encode(texts)
    np.testing.assert_allclose(served, expected["sentence_embedding"], atol=1e-5)
    # Through execute, as Triton calls it: bytes in, one response per request.
    responses = model.execute([{"TEXT": np.array([[t.encode()] for t in texts[:3]], object)}])
    (response,) = responses
    np.testing.assert_allclose(
        response.tensors["sentence_embedding"], expected["sentence_embedding"][:3], atol=1e-5
    )


@pytest.mark.e2e
@pytest.mark.usefixtures("pb_utils")
def test_torch_options_name_the_engine_and_travel_in_its_file(tiny_run, tmp_path, monkeypatch):
    """--torch-attention sdpa names the engine and is written into its file, so the runtime and
    the packaged Triton text model both run it so; --no-torch-cuda-graphs does not apply to a
    CPU engine (no graphs there) and leaves its name alone."""
    from tests.triton.test_package import _load_text_model

    info = tiny_run[0]
    out = tmp_path / "out"
    argv = ["run", "--model", str(info.path), "--out", str(out), "--target", "torch"]
    options = ["--torch-attention", "sdpa", "--no-torch-cuda-graphs"]
    gates = ["--metric-limit", "50", "--no-metric-gate", "--json"]
    result = CliRunner().invoke(cli, [*argv, *options, *gates])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (engine,) = summary["engines"]
    assert engine["name"].endswith("-cpu-fp32-sdpa") and engine["passed"]
    manifest = json.loads(Path(engine["manifest"]).read_text())
    assert (manifest["spec"]["attention"], manifest["spec"]["cuda_graphs"]) == ("sdpa", True)
    loaded, _ = load_engine(Path(engine["manifest"]).parent)
    assert loaded.options == TorchEngineOptions(attention="sdpa") and not loaded.short_attention
    folder = Path(summary["repository"]["path"]) / f"{info.name}-pt-cpu-fp32-sdpa-text"
    config = tc.parse((folder / "config.pbtxt").read_text(), folder)
    model = _load_text_model(folder, config, monkeypatch)
    assert sys.modules["torch_layout"].__file__ == str(folder / "1" / "torch_layout.py")
    # The copy's own TorchEngineOptions class: equal fields, not an equal object.
    served = model.engine.engine
    assert (served.options.attention, served.options.cuda_graphs) == ("sdpa", True)


def _torch_and_ort_engines(folder: Path, out: Path):
    """`run` of a tiny model with the torch engine and the ORT CPU engine, both verified."""
    info = resolve_model(folder)
    builds = (BuildSpec(backend="torch"), BuildSpec())
    summary = run_pipeline(info=info, out=out, spec=RunSpec(builds=builds, verify=TINY_VERIFY))
    assert summary.ok, summary.engines
    torch_dir, ort_dir = (e.manifest.parent for e in summary.engines)
    return info, torch_dir, ort_dir


SUPPORTED = ("bert", "roberta", "xlm-roberta", "distilbert")


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_architectures_build_or_are_refused_in_one_line(model_type, tmp_path):
    """Every registered architecture: the embedding model's torch engine equals the ORT
    engine through the runtime, or the build refuses it in one line naming what to do."""
    folder = make_tiny_model(tmp_path / "model", model_type=model_type)
    if model_type not in SUPPORTED:
        result = CliRunner().invoke(
            cli,
            ["run", "--model", str(folder), "--out", str(tmp_path / "out"), "--target", "torch"],
        )
        assert result.exit_code == 4, result.output
        (line,) = [x for x in result.stderr.splitlines() if "error" in x]
        assert "--target cpu or cuda" in line
        return
    info, torch_dir, ort_dir = _torch_and_ort_engines(folder, tmp_path / "out")
    layout = json.loads((torch_dir / "manifest.json").read_text())["results"]["layout"]
    # RoBERTa numbers positions after its padding index (1): rows 0 and 1 are never read.
    assert layout["position_offset"] == (2 if "roberta" in model_type else 0)
    got = Encoder.open(torch_dir, info).encode(TEXTS)["sentence_embedding"]
    expected = Encoder.open(ort_dir, info).encode(TEXTS)["sentence_embedding"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.e2e
def test_a_dense_module_after_pooling_runs_in_both_engines_as_sentence_transformers_runs_it(
    tmp_path,
):
    """A sentence-transformers Dense layer (Tanh, 32 -> 24, as distiluse-base-multilingual's
    768 -> 512) between pooling and normalisation: the torch engine and the ORT engine, both
    verified, give sentence-transformers' own embeddings of the model (an independent
    reference), in its projected width."""
    from sentence_transformers import SentenceTransformer

    folder = make_tiny_model(tmp_path / "model", dense_features=24)
    info, torch_dir, ort_dir = _torch_and_ort_engines(folder, tmp_path / "out")
    layout = json.loads((torch_dir / "manifest.json").read_text())["results"]["layout"]
    assert (layout["pooling"], layout["head"], layout["normalize"]) == ("mean", ["tanh"], True)
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    assert expected.shape == (len(TEXTS), 24)
    for engine in (torch_dir, ort_dir):
        got = Encoder.open(engine, info).encode(TEXTS)["sentence_embedding"]
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("model_type", "labels", "head"),
    [("bert", 2, "tanh"), ("bert", 1, "tanh"), ("distilbert", 2, "relu")],
    ids=["classifier", "cross-encoder", "distilbert-classifier"],
)
def test_classifier_heads_match_the_onnxruntime_engine(model_type, labels, head, tmp_path):
    """Sequence-classification heads (first token, dense + tanh or relu, classifier) on the
    torch engine: 2-label classifiers on sentences and a 1-label cross-encoder on pairs, each
    verified and equal to the ORT engine's logits through the runtime."""
    folder = make_tiny_model(
        tmp_path / "model", model_type=model_type, task="sequence-classification", num_labels=labels
    )
    info, torch_dir, ort_dir = _torch_and_ort_engines(folder, tmp_path / "out")
    manifest = json.loads((torch_dir / "manifest.json").read_text())
    assert manifest["results"]["layout"]["head"] == [head, "none"]
    texts = [(a, b) for a, b in zip(TEXTS, reversed(TEXTS), strict=True)] if labels == 1 else TEXTS
    got = Encoder.open(torch_dir, info).encode(texts)
    expected = Encoder.open(ort_dir, info).encode(texts)
    ((name, logits),) = got.items()
    assert logits.shape == (len(texts), labels)
    np.testing.assert_allclose(logits, expected[name], atol=1e-5)
    # As a CUDA graph runs a batch that fills its token bucket exactly: empty rows after the
    # batch's, starting past its last token; the first-token head still reads the real rows.
    engine, _ = load_engine(torch_dir)
    lengths = torch.tensor([4, 9, 3])
    ids = torch.arange(1, 17) % engine.weights["embeddings.word"].shape[0]
    types = torch.zeros_like(ids)
    alone = engine.run_packed(ids, types, lengths, 9)[name]
    bucket = engine._forward_packed(ids, types, torch.tensor([4, 9, 3, 0, 0]), 9, spare_row=True)
    np.testing.assert_allclose(bucket[name][:3].numpy(), alone.numpy(), atol=1e-6)


def _fused_graph(tiny_run) -> onnx.ModelProto:
    _info, out, _spec, _summary = tiny_run
    return onnx.load(str(out / "fuse" / "model.onnx"))


@pytest.mark.e2e
def test_graphs_of_another_layout_are_refused_in_one_line(tiny_run):
    graph = _fused_graph(tiny_run)
    layout, tensors = read_encoder(graph, "fused")
    assert tensors["layers.0.qkv.weight"].shape == (3 * layout.hidden, layout.hidden)
    # A classifier head after the pooling: not a head this backend builds.
    head = onnx.helper.make_node("MatMul", [graph.graph.output[0].name, "head_w"], ["logits"])
    classifier = onnx.ModelProto()
    classifier.CopyFrom(graph)
    classifier.graph.node.append(head)
    classifier.graph.initializer.append(
        onnx.numpy_helper.from_array(np.ones((layout.hidden, 2), np.float32), "head_w")
    )
    del classifier.graph.output[:]
    classifier.graph.output.append(onnx.helper.make_tensor_value_info("logits", 1, None))
    with pytest.raises(UnsupportedModelError, match=r"head after the last layer \(.*MatMul"):
        read_encoder(classifier, "fused")
    # Embeddings neither fused nor a LayerNormalization of table lookups.
    unfused = onnx.ModelProto()
    unfused.CopyFrom(graph)
    kept = [n for n in unfused.graph.node if n.op_type != "EmbedLayerNormalization"]
    del unfused.graph.node[:]
    unfused.graph.node.extend(kept)
    with pytest.raises(
        UnsupportedModelError, match="no LayerNormalization before attention"
    ) as err:
        read_encoder(unfused, "fused")
    assert "\n" not in str(err.value) and "--target cpu or cuda" in str(err.value)


@pytest.mark.e2e
def test_a_graph_read_wrongly_never_becomes_an_engine(tiny_run, tmp_path):
    """The build compares the engine with ONNX Runtime on the same graph: a graph whose weights
    the reader takes for another layout (here: an epsilon it does not apply) is refused."""
    graph = _fused_graph(tiny_run)
    for node in graph.graph.node:
        if node.op_type == "Attention":
            # A mask of its own: ORT then attends over every position, the reader refuses.
            node.input[3] = node.input[0]
    source = tmp_path / "model.onnx"
    onnx.save(graph, str(source))
    with pytest.raises(UnsupportedModelError, match="takes another mask"):
        build(source=source, out_dir=tmp_path / "engine", spec=BuildSpec(backend="torch"))
    assert not (tmp_path / "engine" / "encoder.safetensors").exists()


@pytest.fixture(scope="module")
def cuda_torch_engine(tiny_run, tmp_path_factory) -> Path:
    """A torch fp16 engine of the tiny run, on the GPU."""
    _skip_unless(_cuda_reason())
    folder = tmp_path_factory.mktemp("cuda-torch-engine") / "engine"
    return _build_from_tiny_run(tiny_run, folder, "cuda", "fp16")


@pytest.mark.gpu
@pytest.mark.e2e
def test_torch_cuda_fp16_engine_with_the_short_row_kernel(
    tiny_run, torch_engine, cuda_torch_engine
):
    """fp16 on the GPU, the Triton kernel compiled, through the runtime: the CPU fp32 engine's
    embeddings to fp16 accuracy, packed and padded entry points alike."""
    info = tiny_run[0]
    engine, manifest = load_engine(cuda_torch_engine)
    assert engine.short_attention and manifest["results"]["short_attention"]
    # The build ran the engine on this GPU against ONNX Runtime's rows (fp16: not 0, small).
    assert 0 < manifest["results"]["device_check"] < 1e-2
    encoder = Encoder(engine, info)
    got = encoder.encode(TEXTS)["sentence_embedding"]
    expected = Encoder(load_engine(torch_engine)[0], info).encode(TEXTS)["sentence_embedding"]
    np.testing.assert_allclose(got, expected, atol=3e-3)
    on_gpu = encoder.encode(TEXTS, device_outputs=True)["sentence_embedding"]
    np.testing.assert_allclose(on_gpu.cpu().numpy(), got, atol=1e-6)
    feeds = encoder.tokenize(TEXTS).matrices(engine.input_names, encoder.pad_id)
    np.testing.assert_allclose(engine.run(feeds)["sentence_embedding"], got, atol=3e-3)


@pytest.mark.gpu
@pytest.mark.e2e
def test_small_gpu_batches_replay_cuda_graphs_with_the_eager_outputs(
    tiny_run, cuda_torch_engine, monkeypatch
):
    """One sentence per batch, and small mixed batches, replay a graph per bucket (rows of one
    bucket with different tokens and spare rows reuse it); the outputs are the eager engine's,
    also past GRAPH_LIMIT, where batches run eagerly."""
    info = tiny_run[0]
    engine, _ = load_engine(cuda_torch_engine)
    eager = TorchEncoder(
        engine.path, engine.layout, "cuda", "fp16", options=TorchEngineOptions(cuda_graphs=False)
    )
    assert engine.graphs and not eager.graphs
    texts = [f"{text} {index}" for index in range(6) for text in TEXTS]
    for batching in (BatchingSpec(max_batch=1, token_budget=512), BatchingSpec(5, 512)):
        got = Encoder(engine, info, batching=batching).encode(texts)["sentence_embedding"]
        want = Encoder(eager, info, batching=batching).encode(texts)["sentence_embedding"]
        np.testing.assert_allclose(got, want, atol=2e-3)
    captured = len(engine._captured)
    assert 0 < captured < len(texts) and not eager._captured
    Encoder(engine, info, batching=BatchingSpec(1, 512)).encode(texts)
    assert len(engine._captured) == captured
    # Batches of 3 rows fall in buckets not captured yet, refused past the limit.
    tokens = Encoder(engine, info).tokenize(texts)
    needed = set()
    for batch in Encoder(engine, info, batching=BatchingSpec(3, 512)).plan(tokens):
        lengths = tokens.lengths[batch.rows]
        if lengths.max() <= torch_module.SHORT_ATTENTION_MAX:
            tile = torch_module._attention_tile(int(lengths.max()))
            needed.add(
                (graph_bucket(int(lengths.sum()), 16), graph_bucket(len(lengths) + 1, 2), tile)
            )
    assert needed - set(engine._captured)
    monkeypatch.setattr(torch_module, "GRAPH_LIMIT", captured)
    unseen = Encoder(engine, info, batching=BatchingSpec(3, 512)).encode(texts)
    assert len(engine._captured) == captured
    expected = Encoder(eager, info, batching=BatchingSpec(3, 512)).encode(texts)
    np.testing.assert_allclose(
        unseen["sentence_embedding"], expected["sentence_embedding"], atol=2e-3
    )


@pytest.mark.gpu
@pytest.mark.e2e
def test_windows_in_flight_two_at_a_time_keep_every_output_in_its_place(
    tiny_run, cuda_torch_engine, monkeypatch
):
    """encode queues a window's batches before it collects the last window's outputs, each
    staged through its own pinned buffers; many small windows of distinct texts (and run's
    chunks) come back as one run of every row gives them, on the host and kept on the GPU, and
    every batch is timed."""
    info = tiny_run[0]
    engine, _ = load_engine(cuda_torch_engine)
    texts = [f"{text} {'word ' * (index % 7)}{index}" for index in range(40) for text in TEXTS]
    encoder = Encoder(engine, info, batching=BatchingSpec(4, 512), tokenizer_workers=0)
    tokens = encoder.tokenize(texts)
    whole = encoder.run(tokens)["sentence_embedding"]
    monkeypatch.setattr(tokenizing, "WINDOW_FIRST", 8)
    monkeypatch.setattr(tokenizing, "WINDOW_ROWS", 24)
    encoder.time_batches = True
    got = encoder.encode(texts)
    np.testing.assert_allclose(got["sentence_embedding"], whole, atol=1e-6)
    assert encoder.stats.rows == len(texts)
    assert len(encoder.stats.batch_ms) == encoder.stats.batches
    assert all(ms > 0 for ms in encoder.stats.batch_ms)
    kept = encoder.encode(texts, device_outputs=True)["sentence_embedding"]
    np.testing.assert_allclose(kept.cpu().numpy(), whole, atol=1e-6)
    monkeypatch.setattr(runtime, "CHUNK_ROWS", 16)
    np.testing.assert_allclose(encoder.run(tokens)["sentence_embedding"], whole, atol=1e-6)
    assert len(encoder.stats.batch_ms) == encoder.stats.batches


@pytest.mark.gpu
@pytest.mark.e2e
def test_a_capture_that_fails_turns_graphs_off_and_runs_eagerly(
    tiny_run, cuda_torch_engine, monkeypatch, caplog
):
    info = tiny_run[0]
    engine, _ = load_engine(cuda_torch_engine)
    expected = Encoder(engine, info).encode(TEXTS)["sentence_embedding"]
    assert engine._captured

    def refuse(*_args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test's)")

    monkeypatch.setattr(engine, "_try_capture", refuse)
    with caplog.at_level("WARNING", logger="bert_compile"):
        got = Encoder(engine, info, batching=BatchingSpec(1, 512)).encode(TEXTS)
    assert "CUDA graphs off (capture: CUDA out of memory (a test's))" in caplog.text
    assert not engine.graphs and not engine._captured
    np.testing.assert_allclose(got["sentence_embedding"], expected, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.e2e
@pytest.mark.parametrize(
    ("model_type", "task", "labels"),
    [("roberta", "sentence-embedding", 2), ("bert", "sequence-classification", 1)],
    ids=["roberta", "cross-encoder"],
)
def test_torch_cuda_fp16_engines_of_other_layouts(model_type, task, labels, tmp_path):
    """RoBERTa's offset positions and a cross-encoder's float32 head on the GPU in fp16: the
    same outputs as the CPU fp32 engine, to fp16 accuracy."""
    _skip_unless(_cuda_reason())
    folder = make_tiny_model(
        tmp_path / "model", model_type=model_type, task=task, num_labels=labels
    )
    info = resolve_model(folder)
    builds = (
        BuildSpec(backend="torch", device="cuda", precision="fp16"),
        BuildSpec(backend="torch"),
    )
    summary = run_pipeline(
        info=info, out=tmp_path / "out", spec=RunSpec(builds=builds, verify=TINY_VERIFY)
    )
    assert summary.ok, summary.engines
    cuda_dir, cpu_dir = (e.manifest.parent for e in summary.engines)
    texts = [(a, b) for a, b in zip(TEXTS, reversed(TEXTS), strict=True)] if labels == 1 else TEXTS
    got = Encoder.open(cuda_dir, info).encode(texts)
    expected = Encoder.open(cpu_dir, info).encode(texts)
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], atol=3e-3)
