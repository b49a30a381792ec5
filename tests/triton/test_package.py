"""package: the Triton repository generator, its checks, and verify --repository on tiny models."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bert_compiler.cli.commands import cli
from bert_compiler.core.artifacts import StageRecord, sha256_file, sha256_json
from bert_compiler.core.errors import ArtifactError, InputError, ParityError
from bert_compiler.core.lock import HOLDER_FILE, LOCK_FILE
from bert_compiler.engines.backend import budget_batch_sizes
from bert_compiler.engines.batching import rung
from bert_compiler.runtime.encoder import CPU_BATCHING
from bert_compiler.runtime.text import tokenize
from bert_compiler.runtime.tokenizing import ladder_from_text
from bert_compiler.triton import config as tc
from bert_compiler.triton.gate import verify_repository
from bert_compiler.triton.onnxruntime_model import CUDA_OPTIONS_PARAMETER, DEVICE_PARAMETER
from bert_compiler.triton.package import package
from bert_compiler.triton.package_spec import (
    PYTHON_INSTANCES,
    TEMPLATES,
    TEXT_RUN_COST_TOKENS,
    TRITON_LADDER_RUNGS,
    PackageSpec,
    VerifiedEngine,
    verified_engines,
)
from bert_compiler.triton.plan import (
    _batching,
    _engine_files,
    engine_kind,
    plan_repository,
)
from bert_compiler.triton.repository import open_repository, repository_problems
from bert_compiler.triton.tokenizer_json import tokenizer_json
from bert_compiler.triton.tokenizer_model import decode_texts, encode, parse_ladder
from tests.conftest import TINY_VERIFY, cpu_engine_dir


@pytest.fixture(scope="module")
def repository(tiny_run, tmp_path_factory):
    info, out, _spec, _summary = tiny_run
    path = tmp_path_factory.mktemp("triton") / "repo"
    result = package(info=info, out=out, repository=path, spec=PackageSpec(python_cpu_engine=True))
    return info, out, result


@pytest.fixture(scope="module")
def ensemble_repository(tiny_run, tmp_path_factory):
    """--python-text ensemble: the tokenizer model -> a Python engine model taking tokens."""
    info, out, _spec, _summary = tiny_run
    path = tmp_path_factory.mktemp("triton") / "repo"
    spec = PackageSpec(python_cpu_engine=True, python_text="ensemble")
    return info, out, package(info=info, out=out, repository=path, spec=spec)


def _configs(path: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {
        folder.name: text_format.Parse(
            (folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        for folder in sorted(path.iterdir())
        if folder.is_dir()
    }


@pytest.mark.e2e
def test_every_config_parses_with_tritons_proto(repository):
    info, _out, result = repository
    configs = _configs(result.path)
    slug = info.name
    assert set(configs) == {
        f"{slug}-tokenizer",
        f"{slug}-ort-cpu-fp32",
        f"{slug}-ort-cpu-fp32-text",
        f"{slug}-ort-cpu-fp32-python-text",
    }
    assert all(config.name == name for name, config in configs.items())
    engine = configs[f"{slug}-ort-cpu-fp32"]
    assert engine.platform == "onnxruntime_onnx" and engine.max_batch_size == 64
    assert [g.kind for g in engine.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert not engine.cc_model_filenames and engine.HasField("dynamic_batching")
    assert configs[f"{slug}-tokenizer"].backend == "python"
    assert configs[f"{slug}-ort-cpu-fp32-text"].platform == "ensemble"
    # Python-backend models run PYTHON_INSTANCES processes; engine models on a backend of their
    # own, --instances (1).
    counts = {name: [g.count for g in c.instance_group] for name, c in configs.items()}
    assert counts[f"{slug}-tokenizer"] == counts[f"{slug}-ort-cpu-fp32-python-text"] == [2]
    assert PYTHON_INSTANCES == 2 and counts[f"{slug}-ort-cpu-fp32"] == [1]


@pytest.mark.e2e
def test_python_text_model_holds_the_engine_and_the_tokenizer(repository):
    info, out, result = repository
    slug = info.name
    configs = _configs(result.path)
    text = configs[f"{slug}-ort-cpu-fp32-python-text"]
    engine = configs[f"{slug}-ort-cpu-fp32"]
    assert text.backend == "python" and not text.ensemble_scheduling.step
    assert [(t.name, t.data_type) for t in text.input] == [("TEXT", model_config_pb2.TYPE_STRING)]
    assert not any(t.allow_ragged_batch for t in text.input)
    assert list(text.output) == list(engine.output)
    assert text.parameters["run_cost_tokens"].string_value == str(TEXT_RUN_COST_TOKENS)
    folder = result.path / f"{slug}-ort-cpu-fp32-python-text" / "1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.onnx", "model.py", "onnxruntime_model.py", "token_rows.py", "tokenizer.json",
        "tokenizer_model.py",
    ]  # fmt: skip
    for name, role in [
        ("model.py", "python-text"),
        ("tokenizer_model.py", "tokenizer"),
        ("token_rows.py", "token-rows"),
        ("onnxruntime_model.py", "python-engine"),
    ]:
        assert (folder / name).read_bytes() == TEMPLATES[role].read_bytes()
    tokenizer = result.path / f"{slug}-tokenizer" / "1" / "tokenizer.json"
    assert (folder / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert sha256_file(folder / "model.onnx") == sha256_file(cpu_engine_dir(out) / "model.onnx")
    record = result.manifest["results"]["models"][f"{slug}-ort-cpu-fp32-python-text"]
    assert record["role"] == "python-text" and record["files"]["1/model.onnx"]["verification"]


def _load_text_model(folder: Path, config, monkeypatch, gpu: int | None = None):
    """model.py of a Python text model loaded as Triton loads it (a file of its own, importing
    the copies beside it) and initialized on the packaged folder and config (``gpu``: as an
    instance on that GPU)."""
    import importlib.util
    import sys

    from google.protobuf import json_format

    monkeypatch.setattr(sys, "path", list(sys.path))
    copies = ("tokenizer_model", "onnxruntime_model", "token_rows", "torch_module", "torch_layout")
    for module in copies:
        monkeypatch.delitem(sys.modules, module, raising=False)
    loaded = importlib.util.spec_from_file_location("model", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    assert sys.modules["tokenizer_model"].__file__ == str(folder / "1" / "tokenizer_model.py")
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_repository": str(folder),
            "model_version": "1",
            "model_instance_kind": "CPU" if gpu is None else "GPU",
            "model_instance_device_id": str(gpu or 0),
        }
    )
    return model


@pytest.mark.e2e
def test_python_text_model_gives_the_runtimes_outputs(repository, monkeypatch):
    from bert_compiler.runtime.encoder import Encoder

    info, out, result = repository
    name = f"{info.name}-ort-cpu-fp32-python-text"
    model = _load_text_model(result.path / name, _configs(result.path)[name], monkeypatch)
    texts = [*HARD_TEXTS, "A man plays a guitar.", "Two dogs run across a wide green field."]
    requests = [texts[:1], texts[1:4], texts[4:5], texts[5:]]
    answers = model.engine.run(requests)
    expected = Encoder.open(cpu_engine_dir(out), info).encode(texts)["sentence_embedding"]
    served = np.concatenate([a["sentence_embedding"] for a in answers])
    np.testing.assert_allclose(served, expected, atol=2e-5)


@pytest.mark.e2e
def test_python_text_model_returns_token_outputs_with_their_mask(
    tiny_embedding_model, tmp_path, monkeypatch
):
    """A feature-extraction engine: each request's last_hidden_state padded to its own longest
    text, the runtime's rows in it, and the mask that says which positions are real."""
    from bert_compiler.models.loading import resolve_model
    from bert_compiler.run import RunSpec, run_pipeline
    from bert_compiler.runtime.encoder import Encoder

    info = resolve_model(tiny_embedding_model, task="feature-extraction")
    out = tmp_path / "out"
    run_pipeline(info=info, out=out, spec=RunSpec(verify=TINY_VERIFY))
    result = package(
        info=info, out=out, repository=tmp_path / "r", spec=PackageSpec(python_cpu_engine=True)
    )
    name = f"{info.name}-ort-cpu-fp32-python-text"
    config = _configs(result.path)[name]
    assert [o.name for o in config.output] == ["last_hidden_state", "attention_mask"]
    model = _load_text_model(result.path / name, config, monkeypatch)
    texts = ["a", "A man plays a guitar.", "word " * 30, "Two dogs run.", ""]
    requests = [texts[:2], texts[2:3], texts[3:]]
    answers = model.engine.run(requests)
    rows = Encoder.open(cpu_engine_dir(out), info).encode(texts)["last_hidden_state"]
    first = 0
    for request, answer in zip(requests, answers, strict=True):
        lengths = [len(rows[first + i]) for i in range(len(request))]
        hidden, mask = answer["last_hidden_state"], answer["attention_mask"]
        assert hidden.shape == (len(request), max(lengths), info.hidden_size)
        for i, length in enumerate(lengths):
            np.testing.assert_allclose(hidden[i, :length], rows[first + i], atol=2e-5)
            assert mask[i].tolist() == [1] * length + [0] * (max(lengths) - length)
        first += len(request)


@pytest.mark.e2e
def test_engine_config_matches_the_engine_file(repository):
    info, out, result = repository
    config = _configs(result.path)[f"{info.name}-ort-cpu-fp32"]
    engine_file = result.path / f"{info.name}-ort-cpu-fp32" / "1" / "model.onnx"
    assert sha256_file(engine_file) == sha256_file(cpu_engine_dir(out) / "model.onnx")
    graph = onnx.load(str(engine_file))
    assert [i.name for i in config.input] == [i.name for i in graph.graph.input]
    inputs, outputs = tc.onnx_tensor_specs(graph)
    assert tc.io_problems(config, inputs, outputs, "here") == []
    assert [str(t) for t in outputs] == [f"sentence_embedding TYPE_FP32 [{info.hidden_size}]"]
    wrong = [replace(outputs[0], dims=(7,))]
    assert "sentence_embedding" in tc.io_problems(config, inputs, wrong, "here")[0]


@pytest.mark.e2e
def test_warmup_files_are_real_tokens_of_the_declared_shape(repository):
    info, _out, result = repository
    model_dir = result.path / f"{info.name}-ort-cpu-fp32"
    config = _configs(result.path)[model_dir.name]
    assert [w.batch_size for w in config.model_warmup] == [1, 64]
    for warmup in config.model_warmup:
        for name, data in warmup.inputs.items():
            values = np.fromfile(model_dir / "warmup" / data.input_data_file, dtype="<i8")
            assert values.size == data.dims[0] == 128
            if name == "attention_mask":
                assert (values == 1).all()  # a long real text fills every position
            if name == "input_ids":
                assert values[0] != values[1] and values.max() < info.config["vocab_size"]


@pytest.mark.e2e
def test_ensemble_wiring_is_checked(repository):
    info, _out, result = repository
    configs = _configs(result.path)
    ensemble = configs[f"{info.name}-ort-cpu-fp32-text"]
    assert tc.ensemble_problems(ensemble, configs, "e") == []
    broken = model_config_pb2.ModelConfig()
    broken.CopyFrom(ensemble)
    del broken.ensemble_scheduling.step[1].input_map["token_type_ids"]
    broken.ensemble_scheduling.step[1].input_map["token_typ_ids"] = "token_type_ids"
    problems = tc.ensemble_problems(broken, configs, "e")
    assert any("token_typ_ids" in p for p in problems)
    broken.ensemble_scheduling.step[0].model_name = "missing-model"
    assert any("not in the repository" in p for p in tc.ensemble_problems(broken, configs, "e"))


HARD_TEXTS = [
    "",
    " ",
    "a",
    "Ünïcödé façade — naïve café 東京 🙂",
    "tab\tand\nnewline",
    "word " * 400,
    "don't STOP: 3.14!",
]


@pytest.mark.e2e
def test_tokenizer_model_tokenizes_like_the_pipeline(repository):
    from tokenizers import Tokenizer

    from bert_compiler.models.loading import load_tokenizer

    info, _out, result = repository
    folder = result.path / f"{info.name}-tokenizer"
    config = _configs(result.path)[folder.name]
    assert config.parameters["max_length"].string_value == "128"
    ladder = parse_ladder(config.parameters["length_ladder"].string_value)
    tokenizer = Tokenizer.from_file(str(folder / "1" / "tokenizer.json"))
    names = list(info.architecture.input_names)
    hf = load_tokenizer(info)
    # Each text alone: padded to the rung that holds it, the pipeline's tokens first.
    for text in HARD_TEXTS:
        expected = tokenize(hf, [text], info, 128)
        actual = encode(tokenizer, [text], names, ladder)
        length = expected["input_ids"].shape[1]
        width = rung(ladder, length)
        assert actual["input_ids"].shape == (1, width)
        for name in names:
            np.testing.assert_array_equal(actual[name][:, :length], expected[name])
            pad = hf.pad_token_id if name == "input_ids" else 0
            assert (actual[name][:, length:] == pad).all()
    assert encode(tokenizer, HARD_TEXTS, names, ladder)["input_ids"].shape == (len(HARD_TEXTS), 128)
    # Without a ladder: padded to the longest text, exactly the pipeline's tensors.
    expected = tokenize(hf, HARD_TEXTS[:4], info, 128)
    actual = encode(tokenizer, HARD_TEXTS[:4], names)
    for name in names:
        np.testing.assert_array_equal(actual[name], expected[name])
    raw = np.array([[t.encode()] for t in HARD_TEXTS], dtype=object)
    assert decode_texts(raw) == HARD_TEXTS
    with pytest.raises(UnicodeDecodeError):
        decode_texts(np.array([[b"\xff\xfe"]], dtype=object))


@pytest.mark.e2e
def test_the_ladder_is_fitted_to_calibration_text_and_configures_batching(ensemble_repository):
    from bert_compiler.models.loading import load_tokenizer

    info, _out, result = ensemble_repository
    slug = info.name
    configs = _configs(result.path)
    ladder = parse_ladder(configs[f"{slug}-tokenizer"].parameters["length_ladder"].string_value)
    fitted = ladder_from_text(load_tokenizer(info), info, 128, TRITON_LADDER_RUNGS)
    assert ladder == fitted
    assert ladder[-1] == 128 and len(ladder) > 2
    manifest = result.manifest
    assert tuple(manifest["spec"]["packages"][slug]["length_ladder"]) == ladder
    assert tuple(manifest["results"]["models"][f"{slug}-tokenizer"]["length_ladder"]) == ladder
    # The onnxruntime backend batches one shape only: preferred sizes per rung, no ragged input.
    engine = configs[f"{slug}-ort-cpu-fp32"]
    preferred = budget_batch_sizes(ladder, CPU_BATCHING.token_budget, 64)
    assert list(engine.dynamic_batching.preferred_batch_size) == list(preferred) != []
    assert not any(i.allow_ragged_batch for i in engine.input)
    # The Python-backend engine takes requests of every rung in one call.
    python = configs[f"{slug}-ort-cpu-fp32-python"]
    assert all(i.allow_ragged_batch for i in python.input) and len(python.input) == 3
    assert list(python.dynamic_batching.preferred_batch_size) == list(preferred)


@pytest.mark.e2e
def test_ladder_rungs_sets_how_many_rungs_are_fitted(tiny_run, tmp_path):
    from bert_compiler.models.loading import load_tokenizer

    info, out, _spec, _summary = tiny_run
    result = _package_cli(tiny_run, tmp_path / "r", "--ladder-rungs", "2", "--json")
    assert result.exit_code == 0, result.output
    configs = _configs(tmp_path / "r")
    ladder = parse_ladder(
        configs[f"{info.name}-tokenizer"].parameters["length_ladder"].string_value
    )
    assert ladder == ladder_from_text(load_tokenizer(info), info, 128, 2)
    assert ladder != ladder_from_text(load_tokenizer(info), info, 128, TRITON_LADDER_RUNGS)
    refused = CliRunner().invoke(
        cli,
        ["package", "--out", str(out), "--repository", str(tmp_path / "s"), "--ladder-rungs", "0"],
    )
    assert refused.exit_code == 2 and "--ladder-rungs" in refused.output


def _package_cli(tiny_run, repository: Path, *flags: str):
    """`bert-compile package` of the tiny run's engines into ``repository`` with ``flags``."""
    info, out, _spec, _summary = tiny_run
    common = ["--model", str(info.path), "--out", str(out), "--repository", str(repository)]
    return CliRunner().invoke(cli, ["package", *common, *flags])


@pytest.mark.e2e
def test_python_text_options(tiny_run, tmp_path):
    info = tiny_run[0]
    refused = _package_cli(tiny_run, tmp_path / "r", "--python-text", "ensemble")
    assert refused.exit_code != 0 and not (tmp_path / "r").exists()
    costly = _package_cli(
        tiny_run, tmp_path / "c", "--python-cpu-engine", "--text-run-cost", "1000"
    )
    assert costly.exit_code == 0, costly.output
    config = _configs(tmp_path / "c")[f"{info.name}-ort-cpu-fp32-python-text"]
    assert config.parameters["run_cost_tokens"].string_value == "1000"
    flags = ["--python-cpu-engine", "--python-text", "ensemble", "--text-run-cost", "4"]
    pointless = _package_cli(tiny_run, tmp_path / "e", *flags)
    assert pointless.exit_code != 0 and not (tmp_path / "e").exists()
    assert "--text-run-cost 4: only the one-model text engine" in pointless.output
    assert "--python-text ensemble: it sets how --python-cpu-engine engines take text" in (
        refused.output
    )
    # The run cost applies to the GPU engines' text models too; alone it changes nothing.
    gpu = _package_cli(tiny_run, tmp_path / "g", "--python-gpu-engine", "--text-run-cost", "100")
    assert gpu.exit_code == 0, gpu.output
    alone = _package_cli(tiny_run, tmp_path / "a", "--text-run-cost", "100")
    assert alone.exit_code != 0 and "--text-run-cost 100: it sets how" in alone.output


@pytest.mark.e2e
def test_request_padding_packages_per_request_padding(tiny_run, tmp_path):
    info, out, _spec, _summary = tiny_run
    spec = PackageSpec(python_cpu_engine=True, python_text="ensemble", padding="request")
    result = package(info=info, out=out, repository=tmp_path / "r", spec=spec)
    configs = _configs(result.path)
    tokenizer = configs[f"{info.name}-tokenizer"]
    assert tokenizer.parameters["length_ladder"].string_value == ""
    python = configs[f"{info.name}-ort-cpu-fp32-python"]
    assert not any(i.allow_ragged_batch for i in python.input)
    assert not python.dynamic_batching.preferred_batch_size
    summary = verify_repository(
        info=info, repository=result.path, out_root=tmp_path / "v", spec=TINY_VERIFY
    )
    assert summary.ok and summary.tokenizer.length_ladder == ()


def test_package_settings_are_checked():
    with pytest.raises(InputError, match="--python-text 'fused'"):
        PackageSpec(python_text="fused").validate()
    with pytest.raises(InputError, match="--tokenizer-padding 'bucket'"):
        PackageSpec(padding="bucket").validate()
    with pytest.raises(InputError, match="needs --tokenizer-padding ladder"):
        PackageSpec(padding="request", length_ladder=(16, 128)).validate()
    with pytest.raises(InputError, match="ascending order"):
        PackageSpec(length_ladder=(128, 16)).validate()
    with pytest.raises(InputError, match="must reach the maximum length 128"):
        PackageSpec(length_ladder=(16, 64)).with_ladder(None, 128)
    assert PackageSpec(length_ladder=(16, 128)).with_ladder(None, 128).length_ladder == (16, 128)


def test_preferred_batch_sizes_fill_the_token_budget_per_rung():
    assert budget_batch_sizes((16, 32, 128), 4096, 64) == (32, 64)
    assert budget_batch_sizes((16, 32, 128), 4096, 48) == (32,)
    assert budget_batch_sizes((512,), 256, 64) == (1,)
    assert budget_batch_sizes((), 4096, 64) == budget_batch_sizes((16,), 0, 64) == ()
    cpu = replace(_gpu_engine("onnxruntime", ""), spec={"backend": "onnxruntime", "device": "cpu"})
    spec = PackageSpec(length_ladder=(16, 32, 128))
    assert _batching("k", cpu, spec, 128)[:2] == (64, [32, 64])
    gpu = _gpu_engine("onnxruntime", "9.0")
    assert _batching("k", gpu, spec, 128)[:2] == (64, [64])


@pytest.mark.e2e
def test_tokenizer_json_carries_truncation_and_padding(tiny_run):
    info = tiny_run[0]
    settings = json.loads(tokenizer_json(info, 17))
    assert settings["truncation"]["max_length"] == 17
    assert settings["padding"]["strategy"] == "BatchLongest"


@pytest.mark.e2e
def test_rerun_is_skipped_and_manifest_lists_every_file(repository, tiny_run):
    info, out, result = repository
    again = package(
        info=info, out=out, repository=result.path, spec=PackageSpec(python_cpu_engine=True)
    )
    assert again.skipped
    listed = set(result.manifest["outputs"])
    # Besides the listed files: the manifest itself and the packagers' lock (core/lock.py).
    on_disk = {
        p.relative_to(result.path).as_posix()
        for p in result.path.rglob("*")
        if p.is_file() and p.name not in {"manifest.json", LOCK_FILE, HOLDER_FILE}
    }
    assert listed == on_disk
    assert result.manifest["results"]["models"][f"{info.name}-ort-cpu-fp32"]["files"][
        "1/model.onnx"
    ]["verification"]["passed"]


@pytest.mark.e2e
def test_engines_named_or_selected_are_one_package(tiny_run, tmp_path):
    # `run` packages the engines it built by name; a later `package` names none and selects
    # the verified engines, the same ones here: nothing to rewrite.
    info, out, _spec, summary = tiny_run
    names = tuple(engine.name for engine in summary.engines)
    first = package(
        info=info, out=out, repository=tmp_path / "repo", spec=PackageSpec(engines=names)
    )
    assert not first.skipped
    again = package(info=info, out=out, repository=tmp_path / "repo", spec=PackageSpec())
    assert again.skipped


@pytest.mark.e2e
def test_verify_repository_passes(repository):
    info, out, result = repository
    summary = verify_repository(
        info=info, repository=result.path, out_root=out / "verify-repo", spec=TINY_VERIFY
    )
    assert summary.ok and summary.tokenizer.identical
    statuses = {(e.model, e.status) for e in summary.engines}
    assert statuses == {
        (f"{info.name}-ort-cpu-fp32", "passed"),
        (f"{info.name}-ort-cpu-fp32-python-text", "passed"),
    }
    assert all(e.parity.min_cosine > 0.9999 for e in summary.engines)


@pytest.fixture()
def repository_copy(repository, tmp_path):
    info, out, result = repository
    copy = tmp_path / "repo"
    shutil.copytree(result.path, copy)
    return info, out, copy


@pytest.mark.e2e
def test_flipped_byte_is_refused(repository_copy):
    info, out, copy = repository_copy
    engine = copy / f"{info.name}-ort-cpu-fp32" / "1" / "model.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0x01
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        verify_repository(info=info, repository=copy, out_root=out / "v", spec=TINY_VERIFY)


@pytest.mark.e2e
def test_python_text_config_is_checked_against_its_engine(repository_copy):
    info, _out, copy = repository_copy
    records = open_repository(copy).models
    assert repository_problems(copy, records) == []
    config_path = copy / f"{info.name}-ort-cpu-fp32-python-text" / "config.pbtxt"
    text = config_path.read_text()
    config_path.write_text(text.replace(f"dims: {info.hidden_size}", "dims: 7"))
    (problem,) = repository_problems(copy, records)
    assert "python-text/config.pbtxt: config output sentence_embedding TYPE_FP32 [7]" in problem
    config_path.write_text(text.replace('name: "TEXT"', 'name: "WORDS"'))
    (problem,) = repository_problems(copy, records)
    assert "config inputs ['WORDS'] but the engine has ['TEXT']" in problem


@pytest.mark.e2e
def test_tampered_weights_with_rewritten_hashes_fail_parity(repository_copy, tmp_path):
    """Someone edits the engine's weights and the manifest's hashes: a record edited alone breaks
    the seal of the package inputs; a forger who rewrites and reseals everything is caught by the
    numbers."""
    info, out, copy = repository_copy
    name = f"{info.name}-ort-cpu-fp32"
    engine_file = copy / name / "1" / "model.onnx"
    model = onnx.load(str(engine_file))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(weight) * np.float32(1.5)
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(engine_file))
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    digest = sha256_file(engine_file)
    manifest["outputs"][f"{name}/1/model.onnx"]["sha256"] = digest
    record = manifest["results"]["models"][name]["files"]["1/model.onnx"]
    record["sha256"] = digest
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="records of package .* were edited"):
        verify_repository(info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY)
    (package_inputs,) = manifest["inputs"]["packages"].values()
    package_inputs["engines"][record["engine"]]["sha256"] = digest
    _reseal(manifest_path, manifest)
    # The Python text model's copy of the engine must be the engine model's file.
    with pytest.raises(ArtifactError, match="python-text/1/model.onnx: "):
        verify_repository(info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY)
    text_name = f"{name}-python-text"
    shutil.copyfile(engine_file, copy / text_name / "1" / "model.onnx")
    manifest["outputs"][f"{text_name}/1/model.onnx"]["sha256"] = digest
    manifest["results"]["models"][text_name]["files"]["1/model.onnx"]["sha256"] = digest
    _reseal(manifest_path, manifest)
    summary = verify_repository(
        info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY
    )
    assert not summary.ok
    failed = [e for e in summary.engines if e.status == "failed"]
    assert [e.model for e in failed] == [name, text_name] and failed[0].failures


def _reseal(manifest_path: Path, manifest: dict) -> None:
    """What a forger who can write the repository does after editing it: the package's records
    hashed again into its sealed inputs, and the manifest's input key recomputed."""
    (package_inputs,) = manifest["inputs"]["packages"].values()
    package_inputs["records"] = sha256_json(manifest["results"]["models"])
    sealed = StageRecord(manifest["stage"], manifest["inputs"], manifest["spec"])
    manifest["input_key"] = sealed.input_key(manifest["versions"])
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.e2e
@pytest.mark.parametrize("edited", ["model.py", "tokenizer_model.py", "onnxruntime_model.py"])
def test_python_code_edited_and_resealed_is_refused(repository_copy, tmp_path, edited):
    """The parity run never runs a Python model's code: it must be the code this bert-compile
    writes, whatever hash a rewritten manifest gives it (even with its template hash gone)."""
    info, _out, copy = repository_copy
    relative = f"{info.name}-ort-cpu-fp32-python-text/1/{edited}"
    target = copy / relative
    target.write_text(target.read_text() + "\nimport os  # planted\n")
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["outputs"][relative]["sha256"] = sha256_file(target)
    (package_inputs,) = manifest["inputs"]["packages"].values()
    del package_inputs["templates"]
    _reseal(manifest_path, manifest)
    with pytest.raises(ArtifactError, match=f"{edited}: not the .* code this bert-compile writes"):
        verify_repository(info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY)


@pytest.mark.e2e
def test_a_python_text_record_edited_and_resealed_is_refused(repository_copy, tmp_path):
    """The Python text model's record (its engine's verification) must be the one package
    derives from the engine model's."""
    info, _out, copy = repository_copy
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    name = f"{info.name}-ort-cpu-fp32-python-text"
    manifest["results"]["models"][name]["files"]["1/model.onnx"]["verification"]["metric"] = 99.0
    _reseal(manifest_path, manifest)
    with pytest.raises(ArtifactError, match=f"{name}: its manifest record is not the one package"):
        verify_repository(info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY)


@pytest.mark.e2e
def test_a_package_from_before_python_text_is_read_as_the_ensemble(ensemble_repository, tmp_path):
    info, _out, result = ensemble_repository
    copy = tmp_path / "repo"
    shutil.copytree(result.path, copy)
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (settings,) = manifest["spec"]["packages"].values()
    del settings["python_text"]
    _reseal(manifest_path, manifest)
    summary = verify_repository(
        info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY
    )
    assert summary.ok
    assert f"{info.name}-ort-cpu-fp32-python" in {e.model for e in summary.engines}


@pytest.mark.e2e
def test_an_engine_file_replaced_while_the_gate_verifies_it_fails_the_gate(
    repository_copy, tmp_path, monkeypatch
):
    """The gate verifies the file as it loaded it: one replaced during the parity run (after
    the hash checks) would be deployed unverified, so the gate checks it again afterwards."""
    from bert_compiler.triton import gate

    info, _out, copy = repository_copy
    engine_file = copy / f"{info.name}-ort-cpu-fp32" / "1" / "model.onnx"
    real = gate.verify_engine

    def verify_then_replace(**kwargs):
        result = real(**kwargs)
        data = bytearray(engine_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        engine_file.write_bytes(bytes(data))
        return result

    monkeypatch.setattr(gate, "verify_engine", verify_then_replace)
    with pytest.raises(ArtifactError, match="model.onnx: changed while the gate verified it"):
        verify_repository(info=info, repository=copy, out_root=tmp_path / "v", spec=TINY_VERIFY)


@pytest.mark.e2e
def test_files_the_packager_did_not_write_are_refused(repository_copy):
    info, _out, copy = repository_copy
    (copy / f"{info.name}-tokenizer" / "1" / "libevil.so").write_bytes(b"\x7fELF")
    with pytest.raises(ArtifactError, match="not written by bert-compile"):
        open_repository(copy)
    (copy / f"{info.name}-tokenizer" / "1" / "libevil.so").unlink()
    (copy / "stray-model").mkdir()
    with pytest.raises(ArtifactError, match="not in its manifest"):
        open_repository(copy)


@pytest.mark.e2e
def test_python_bytecode_is_named_and_refused_unread(repository_copy, tmp_path):
    """A Triton that loaded the repository in place leaves 1/__pycache__/model.*.pyc; Python
    would run a planted one whose source stamp matches instead of model.py. The gate and package
    name it as bytecode, in one line, without reading it."""
    info, out, copy = repository_copy
    planted = copy / f"{info.name}-ort-cpu-fp32-python-text" / "1" / "__pycache__"
    planted.mkdir()
    (planted / "model.cpython-311.pyc").write_bytes(b"\x00" * 16)
    for attempt in (
        lambda: verify_repository(info=info, repository=copy, out_root=tmp_path, spec=TINY_VERIFY),
        lambda: package(
            info=info, out=out, repository=copy, spec=PackageSpec(python_cpu_engine=True)
        ),
    ):
        with pytest.raises(ArtifactError) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{planted}: Python bytecode") and "\n" not in message
        assert f"remove it (rm -r '{planted}')" in message
    shutil.rmtree(planted)
    open_repository(copy)


@pytest.mark.e2e
def test_repository_of_another_model_is_refused(repository_copy, tiny_classifier_model):
    from bert_compiler.models.loading import resolve_model

    _info, out, copy = repository_copy
    other = resolve_model(tiny_classifier_model)
    with pytest.raises(InputError, match="another model"):
        verify_repository(info=other, repository=copy, out_root=out / "v", spec=TINY_VERIFY)


@pytest.mark.e2e
def test_a_foreign_folder_is_never_replaced(tiny_run, tmp_path):
    info, out, _spec, _summary = tiny_run
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a repository bert-compile wrote"):
        package(info=info, out=out, repository=target, spec=PackageSpec())
    assert (target / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".mine*"))


def _copy_run(tiny_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(tiny_run[1], out)
    return out


@pytest.mark.e2e
def test_unverified_and_failed_engines_are_refused(tiny_run, tmp_path):
    info = tiny_run[0]
    out = _copy_run(tiny_run, tmp_path)
    verify_dir = cpu_engine_dir(out, "fp32", "verify")
    manifest = json.loads((verify_dir / "manifest.json").read_text())
    manifest["results"]["passed"] = False
    manifest["results"]["failures"] = ["sentence_embedding: min_cosine 0.5 < 0.9999"]
    (verify_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ParityError, match="min_cosine 0.5"):
        package(info=info, out=out, repository=tmp_path / "r", spec=PackageSpec())
    shutil.rmtree(verify_dir)
    with pytest.raises(InputError, match="never verified"):
        package(info=info, out=out, repository=tmp_path / "r", spec=PackageSpec())
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name",
    ['a"b', "a\nb", "a{b}", "../up", "a/b", " lead", ".hidden", "-dash", "a..b", "", "x" * 129],
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(InputError, match="not a safe Triton name"):
        tc.check_name(name, "model name")


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "bert_base.v1", "input_ids", "x" * 128])
def test_safe_names_pass(name):
    assert tc.check_name(name, "model name") == name


def _gpu_engine(backend: str, capability: str, **spec) -> VerifiedEngine:
    """An engine record as a GPU build writes it (no GPU or TensorRT needed to plan with it)."""
    base = {"backend": backend, "device": "cuda", "precision": "fp16"}
    return VerifiedEngine(
        name=f"{backend}-sm{capability.replace('.', '')}",
        folder=Path("/nowhere"),
        spec={**base, **spec},
        results={"compute_capability": capability, "tensorrt": "10.13.3"},
        engine_file=Path("/nowhere/model"),
        engine_sha256="0" * 64,
        report={"passed": True},
        max_length=128,
    )


def _trt(capability: str, *profiles: str, **options) -> VerifiedEngine:
    return _gpu_engine(
        "tensorrt",
        capability,
        tensorrt={"profiles": list(profiles), "hardware_compatibility": "none", **options},
    )


def test_gpu_engines_share_a_model_with_one_file_per_compute_capability():
    engines = [_trt("9.0", "1x1:64x128:64x128"), _trt("8.0", "1x1:64x128:64x128")]
    files, default = _engine_files("trt-fp16", engines)
    assert default == "" and {f: e.results["compute_capability"] for f, e in files.items()} == {
        "model.sm90.plan": "9.0",
        "model.sm80.plan": "8.0",
    }
    with pytest.raises(InputError, match="both target compute capability 9.0"):
        _engine_files("trt-fp16", [engines[0], engines[0]])
    portable = _trt("8.6", "1x1:8x128:8x128", hardware_compatibility="ampere_plus")
    assert _engine_files("trt-ampere_plus-fp16", [portable]) == (
        {"model.plan": portable},
        "model.plan",
    )
    assert engine_kind(portable.spec) == "trt-ampere_plus-fp16"
    same_cc = _trt("8.9", "1x1:8x128:8x128", hardware_compatibility="same_compute_capability")
    assert _engine_files("k", [same_cc]) == ({"model.sm89.plan": same_cc}, "")
    assert (
        engine_kind(
            {
                "backend": "onnxruntime",
                "device": "cuda",
                "precision": "fp16",
                "session": {"cuda_graph": True},
            }
        )
        == "ort-cuda-fp16-cudagraph"
    )


def test_tensorrt_batching_comes_from_the_profiles():
    engine = _trt("9.0", "1x1:64x48:64x48", "1x49:32x128:32x128")
    max_batch, preferred, profiles, lengths = _batching("k", engine, PackageSpec(), 128)
    assert (max_batch, preferred, profiles, lengths) == (32, [32], ["0", "1"], [48, 128])


@pytest.mark.parametrize(
    ("profiles", "message"),
    [
        (("2x1:64x128:64x128",), "starts at batch 2"),
        (("1x1:64x64:64x64",), "cover sequences up to 64 tokens"),
        (("1x1:64x32:64x32", "1x40:64x128:64x128"), "cover sequences up to 32 tokens"),
    ],
)
def test_tensorrt_profiles_that_leave_requests_uncovered_are_refused(profiles, message):
    with pytest.raises(InputError, match=message):
        _batching("k", _trt("9.0", *profiles), PackageSpec(), 128)


def test_gpu_config_names_a_file_per_capability_and_no_default():
    tensor = tc.TensorSpec("input_ids", "TYPE_INT64", (-1,))
    config = tc.engine_config(
        tc.EngineModel(
            name="m-trt-fp16",
            platform="tensorrt_plan",
            kind="KIND_GPU",
            inputs=[tensor],
            outputs=[tc.TensorSpec("logits", "TYPE_FP32", (2,))],
            max_batch_size=32,
            preferred_batch_sizes=[32],
            cc_model_filenames={"9.0": "model.sm90.plan", "8.0": "model.sm80.plan"},
            profiles=["0", "1"],
        )
    )
    parsed = tc.parse(tc.render(config), Path("config.pbtxt"))
    assert dict(parsed.cc_model_filenames) == {"9.0": "model.sm90.plan", "8.0": "model.sm80.plan"}
    assert not parsed.default_model_filename
    assert list(parsed.instance_group[0].profile) == ["0", "1"]
    assert list(parsed.dynamic_batching.preferred_batch_size) == [32]


def test_broken_config_text_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="not a valid Triton ModelConfig"):
        tc.parse('name: "x"\nmax_batch_size: "lots"\n', tmp_path / "config.pbtxt")


def test_the_gate_tells_a_tokenizer_that_lost_its_lowercasing(tmp_path):
    """The tokenizer check compares ids: the packaged tokenizer.json with BERT's lowercasing
    and accent stripping turned off tokenizes the parity texts differently, and the check names
    the batch; the file as package writes it has no mismatch."""
    from bert_compiler.models.loading import resolve_model
    from bert_compiler.triton.tokenizer_json import (
        tokenizer_json,
        tokenizer_mismatches,
    )

    info = resolve_model("default")
    written = json.loads(tokenizer_json(info, 128))
    same = tmp_path / "same.json"
    same.write_text(json.dumps(written))
    assert tokenizer_mismatches(info, same, 128)["mismatches"] == []
    written["normalizer"]["lowercase"] = False
    written["normalizer"]["strip_accents"] = False
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(written))
    check = tokenizer_mismatches(info, edited, 128)
    assert check["mismatches"] and "input_ids" in check["mismatches"][0]


@pytest.mark.e2e
def test_a_disk_that_fills_while_packaging_is_one_line_and_leaves_the_repository(
    tiny_run, repository_copy, monkeypatch
):
    """ENOSPC while an engine is copied into the staging tree: one line naming the file and
    what to do, exit 3, and the repository exactly as it was (the staging tree removed)."""
    import errno as errnos

    from bert_compiler.triton import package as package_module

    _info, _out, copy = repository_copy
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    real = shutil.copyfile

    def copy_until_full(source, target):
        if str(target).endswith(".onnx"):
            raise OSError(errnos.ENOSPC, "No space left on device", str(target))
        return real(source, target)

    monkeypatch.setattr(package_module.shutil, "copyfile", copy_until_full)
    result = _package_cli(tiny_run, copy, "--python-cpu-engine", "--force")
    assert result.exit_code == 3, result.output
    *progress_lines, line = result.stderr.strip().splitlines()
    assert all(p.startswith("[package]") for p in progress_lines)
    assert "Traceback" not in result.output
    assert line.startswith("bert-compile: input error: no space left on the device while writing")
    assert "model.onnx" in line and "free space or choose another output folder" in line
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


@pytest.mark.e2e
def test_a_model_folder_with_a_hostile_name_packages_under_a_safe_one(
    tiny_embedding_model, tmp_path
):
    """HOSTILE row 21: quotes, braces, a dollar, spaces and leading dots in the model folder's
    name never reach a path, a Triton model name or a config: every name is the slug, each
    passes Triton's strict pattern, and the gate accepts the repository. HOSTILE row 22: files
    planted in the model folder (a model.py, a library, a script) are not copied into it."""
    model = tmp_path / '..we"ird {na}me $x'
    shutil.copytree(tiny_embedding_model, model)
    planted = {"model.py": b"import os  # planted\n", "libevil.so": b"\x7fELF planted"}
    planted["1_Pooling/evil.py"] = b"print('planted')\n"
    for name, data in planted.items():
        (model / name).write_bytes(data)
    out = tmp_path / "out"
    argv = ["run", "--model", str(model), "--out", str(out), "--target", "cpu", "--json"]
    result = CliRunner().invoke(cli, [*argv, "--metric-limit", "100", "--no-metric-gate"])
    assert result.exit_code == 0, result.output
    slug = "we-ird-na-me-x"
    assert sorted(p.name for p in (out / "engines").iterdir()) == [slug]
    repository = out / "triton"
    names = sorted(p.name for p in repository.iterdir() if p.is_dir())
    assert names and all(name.startswith(f"{slug}-") for name in names)
    for name in names:
        assert tc.check_name(name, "model name") == name
        assert _configs(repository)[name].name == name
    copied = [p for p in repository.rglob("*") if p.is_file()]
    assert not [p for p in copied if p.name in ("libevil.so", "evil.py")]
    assert not [p for p in copied if p.read_bytes() in planted.values()]
    gate = CliRunner().invoke(
        cli,
        ["verify", "--model", str(model), "--out", str(out), "--repository", str(repository),
         "--metric-limit", "100", "--no-metric-gate"],
    )  # fmt: skip
    assert gate.exit_code == 0, gate.output


def _as_cuda_engine(engine, capability: str, **session):
    """A CPU engine's record rewritten as a CUDA build of ``capability`` records it (the file
    stays the CPU graph: planning reads its tensors, nothing runs it)."""
    cuda = {"device_id": "0", "enable_cuda_graph": "0", "use_tf32": "0", "sdpa_kernel": "16"}
    spec = {
        **engine.spec,
        "device": "cuda",
        "precision": "fp16",
        "compute_capability": capability,
        "session": {**engine.spec["session"], "device": "cuda", **session},
        "providers": [["CUDAExecutionProvider", cuda]],
    }
    results = {**engine.results, "compute_capability": capability}
    name = f"ort-cuda-sm{capability.replace('.', '')}-fp16"
    return replace(engine, name=name, spec=spec, results=results)


@pytest.mark.e2e
def test_python_gpu_engine_serves_ort_cuda_engines_as_gpu_text_models(tiny_run, caplog):
    """--python-gpu-engine: ONNX Runtime CUDA engines of two GPUs become one Python-backend
    text model on GPU instances holding each GPU's file, told the device and the CUDA provider
    options the build recorded (without its device id); a CUDA-graph engine gets none, with a
    warning saying why."""
    info, out, _spec, _summary = tiny_run
    (cpu,) = verified_engines(info=info, out=out)
    engines = [_as_cuda_engine(cpu, "9.0"), _as_cuda_engine(cpu, "8.0")]
    spec = PackageSpec(python_gpu_engine=True, gpu_text_instances=2)
    plans = {p.name: p for p in plan_repository(info=info, engines=engines, spec=spec)}
    text = plans[f"{info.name}-ort-cuda-fp16-python-text"]
    assert text.role == "python-text"
    (group,) = text.config.instance_group
    assert group.kind == group.KIND_GPU and group.count == 2
    parameters = {k: v.string_value for k, v in text.config.parameters.items()}
    assert parameters[DEVICE_PARAMETER] == "cuda"
    assert json.loads(parameters[CUDA_OPTIONS_PARAMETER]) == {
        "enable_cuda_graph": "0", "use_tf32": "0", "sdpa_kernel": "16"
    }  # fmt: skip
    assert {"1/model.sm90.onnx", "1/model.sm80.onnx", "1/model.py"} <= set(text.files)
    assert text.files["1/model.py"] == TEMPLATES["python-text"]
    # The engine model's own copies are the same files: the gate verifies each once.
    engine_model = plans[f"{info.name}-ort-cuda-fp16"]
    assert text.files["1/model.sm90.onnx"] == engine_model.files["1/model.sm90.onnx"]
    without = plan_repository(info=info, engines=engines, spec=PackageSpec())
    assert not [p for p in without if p.role == "python-text"]
    graphs = [_as_cuda_engine(cpu, "9.0", cuda_graph=True)]
    with caplog.at_level("WARNING", logger="bert_compile"):
        plans = plan_repository(info=info, engines=graphs, spec=spec)
    assert not [p for p in plans if p.role == "python-text"]
    assert "no Python text model: a CUDA-graph engine replays" in caplog.text


def test_a_gpu_instance_opens_its_gpus_engine_file(tmp_path, monkeypatch):
    """Each GPU instance of a Python ONNX Runtime text model opens the file of its GPU's compute
    capability, and says which files there are when none is its GPU's; a CPU model opens
    model.onnx."""
    from bert_compiler.triton import onnxruntime_model

    for name in ("model.sm90.onnx", "model.sm80.onnx"):
        (tmp_path / name).write_bytes(b"")
    capabilities = {0: "90", 1: "80", 2: "89"}
    monkeypatch.setattr(onnxruntime_model, "gpu_capability", capabilities.__getitem__)
    gpu = {DEVICE_PARAMETER: "cuda"}
    assert onnxruntime_model.engine_path(tmp_path, gpu, 0).name == "model.sm90.onnx"
    assert onnxruntime_model.engine_path(tmp_path, gpu, 1).name == "model.sm80.onnx"
    with pytest.raises(FileNotFoundError, match=r"capability 8.9 and this model holds engines"):
        onnxruntime_model.engine_path(tmp_path, gpu, 2)
    assert onnxruntime_model.engine_path(tmp_path, {}, 0).name == "model.onnx"


@pytest.mark.gpu
@pytest.mark.e2e
def test_python_gpu_text_model_runs_the_cuda_engine_as_the_runtime_does(
    tiny_embedding_model, tmp_path, monkeypatch
):
    """On a GPU with onnxruntime-gpu: `run --target cuda` and `package --python-gpu-engine`; the
    text model's model.py, loaded as Triton loads a GPU instance, opens its GPU's engine file on
    the CUDA provider and answers each request with the runtime's embeddings of that engine."""
    from bert_compiler.models.loading import resolve_model
    from bert_compiler.runtime.encoder import Encoder
    from tests.engines.test_gpu_engines import _ort_cuda_reason, _skip_unless

    _skip_unless(_ort_cuda_reason())
    out = tmp_path / "out"
    common = ["--model", str(tiny_embedding_model), "--out", str(out)]
    gates = ["--metric-limit", "100", "--no-metric-gate", "--json"]
    built = CliRunner().invoke(cli, ["run", *common, *gates, "--target", "cuda", "--no-package"])
    assert built.exit_code == 0, built.output
    (engine,) = json.loads(built.stdout.strip().splitlines()[-1])["engines"]
    packaged = CliRunner().invoke(cli, ["package", *common, "--python-gpu-engine", "--json"])
    assert packaged.exit_code == 0, packaged.output
    repository = out / "triton"
    info_name = tiny_embedding_model.name
    name = f"{info_name}-ort-cuda-fp16-python-text"
    model = _load_text_model(repository / name, _configs(repository)[name], monkeypatch, gpu=0)
    assert model.engine.session.get_providers()[0] == "CUDAExecutionProvider"
    texts = [*HARD_TEXTS, "A man plays a guitar.", "Two dogs run across a wide green field."]
    answers = model.engine.run([texts[:2], texts[2:]])
    served = np.concatenate([a["sentence_embedding"] for a in answers])
    info = resolve_model(tiny_embedding_model)
    expected = Encoder.open(Path(engine["manifest"]).parent, info).encode(texts)
    np.testing.assert_allclose(served, expected["sentence_embedding"], atol=2e-3)
