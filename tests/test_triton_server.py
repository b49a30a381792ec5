"""The packaged repository in a real Triton server: tokenizer model, Python-backend engine and
their ensemble, queried over HTTP and gRPC with tritonclient (tests/triton_server.py says which
server and why only the Python backend)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bert_compiler.engines.backend import load_engine
from bert_compiler.pipeline.models import load_tokenizer
from bert_compiler.pipeline.text import tokenize
from bert_compiler.pipeline.triton.package import PackageSpec, package
from bert_compiler.pipeline.verify import torch_runner
from tests.conftest import cpu_engine_dir
from tests.triton_server import REPO_ROOT, find_server, triton_server

SERVER = find_server()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(isinstance(SERVER, str), reason=str(SERVER))]

TEXTS = [
    "A man is playing a guitar.",
    "",
    "Ünïcödé façade — naïve café 東京 🙂",
    "Two dogs run across a wide green field together before the rain begins. " * 3,
]


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    info, out, _spec, _summary = tiny_run
    repository = tmp_path_factory.mktemp("served") / "repo"
    package(info=info, out=out, repository=repository, spec=PackageSpec(python_cpu_engine=True))
    ensemble = f"{info.name}-ort-cpu-fp32-python-text"
    with triton_server(SERVER, repository, [ensemble], tmp_path_factory.mktemp("server")) as s:
        yield info, out, s, ensemble


def _clients(server):
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    return [
        (http_client, http_client.InferenceServerClient(server.http)),
        (grpc_client, grpc_client.InferenceServerClient(server.grpc)),
    ]


def _text_input(module, texts):
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    tensor = module.InferInput("TEXT", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def test_tokenizer_model_serves_the_pipelines_tokens(served):
    info, _out, server, _ensemble = served
    expected = tokenize(load_tokenizer(info), TEXTS, info, info.max_length)
    for module, client in _clients(server):
        result = client.infer(f"{info.name}-tokenizer", [_text_input(module, TEXTS)])
        for name in info.architecture.input_names:
            np.testing.assert_array_equal(result.as_numpy(name), expected[name])


def test_ensemble_embeddings_match_the_engine_and_pytorch(served):
    info, out, server, ensemble = served
    feeds = tokenize(load_tokenizer(info), TEXTS, info, info.max_length)
    engine, _ = load_engine(cpu_engine_dir(out))
    expected = engine.run(feeds)["sentence_embedding"]
    reference = torch_runner(info, pooling_in_graph=True)(feeds)["sentence_embedding"]
    for module, client in _clients(server):
        got = client.infer(ensemble, [_text_input(module, TEXTS)]).as_numpy("sentence_embedding")
        assert got.shape == (len(TEXTS), info.hidden_size) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)
        cosine = (got * reference).sum(1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() > 0.9999


def test_server_reports_our_config(served):
    info, _out, server, ensemble = served
    _module, client = _clients(server)[0]
    config = client.get_model_config(f"{info.name}-ort-cpu-fp32-python")
    assert config["max_batch_size"] == 64
    assert [i["name"] for i in config["input"]] == list(info.architecture.input_names)
    assert client.is_model_ready(ensemble)
    # The onnxruntime-backend model is in the repository but this server has no such backend.
    assert not client.is_model_ready(f"{info.name}-ort-cpu-fp32")


def test_text_that_is_not_utf8_is_an_error_not_a_crash(served):
    from tritonclient.utils import InferenceServerException

    info, _out, server, ensemble = served
    module, client = _clients(server)[1]
    bad = module.InferInput("TEXT", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"\xff\xfe broken"]], dtype=object))
    with pytest.raises(InferenceServerException, match="UTF-8"):
        client.infer(ensemble, [bad])
    assert client.is_server_live() and client.is_model_ready(ensemble)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_example(served, protocol):
    info, _out, server, ensemble = served
    url = server.http if protocol == "http" else server.grpc
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "triton_client.py"),
            "--model",
            ensemble,
            "--protocol",
            protocol,
            "--url",
            url,
            "--json",
            *TEXTS[:2],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    embedding = np.array(outputs["sentence_embedding"])
    assert embedding.shape == (2, info.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
