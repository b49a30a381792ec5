"""No traceback for any input file: every format the tool reads, mutated at random (bytes flipped,
cut, inserted or truncated; JSON values swapped for odd ones), is either read or refused with a
BertCompileError, which the CLI prints as one line with its exit code (tests/cli/test_cli.py).

hypothesis runs derandomized (the same examples on every run, so CI is reproducible); raise
FUZZ_EXAMPLES in the environment for a longer local pass.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bert_compiler.calibration import datasets
from bert_compiler.cli.config import read_toml
from bert_compiler.core.artifacts import ArtifactDir, StageRecord
from bert_compiler.core.errors import BertCompileError
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.core.stage import run_stage
from bert_compiler.models.loading import load_tokenizer, resolve_model
from bert_compiler.triton import config as tc

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Every case the fuzzer tried, per format: printed by the last test so CI shows the pass's size.
TRIED: dict[str, int] = {}


@st.composite
def mutated(draw, base: bytes) -> bytes:
    """``base`` with one to four random edits."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if edit == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif edit == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
    return bytes(data)


ODD_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def json_edited(draw, base: dict) -> bytes:
    """``base`` with one value (at any depth of dicts) replaced by an odd one, or a key dropped."""
    document = json.loads(json.dumps(base))
    node = document
    while isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node)))
        if isinstance(node[key], dict) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        if draw(st.booleans()):
            node[key] = draw(ODD_VALUES)
        else:
            del node[key]
        break
    return json.dumps(document, allow_nan=True).encode()


def either_bytes(base: bytes, document: dict | None = None):
    strategies = [mutated(base), st.binary(max_size=256)]
    if document is not None:
        strategies.append(json_edited(document))
    return st.one_of(*strategies)


def _must_read_or_refuse(name: str, read: Callable[[], object]) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    try:
        read()
    except BertCompileError:
        pass


def _fuzz_file(path: Path, base: bytes, read: Callable[[Path], object]) -> None:
    """Write mutations of ``base`` to ``path`` and read each with ``read``."""

    @FUZZ
    @given(data=either_bytes(base))
    def run(data):
        path.write_bytes(data)
        _must_read_or_refuse(path.name, lambda: read(path))

    run()


@pytest.fixture(scope="module")
def model_files(tiny_embedding_model) -> dict[str, bytes]:
    names = ["config.json", "modules.json", "1_Pooling/config.json", "tokenizer.json"]
    return {n: (tiny_embedding_model / n).read_bytes() for n in names} | {
        "header": (tiny_embedding_model / "model.safetensors").read_bytes()[:4096]
    }


@pytest.fixture()
def model_copy(tiny_embedding_model, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(tiny_embedding_model, target)
    return target


@pytest.mark.parametrize("name", ["config.json", "modules.json", "1_Pooling/config.json"])
def test_model_json_files(name, model_files, model_copy):
    base = model_files[name]

    @FUZZ
    @given(data=either_bytes(base, json.loads(base)))
    def run(data):
        (model_copy / name).write_bytes(data)
        _must_read_or_refuse(name, lambda: resolve_model(model_copy))

    run()


def test_safetensors_header(model_files, model_copy):
    weights = model_copy / "model.safetensors"
    whole = weights.read_bytes()
    head = model_files["header"]

    @FUZZ
    @given(data=mutated(head))
    def run(data):
        weights.write_bytes(data + whole[len(head) :])
        _must_read_or_refuse("model.safetensors", lambda: resolve_model(model_copy))

    run()


def test_tokenizer_json(model_files, model_copy):
    base = model_files["tokenizer.json"]

    @FUZZ
    @given(data=either_bytes(base, json.loads(base)))
    def run(data):
        (model_copy / "tokenizer.json").write_bytes(data)
        info = resolve_model(model_copy)
        _must_read_or_refuse("tokenizer.json", lambda: load_tokenizer(info))

    run()


DATASETS = {
    "calibration.tsv": (b"sentence\tsource\nA man plays.\tstsb\nTwo dogs run.\tsst2\n", None),
    "calibration.txt": (b"A man plays a flute.\nTwo dogs run.\n", None),
    "calibration.jsonl": (b'{"sentence": "A man plays."}\n{"sentence": "Two dogs."}\n', None),
    "stsb.tsv": (b"sentence1\tsentence2\tscore\nA man.\tA woman.\t2.5\nDogs.\tCats.\t1\n", None),
    "sst2.tsv": (b"sentence\tlabel\ngood film \t1\nbad film \t0\n", None),
}
READERS = {
    "calibration.tsv": datasets.load_texts,
    "calibration.txt": datasets.load_texts,
    "calibration.jsonl": datasets.load_texts,
    "stsb.tsv": datasets.load_stsb,
    "sst2.tsv": datasets.load_sst2,
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_files(name, tmp_path):
    _fuzz_file(tmp_path / name, DATASETS[name][0], READERS[name])


def test_pipeline_toml(tmp_path):
    base = (Path(__file__).resolve().parents[2] / "docs" / "pipeline.toml").read_bytes()
    _fuzz_file(tmp_path / "pipeline.toml", base, read_toml)


def test_stage_manifest(tmp_path):
    folder = tmp_path / "stage"
    record = StageRecord("demo", {"model": {"sha256": "0" * 64}}, {"opset": 17})

    def body(artifact):
        (artifact.path / "out.txt").write_text("artifact")
        return ["out.txt"], {"nodes": 3}

    run_stage(record, folder, body, force=True)
    base = (folder / "manifest.json").read_bytes()

    @FUZZ
    @given(data=either_bytes(base, json.loads(base)))
    def run(data):
        (folder / "manifest.json").write_bytes(data)
        artifact = ArtifactDir(folder)
        _must_read_or_refuse("manifest.json", artifact.require_complete)
        _must_read_or_refuse("manifest.json", lambda: artifact.is_up_to_date(record))

    run()


def test_onnx_graph(tmp_path):
    import onnx

    from tests.core.test_onnx_io import _graph

    base = _graph().SerializeToString()
    assert onnx.load_from_string(base)
    _fuzz_file(tmp_path / "model.onnx", base, load_onnx)


def test_triton_config(tmp_path):
    base = b"""name: "m-ort-cpu-fp32"
platform: "onnxruntime_onnx"
max_batch_size: 64
input { name: "input_ids" data_type: TYPE_INT64 dims: -1 }
output { name: "sentence_embedding" data_type: TYPE_FP32 dims: 32 }
instance_group { count: 1 kind: KIND_CPU }
dynamic_batching { }
"""
    path = tmp_path / "config.pbtxt"

    @FUZZ
    @given(data=either_bytes(base))
    def run(data):
        text = data.decode("utf-8", errors="replace")
        _must_read_or_refuse("config.pbtxt", lambda: tc.parse(text, path))

    run()


_FORMAT_TESTS = (
    "test_model_json_files",
    "test_safetensors_header",
    "test_tokenizer_json",
    "test_dataset_files",
    "test_pipeline_toml",
    "test_stage_manifest",
    "test_onnx_graph",
    "test_triton_config",
)


def test_the_pass_tried_every_format(request):
    """Every format was fuzzed by the format tests above it in this file (conftest.py prints the
    pass's size). It counts what they tried, so it runs only in a session that ran them all."""
    collected = {item.originalname for item in request.session.items if item.path == request.path}
    if not set(_FORMAT_TESTS) <= collected:
        pytest.skip("counts the format tests above it; run the whole file")
    expected = {
        "config.json",
        "modules.json",
        "1_Pooling/config.json",
        "model.safetensors",
        "tokenizer.json",
        *DATASETS,
        "pipeline.toml",
        "manifest.json",
        "model.onnx",
        "config.pbtxt",
    }
    assert expected <= set(TRIED)


@pytest.mark.e2e
def test_repository_manifest(tiny_run, tmp_path):
    """The repository gate reads the models' records of its manifest: odd ones are refused."""
    from bert_compiler.triton.package import package
    from bert_compiler.triton.package_spec import PackageSpec
    from bert_compiler.triton.repository import open_repository

    info, out = tiny_run[0], tmp_path / "out"
    shutil.copytree(tiny_run[1], out)
    repository = package(info=info, out=out, repository=tmp_path / "r", spec=PackageSpec()).path
    base = (repository / "manifest.json").read_bytes()

    @FUZZ
    @given(data=either_bytes(base, json.loads(base)))
    def run(data):
        (repository / "manifest.json").write_bytes(data)
        _must_read_or_refuse("repository manifest.json", lambda: open_repository(repository))

    run()
