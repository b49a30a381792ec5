"""The packaged repository in a real Triton server, queried over HTTP and gRPC with tritonclient
(triton/server.py says which server and why only the Python backend): the one-model
Python text engine (the default), and the ensemble tokenizer model -> Python-backend engine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bert_compiler.engines.backend import load_engine
from bert_compiler.engines.batching import rung
from bert_compiler.models.loading import load_tokenizer
from bert_compiler.runtime.text import tokenize
from bert_compiler.stages.verify import torch_runner
from bert_compiler.triton.package import package
from bert_compiler.triton.package_spec import (
    PYTHON_INSTANCES,
    PackageSpec,
)
from bert_compiler.triton.repository import open_repository
from bert_compiler.triton.tokenizer_model import parse_ladder
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

QUEUE_DELAY_US = 100_000


def _serve(tiny_run, tmp_path_factory, python_text: str):
    info, out, _spec, _summary = tiny_run
    repository = tmp_path_factory.mktemp("served") / "repo"
    # The dynamic batcher waits this long for company: without it, on a busy machine the engine
    # can finish each request before the tokenizer sends the next, and never join any.
    spec = PackageSpec(
        python_cpu_engine=True, python_text=python_text, max_queue_delay_us=QUEUE_DELAY_US
    )
    package(info=info, out=out, repository=repository, spec=spec)
    model = f"{info.name}-ort-cpu-fp32-python-text"
    models = [model, f"{info.name}-tokenizer"]
    server = triton_server(SERVER, repository, models, tmp_path_factory.mktemp("server"))
    return info, out, server, model


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """--python-text ensemble: the tokenizer model -> the Python-backend engine model."""
    info, out, server, ensemble = _serve(tiny_run, tmp_path_factory, "ensemble")
    with server as s:
        yield info, out, s, ensemble


@pytest.fixture(scope="module")
def served_text(tiny_run, tmp_path_factory):
    """The default: one Python model that tokenizes and runs the engine."""
    info, out, server, model = _serve(tiny_run, tmp_path_factory, "model")
    with server as s:
        yield info, out, s, model


@pytest.fixture(params=["served_text", "served"])
def text_model(request):
    """Either way of taking text: the same answers."""
    return request.getfixturevalue(request.param)


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
    length = expected["input_ids"].shape[1]
    clients = _clients(server)
    config = clients[0][1].get_model_config(f"{info.name}-tokenizer")  # HTTP: a dict
    ladder = parse_ladder(config["parameters"]["length_ladder"]["string_value"])
    assert len(ladder) > 2
    for module, client in clients:
        result = client.infer(f"{info.name}-tokenizer", [_text_input(module, TEXTS)])
        for name in info.architecture.input_names:
            got = result.as_numpy(name)
            # The pipeline's tokens, then padding up to the rung that holds the longest text.
            assert got.shape == (len(TEXTS), rung(ladder, length))
            np.testing.assert_array_equal(got[:, :length], expected[name])
            assert not got[:, length:].any()


def test_text_model_embeddings_match_the_engine_and_pytorch(text_model):
    info, out, server, ensemble = text_model
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


def test_the_server_writes_nothing_into_the_repository(served):
    """Triton's Python backend writes the bytecode of each model.py it imports beside it: into
    the view it loads, never into the repository, which stays exactly as package wrote it."""
    _info, _out, server, _ensemble = served
    assert list(server.view.rglob("__pycache__/model.*.pyc"))  # the stub did write bytecode
    assert not list(server.repository.rglob("__pycache__"))
    open_repository(server.repository)  # every entry is one its manifest names
    # The view: copies of the files the manifest lists (no links), for the models served and
    # those they call, byte for byte.
    view = server.view
    assert not [p for p in view.rglob("*") if p.is_symlink()]
    copies = {
        p.relative_to(view).as_posix()
        for p in view.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    listed = json.loads((server.repository / "manifest.json").read_text())["outputs"]
    assert copies and copies <= set(listed)
    for copy in copies:
        assert (view / copy).read_bytes() == (server.repository / copy).read_bytes()


def test_the_repository_api_loads_and_reloads_nothing(served_text, tmp_path):
    """Model control is off: a load request with uploaded Python (the repository API's file:
    overrides) and a reload of a model whose repository file changed after serve's check are
    both refused, and the server still answers with what was checked."""
    import base64
    import urllib.error
    import urllib.request

    info, _out, server, model = served_text
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\nclass TritonPythonModel:\n    pass\n"
    body = {
        "parameters": {
            "config": json.dumps({"backend": "python", "max_batch_size": 0}),
            "file:1/model.py": base64.b64encode(payload.encode()).decode(),
        }
    }
    code = server.repository / model / "1" / "model.py"
    original = code.read_bytes()
    try:
        # Changed in the repository after serve checked it: the server holds its own copy.
        code.write_bytes(original + f"\n{payload}".encode())
        for name, data in ((f"{model}-evil", body), (model, {})):
            request = urllib.request.Request(
                f"http://{server.http}/v2/repository/models/{name}/load",
                data=json.dumps(data).encode(),
                method="POST",
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                opener.open(request, timeout=30)
            assert refused.value.code >= 400
    finally:
        code.write_bytes(original)
    assert not marker.exists()
    assert (server.view / model / "1" / "model.py").read_bytes() == original
    import tritonclient.http as http_client

    client = http_client.InferenceServerClient(server.http)
    assert client.is_model_ready(model) and not client.is_model_ready(f"{model}-evil")
    got = client.infer(model, [_text_input(http_client, TEXTS[:1])])
    assert got.as_numpy("sentence_embedding").shape == (1, info.hidden_size)


def test_server_reports_our_config(served):
    info, _out, server, ensemble = served
    _module, client = _clients(server)[0]
    config = client.get_model_config(f"{info.name}-ort-cpu-fp32-python")
    assert config["max_batch_size"] == 64
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == QUEUE_DELAY_US
    assert [i["name"] for i in config["input"]] == list(info.architecture.input_names)
    assert [g["count"] for g in config["instance_group"]] == [PYTHON_INSTANCES]
    assert client.is_model_ready(ensemble)
    # The onnxruntime-backend model is in the repository but this server has no such backend.
    assert not client.is_model_ready(f"{info.name}-ort-cpu-fp32")


def test_text_that_is_not_utf8_is_an_error_not_a_crash(text_model):
    from tritonclient.utils import InferenceServerException

    info, _out, server, ensemble = text_model
    module, client = _clients(server)[1]
    bad = module.InferInput("TEXT", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"\xff\xfe broken"]], dtype=object))
    with pytest.raises(InferenceServerException, match="UTF-8"):
        client.infer(ensemble, [bad])
    assert client.is_server_live() and client.is_model_ready(ensemble)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_example(served_text, protocol):
    info, _out, server, ensemble = served_text
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


def _stats(client, model, at_least: int = 0):
    """(requests inferred, execute calls) of a model, once at least ``at_least`` requests are
    counted (Triton updates its statistics just after it sends a response)."""
    import time

    deadline = time.monotonic() + 10
    while True:
        entry = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        counts = int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))
        if counts[0] >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def test_requests_of_different_rungs_share_an_engine_call(served):
    """Sentences of different padded lengths sent at once: the Python-backend engine runs
    several in one execute call (the dynamic batcher joins requests of different shapes only
    with ragged batching), and each answer is its own sentence's embedding."""
    import tritonclient.grpc as grpc_client

    info, out, server, ensemble = served
    client = grpc_client.InferenceServerClient(server.grpc)
    config = client.get_model_config(f"{info.name}-tokenizer", as_json=True)["config"]
    ladder = parse_ladder(config["parameters"]["length_ladder"]["string_value"])
    hf = load_tokenizer(info)
    engine, _ = load_engine(cpu_engine_dir(out))
    by_rung = {}
    for words in range(1, 120):
        feeds = tokenize(hf, ["word " * words], info, info.max_length)
        by_rung.setdefault(rung(ladder, feeds["input_ids"].shape[1]), ("word " * words, feeds))
    assert len(by_rung) >= 4, by_rung.keys()
    expected = {
        text: engine.run(feeds)["sentence_embedding"][0] for text, feeds in by_rung.values()
    }
    engine_model = f"{info.name}-ort-cpu-fp32-python"
    inferred, executed = _bursts(client, ensemble, engine_model, expected)
    assert executed < inferred, f"{inferred} requests of distinct shapes in {executed} calls"


def _bursts(client, model: str, counted: str, expected: dict, tries: int = 5) -> tuple[int, int]:
    """Send one request per text of ``expected`` at once to ``model``, check each answer is its
    own text's embedding, and read how many execute calls ``counted`` ran for them; again (up to
    ``tries`` bursts) until some shared a call. Returns (requests, execute calls) of the last."""
    import queue

    import tritonclient.grpc as grpc_client

    texts = list(expected)
    answers: queue.Queue = queue.Queue()
    for _burst in range(tries):
        before = _stats(client, counted)
        for index, text in enumerate(texts):
            client.async_infer(
                model,
                [_text_input(grpc_client, [text])],
                callback=lambda result, error, index=index: answers.put((index, result, error)),
            )
        for _ in texts:
            index, result, error = answers.get(timeout=60)
            assert error is None, error
            got = result.as_numpy("sentence_embedding")
            np.testing.assert_allclose(got[0], expected[texts[index]], atol=1e-5)
        after = _stats(client, counted, at_least=before[0] + len(texts))
        inferred, executed = after[0] - before[0], after[1] - before[1]
        assert inferred == len(texts)
        if executed < inferred:
            break
    return inferred, executed


def test_text_model_runs_requests_of_any_length_together(served_text):
    """Sentences of many lengths sent at once to the one-model text engine: it answers several
    in one execute call (its input is one string a row, so Triton batches any requests), and
    each answer is its own sentence's embedding."""
    import tritonclient.grpc as grpc_client

    info, out, server, model = served_text
    client = grpc_client.InferenceServerClient(server.grpc)
    config = client.get_model_config(model, as_json=True)["config"]
    assert config["backend"] == "python" and not config.get("ensemble_scheduling")
    assert [g["count"] for g in config["instance_group"]] == [PYTHON_INSTANCES]
    texts = ["word " * words for words in (1, 3, 9, 20, 41, 70, 110)]
    engine, _ = load_engine(cpu_engine_dir(out))
    hf = load_tokenizer(info)
    expected = {
        text: engine.run(tokenize(hf, [text], info, info.max_length))["sentence_embedding"][0]
        for text in texts
    }
    inferred, executed = _bursts(client, model, model, expected)
    assert executed < inferred, f"{inferred} requests in {executed} calls"


def _load(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "triton_load.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_load_generator_reports_throughput_and_latency(text_model):
    info, _out, server, ensemble = text_model
    result = _load(
        "--url", server.grpc, "--model", ensemble, "--concurrency", "1,4", "--requests", 24,
        "--warmup", 4, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["target"], r["concurrency"]) for r in summary["results"]] == [
        ("server", 1),
        ("server", 4),
    ]
    for row in summary["results"]:
        assert row["completed"] == 24 and row["errors"] == 0 and not row["deadline_hit"]
        assert row["sentences_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["engine_batch"] >= 1 and row["tokenizer_batch"] >= 1
    assert "sent/s" in result.stdout.splitlines()[0]


def test_load_generator_refuses_a_model_that_does_not_take_text_to_outputs(served_text):
    info, _out, server, _model = served_text
    result = _load("--url", server.grpc, "--model", f"{info.name}-tokenizer", "--requests", 2)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "is neither a tokenizer -> engine ensemble nor a Python text model" in line


def test_load_generator_sends_the_texts_of_data(served_text, tmp_path):
    _info, _out, server, ensemble = served_text
    texts = tmp_path / "texts.txt"
    texts.write_text("a short one\na somewhat longer sentence to send\n", encoding="utf-8")
    common = ["--url", server.grpc, "--model", ensemble, "--concurrency", "2", "--warmup", 0]
    result = _load(*common, "--requests", 6, "--data", texts, "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])["results"]
    assert row["completed"] == 6 and row["errors"] == 0
    no_column = tmp_path / "texts.tsv"
    no_column.write_text("text\nhello\n", encoding="utf-8")
    result = _load(*common, "--requests", 2, "--data", no_column)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"triton_load: {ensemble}: ") and "sentence" in line


def test_load_generator_compares_repositories_on_their_own_servers(tiny_run, tmp_path):
    info, out, _spec, _summary = tiny_run
    # The baseline of docs/benchmarks.md (per-request padding through the ensemble) and the
    # default (one Python text model).
    repositories = {"request": tmp_path / "request", "model": tmp_path / "model"}
    baseline = PackageSpec(python_cpu_engine=True, python_text="ensemble", padding="request")
    package(info=info, out=out, repository=repositories["request"], spec=baseline)
    default = PackageSpec(python_cpu_engine=True)
    package(info=info, out=out, repository=repositories["model"], spec=default)
    ensemble = f"{info.name}-ort-cpu-fp32-python-text"
    result = _load(
        "--model", ensemble, "--repository", f"request={repositories['request']}",
        "--repository", f"model={repositories['model']}", "--concurrency", "8",
        "--requests", 32, "--warmup", 0, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])["results"]
    assert [r["target"] for r in rows] == ["request", "model"]
    assert all(r["completed"] == 32 and r["errors"] == 0 for r in rows)


@pytest.fixture(scope="module")
def served_torch_text(tiny_run, tmp_path_factory):
    """The torch engine's text model (a CPU engine here; KIND_GPU for a cuda one)."""
    from bert_compiler.engines.backend import BuildSpec
    from bert_compiler.run import RunSpec, run_pipeline
    from tests.conftest import TINY_VERIFY

    info, _out, _spec, _summary = tiny_run
    out = tmp_path_factory.mktemp("torch-out")
    builds = (BuildSpec(backend="torch"),)
    summary = run_pipeline(info=info, out=out, spec=RunSpec(builds=builds, verify=TINY_VERIFY))
    assert summary.ok, summary.engines
    repository = tmp_path_factory.mktemp("torch-served") / "repo"
    spec = PackageSpec(max_queue_delay_us=QUEUE_DELAY_US)
    package(info=info, out=out, repository=repository, spec=spec)
    model = f"{info.name}-pt-cpu-fp32-text"
    engine = out / "engines" / info.name / summary.engines[0].name
    with triton_server(SERVER, repository, [model], tmp_path_factory.mktemp("server")) as server:
        yield info, engine, server, model


def test_torch_text_model_serves_the_runtimes_embeddings(served_torch_text):
    """Requests of 1 and several texts of any length, over HTTP and gRPC: each answered with
    the torch engine's own embeddings through the runtime, and requests sent at once share
    the model's execute calls."""
    from concurrent.futures import ThreadPoolExecutor

    from bert_compiler.runtime.encoder import Encoder

    info, engine, server, model = served_torch_text
    texts = [*TEXTS, "a man plays a guitar", "two dogs run across a wide green field"]
    expected = Encoder.open(engine, info).encode(texts)["sentence_embedding"]
    for module, client in _clients(server):
        got = client.infer(model, [_text_input(module, texts)]).as_numpy("sentence_embedding")
        np.testing.assert_allclose(got, expected, atol=1e-5)
        alone = client.infer(model, [_text_input(module, texts[2:3])])
        np.testing.assert_allclose(alone.as_numpy("sentence_embedding"), expected[2:3], atol=1e-5)
    import tritonclient.grpc as grpc_client

    client = grpc_client.InferenceServerClient(server.grpc)
    before = _stats(client, model)
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda i: client.infer(model, [_text_input(grpc_client, [texts[i % len(texts)]])]),
                range(48),
            )
        )
    for i, answer in enumerate(answers):
        row = answer.as_numpy("sentence_embedding")
        np.testing.assert_allclose(row, expected[i % len(texts)][None], atol=1e-5)
    after = _stats(client, model, before[0] + 48)
    inferred, executed = (a - b for a, b in zip(after, before, strict=True))
    assert inferred == 48 and executed < 48  # joined by the dynamic batcher
