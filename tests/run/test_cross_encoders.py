"""Cross-encoders (rerankers): one-label sequence classifiers that score text pairs. Pairs go
through the model's own pair template everywhere text goes (the pipeline's tokenizer, the
runtime, calibration, parity, the Triton tokenizer model), and the metric is STS-B Spearman of
the scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import InputError
from bert_compiler.models.loading import load_tokenizer, resolve_model
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.runtime.text import iter_file_texts, parity_batches, parity_texts, tokenize
from bert_compiler.runtime.tokenizing import tokenize_rows
from bert_compiler.triton.package import package
from bert_compiler.triton.package_spec import PackageSpec
from tests.conftest import TINY_VERIFY, run_fp32_and_int8
from tests.tiny_models import make_tiny_model
from tests.triton_server import find_server, triton_server

PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument."),
    ("", "An empty first text."),
    ("Two dogs run across a wide green field together before the rain. " * 9, "Dogs run."),
    ("Short.", "A long second text that truncation must cut, longest first. " * 9),
]


@pytest.fixture(scope="module")
def cross_encoders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random cross-encoders: BERT's pair template and RoBERTa's."""
    root = tmp_path_factory.mktemp("cross-encoders")
    return {
        model_type: make_tiny_model(
            root / f"ce-{model_type}",
            model_type=model_type,
            task="sequence-classification",
            num_labels=1,
        )
        for model_type in ("bert", "roberta")
    }


@pytest.mark.unit
def test_a_one_label_classifier_is_a_cross_encoder(cross_encoders, tiny_classifier_model):
    assert resolve_model(cross_encoders["bert"]).pairs
    assert not resolve_model(tiny_classifier_model).pairs  # two labels: single sentences


@pytest.mark.unit
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_pairs_tokenize_with_the_models_template_truncated_longest_first(
    cross_encoders, model_type
):
    info = resolve_model(cross_encoders[model_type])
    hf = load_tokenizer(info)
    max_length = 24
    feeds = tokenize(hf, PAIRS, info, max_length)
    ids = feeds["input_ids"]
    assert ids.shape[1] == max_length  # the long pairs are cut to the limit
    for row, (first, second) in enumerate(PAIRS):
        alone = hf(first, second, truncation="longest_first", max_length=max_length)
        length = len(alone["input_ids"])
        assert ids[row, :length].tolist() == alone["input_ids"]
        assert feeds["attention_mask"][row].sum() == length
        one, two = hf(first)["input_ids"], hf(second)["input_ids"]
        if model_type == "bert":
            # [CLS] a [SEP] b [SEP], type ids 0 then 1.
            cls, sep = hf.cls_token_id, hf.sep_token_id
            if len(one) + len(two) - 1 <= max_length:
                assert alone["input_ids"] == one + two[1:]
            assert ids[row, 0] == cls and ids[row, length - 1] == sep
            types = feeds["token_type_ids"][row, :length].tolist()
            boundary = types.index(1)
            assert ids[row, boundary - 1] == sep and set(types[:boundary]) == {0}
            assert set(types[boundary:]) == {1}
        else:
            # <s> a </s></s> b </s>, and no token_type_ids input.
            assert "token_type_ids" not in feeds
            sep = hf.sep_token_id
            if len(one) + len(two) <= max_length:
                assert alone["input_ids"] == one + [sep] + two[1:]
            assert ids[row, :length].tolist().count(sep) == 3
    # Longest first: the long side is cut, the short side kept whole.
    short = hf("Short.", add_special_tokens=False)["input_ids"]
    assert ids[3, 1 : 1 + len(short)].tolist() == short
    # The runtime tokenizes pairs the same way, unpadded: here and at the model's maximum,
    # which the long pairs reach.
    for limit in (max_length, info.max_length):
        rows = tokenize_rows(hf, PAIRS, info, limit)
        expected = hf(
            [a for a, _ in PAIRS], [b for _, b in PAIRS], truncation="longest_first",
            max_length=limit,
        )["input_ids"]  # fmt: skip
        assert rows.lengths.tolist() == [len(row) for row in expected]
        assert rows.ids.tolist() == [i for row in expected for i in row]
        assert max(rows.lengths) == limit


@pytest.mark.unit
def test_the_kind_of_text_must_match_the_model(cross_encoders, tiny_classifier_model, tmp_path):
    pairs = resolve_model(cross_encoders["bert"])
    single = resolve_model(tiny_classifier_model)
    with pytest.raises(InputError, match="cross-encoder .* give \\(text, text_pair\\) pairs"):
        tokenize(load_tokenizer(pairs), ["one sentence"], pairs, 16)
    with pytest.raises(InputError, match="reads single texts, not pairs"):
        tokenize(load_tokenizer(single), [("a", "b")], single, 16)
    sentences = tmp_path / "sentences.tsv"
    sentences.write_text("sentence\nA single sentence.\n")
    with pytest.raises(InputError, match="--pair-column"):
        iter_file_texts(pairs, sentences, column="sentence", pair_column=None)
    with pytest.raises(InputError, match="--pair-column 'other': .* reads single texts"):
        iter_file_texts(single, sentences, column="sentence", pair_column="other")
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text('{"q": " a query ", "p": "a passage"}\n{"q": "", "p": "skipped"}\n')
    texts = list(iter_file_texts(pairs, pair_file, column="q", pair_column="p"))
    assert texts == [("a query", "a passage")]
    with pytest.raises(InputError, match="text pairs need a .tsv or .jsonl"):
        list(iter_file_texts(pairs, tmp_path / "x.txt", column="q", pair_column="p"))


@pytest.mark.unit
def test_parity_pairs_are_stsb_dev_pairs_with_edge_pairs(cross_encoders):
    info = resolve_model(cross_encoders["bert"])
    texts = parity_texts(info, count=10)
    assert len(texts) == 10 and all(isinstance(t, tuple) and all(t) for t in texts)
    batches = parity_batches(texts, max_length=info.max_length)
    edges = [text for batch in batches[-3:] for text in batch]
    assert ("", "") in edges and ("a", "b") in edges
    long_pair = batches[-1][0]
    assert long_pair[1] == "a" and len(long_pair[0].split()) >= info.max_length
    feeds = tokenize(load_tokenizer(info), batches[-1], info, info.max_length)
    assert feeds["input_ids"].shape == (1, info.max_length)


@pytest.mark.unit
def test_a_single_sentence_file_for_a_cross_encoder_is_one_line(cross_encoders, tmp_path):
    sentences = tmp_path / "sentences.tsv"
    sentences.write_text("sentence\nA single sentence.\n")
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--model",
            str(cross_encoders["bert"]),
            "--out",
            str(tmp_path / "out"),
            "--target",
            "cpu",
            "--precision",
            "int8",
            "--calibration-data",
            str(sentences),
        ],
    )
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cross-encoder" in lines[0] and "--pair-column" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "export").exists()  # refused before any stage ran


@pytest.mark.unit
def test_a_pair_column_that_is_the_text_column_is_one_line(cross_encoders, tmp_path):
    """Each pair would be one text twice: refused before any stage runs."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("q\tp\nA question.\tAn answer.\n")
    out = tmp_path / "out"
    argv = ["run", "--model", str(cross_encoders["bert"]), "--out", str(out), "--target", "cpu"]
    argv += ["--precision", "int8", "--calibration-data", str(pairs)]
    result = CliRunner().invoke(cli, [*argv, "--text-column", "q", "--pair-column", "q"])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pair-column 'q' is also --text-column" in lines[0], lines
    assert "Traceback" not in result.output and not (out / "export").exists()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flags", "columns"),
    [
        ([], ("sentence1", "sentence2")),
        (["--pair-column", "sentence1"], ("sentence1", "sentence1")),
        (["--pair-column", "sentence2"], ("sentence1", "sentence2")),
        (["--text-column", "sentence2", "--pair-column", "sentence1"], ("sentence2", "sentence1")),
    ],
)
def test_columns_given_for_the_bundled_pairs_keep_the_others_bundled(
    cross_encoders, tmp_path, monkeypatch, flags, columns
):
    """--pair-column alone read the bundled pairs' first text from a 'sentence' column they do
    not have; the columns not given stay the bundled file's."""
    from bert_compiler.cli import stage_commands as cli_module

    seen = {}

    def record(*, spec, **_kwargs):
        seen["columns"] = (spec.text_column, spec.pair_column)
        raise InputError("recorded")

    monkeypatch.setattr(cli_module, "calibrate", record)
    model, graph = str(cross_encoders["bert"]), str(tmp_path / "model.onnx")
    argv = ["calibrate", "--model", model, "--out", str(tmp_path / "o"), "--input", graph]
    result = CliRunner().invoke(cli, [*argv, *flags])
    if columns[0] == columns[1]:
        assert result.exit_code == 3 and "is also --text-column" in result.stderr, result.output
        return
    assert result.exit_code == 3 and "recorded" in result.stderr, result.output
    assert seen["columns"] == columns


@pytest.mark.unit
@pytest.mark.parametrize(
    ("column", "pair_column", "expected"),
    [
        (
            "q",
            None,
            "name the file's second text column with --data-pair-column (the first is "
            "--data-column)",
        ),
        ("q", "q", "--data-pair-column 'q' is also --data-column"),
        ("q", "missing", "header ['q', 'p'] lacks column(s) ['missing']"),
    ],
)
def test_bench_data_errors_name_benchs_own_flags(
    cross_encoders, tmp_path, column, pair_column, expected
):
    from bert_compiler.bench.measure import BenchSpec, real_sentences

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("q\tp\nA question.\tAn answer.\n")
    spec = BenchSpec(data=pairs, text_column=column, pair_column=pair_column)
    with pytest.raises(InputError) as raised:
        real_sentences(spec, False, resolve_model(cross_encoders["bert"]))
    assert expected in str(raised.value)
    assert "--pair-column" not in str(raised.value).replace("--data-pair-column", "")


@pytest.mark.e2e
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_cross_encoder_runs_fp32_and_int8_to_a_gated_repository(
    cross_encoders, model_type, tmp_path
):
    folder = cross_encoders[model_type]
    out = tmp_path / "out"
    _result, summary = run_fp32_and_int8(folder, out, metric_limit=200)
    for engine in summary["engines"]:
        assert engine["metric"]["name"] == "stsb_spearman"
        report = json.loads(Path(engine["report"]).read_text())
        assert report["metric"]["examples"] == 200
        assert list(report["parity"]) == ["logits"]
    fp32 = next(e for e in summary["engines"] if e["precision"] == "fp32")
    assert fp32["metric"]["value"] == pytest.approx(
        summary["pytorch_fp32_metric"]["value"], abs=0.05
    )
    calibrate = json.loads((out / "calibrate" / "manifest.json").read_text())
    assert calibrate["inputs"]["data"]["path"].endswith("calibration-pairs.tsv")
    assert calibrate["spec"]["pair_column"] == "sentence2"
    repository = Path(summary["repository"]["path"])
    config = (repository / f"{folder.name}-tokenizer" / "config.pbtxt").read_text()
    assert '"TEXT"' in config and '"TEXT_PAIR"' in config
    # The engine scores pairs through the runtime as PyTorch does.
    from bert_compiler.runtime.encoder import Encoder
    from bert_compiler.stages.verify import torch_runner

    info = resolve_model(folder)
    (engine_dir,) = (out / "engines" / folder.name).glob("ort*-cpu-fp32")
    scores = Encoder.open(engine_dir, info).encode(PAIRS)["logits"]
    feeds = tokenize(load_tokenizer(info), PAIRS, info, info.max_length)
    expected = torch_runner(info, pooling_in_graph=False)(feeds)["logits"]
    assert scores.shape == (len(PAIRS), 1)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    # bench times the engines on pairs: STS-B dev pairs by default, a file's two columns asked.
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("q\tp\n" + "".join(f"{a}\t{b}\n" for a, b in PAIRS if a))
    bench = ["bench", "--model", str(folder), "--out", str(out), "--rounds", "1", "--json"]
    bench += ["--no-peers", "--fixed-shapes", ""]
    for data in ([], ["--data", str(pairs_file), "--data-column", "q", "--data-pair-column", "p"]):
        result = CliRunner().invoke(cli, [*bench, "--limit", "40", *data], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["sentences"] == (3 if data else 40) and report["results"]


SERVER = find_server()


@pytest.fixture(scope="module")
def served_cross_encoder(cross_encoders, tmp_path_factory):
    """The tiny BERT cross-encoder run, packaged with its Python-backend engine and served by
    the real Triton server (Python backend, on the CPU here)."""
    if isinstance(SERVER, str):
        pytest.skip(SERVER)
    info = resolve_model(cross_encoders["bert"])
    out = tmp_path_factory.mktemp("runs") / "ce"
    run_pipeline(info=info, out=out, spec=RunSpec(verify=TINY_VERIFY))
    repository = tmp_path_factory.mktemp("served") / "repo"
    package(info=info, out=out, repository=repository, spec=PackageSpec(python_cpu_engine=True))
    ensemble = f"{info.name}-ort-cpu-fp32-python-text"
    workdir = tmp_path_factory.mktemp("server")
    models = [ensemble, f"{info.name}-tokenizer"]
    with triton_server(SERVER, repository, models, workdir) as server:
        yield info, out, server, ensemble


def _pair_inputs(module, pairs, second_count=None):
    tensors = []
    for name, texts in (
        ("TEXT", [a for a, _ in pairs]),
        ("TEXT_PAIR", [b for _, b in pairs][:second_count]),
    ):
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        tensor = module.InferInput(name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        tensors.append(tensor)
    return tensors


@pytest.mark.e2e
def test_triton_ensemble_scores_pairs_as_the_engine_does(served_cross_encoder):
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client
    from tritonclient.utils import InferenceServerException

    from bert_compiler.runtime.encoder import Encoder
    from tests.conftest import cpu_engine_dir

    info, out, server, ensemble = served_cross_encoder
    expected = Encoder.open(cpu_engine_dir(out), info).encode(PAIRS)["logits"]
    feeds = tokenize(load_tokenizer(info), PAIRS, info, info.max_length)
    clients = [
        (http_client, http_client.InferenceServerClient(server.http)),
        (grpc_client, grpc_client.InferenceServerClient(server.grpc)),
    ]
    config = clients[0][1].get_model_config(ensemble)
    assert [i["name"] for i in config["input"]] == ["TEXT", "TEXT_PAIR"]
    for module, client in clients:
        tokens = client.infer(f"{info.name}-tokenizer", _pair_inputs(module, PAIRS))
        length = feeds["input_ids"].shape[1]
        assert length == info.max_length  # the long pairs are cut at the model's maximum
        for name in info.architecture.input_names:
            np.testing.assert_array_equal(tokens.as_numpy(name)[:, :length], feeds[name])
        scores = client.infer(ensemble, _pair_inputs(module, PAIRS)).as_numpy("logits")
        assert scores.shape == (len(PAIRS), 1) and scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    module, client = clients[1]
    for model in (f"{info.name}-tokenizer", ensemble):
        with pytest.raises(InferenceServerException, match="batch size does not match"):
            client.infer(model, _pair_inputs(module, PAIRS, second_count=2))
    assert client.is_model_ready(ensemble)


@pytest.mark.unit
def test_the_tokenizer_model_pairs_its_two_inputs_row_by_row():
    from bert_compiler.triton.tokenizer_model import request_texts

    first = np.array([[b"a query"], [b"b query"]], dtype=object)
    second = np.array([[b"a passage"], [b"b passage"]], dtype=object)
    assert request_texts([first]) == ["a query", "b query"]
    assert request_texts([first, second]) == [("a query", "a passage"), ("b query", "b passage")]
    with pytest.raises(ValueError, match="TEXT holds 2 strings and TEXT_PAIR 1: one pair a row"):
        request_texts([first, second[:1]])


@pytest.mark.unit
def test_a_scores_cosine_is_that_of_all_its_values():
    from bert_compiler.runtime.parity import DEFAULT_TOLERANCES, OutputParity

    reference = np.array([[2.0], [-1.5], [1e-4]], dtype=np.float32)
    candidate = np.array([[2.01], [-1.49], [-1e-4]], dtype=np.float32)  # the small one flips
    scores = OutputParity("logits")
    scores.update(reference, candidate, None)
    assert 0.9999 < scores.min_cosine < 1.0  # one vector: a flipped near-zero score is no -1
    assert not scores.failures(DEFAULT_TOLERANCES["int8"])
    opposite = OutputParity("logits")
    opposite.update(reference, -reference, None)
    assert opposite.min_cosine == pytest.approx(-1.0)
    assert any("min_cosine" in f for f in opposite.failures(DEFAULT_TOLERANCES["int8"]))


@pytest.mark.e2e
def test_client_example_sends_tab_separated_pairs(served_cross_encoder):
    import subprocess
    import sys

    from bert_compiler.runtime.encoder import Encoder
    from tests.conftest import cpu_engine_dir
    from tests.triton_server import REPO_ROOT

    info, out, server, ensemble = served_cross_encoder
    client = [sys.executable, str(REPO_ROOT / "scripts" / "triton_client.py")]
    client += ["--model", ensemble, "--url", server.http, "--json"]
    pairs = PAIRS[:1] + PAIRS[3:]
    result = subprocess.run(
        [*client, *(f"{a}\t{b}" for a, b in pairs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    scores = np.array(json.loads(result.stdout.strip().splitlines()[-1])["logits"])
    expected = Encoder.open(cpu_engine_dir(out), info).encode(pairs)["logits"]
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    refused = subprocess.run([*client, "no tab here"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "query<TAB>passage" in refused.stderr


@pytest.mark.unit
def test_tensorrt_profiles_are_derived_from_pair_lengths(cross_encoders, tmp_path):
    from bert_compiler.calibration import datasets
    from bert_compiler.engines.tensorrt_options import ProfileDerivation, derive_profiles
    from bert_compiler.stages.build import (
        PROFILE_SENTENCES,
        ProfileText,
        derive_dataset_profiles,
    )

    info = resolve_model(cross_encoders["bert"])
    derivation = ProfileDerivation(max_batch=8)
    pairs = ProfileText(datasets.CALIBRATION_PAIRS, *datasets.PAIR_COLUMNS, info.max_length)
    profiles = derive_dataset_profiles(info, pairs, derivation)
    # The quantiles of the pairs' token lengths (both texts and the template), not of one side.
    rows = datasets.read_tsv(datasets.CALIBRATION_PAIRS, datasets.PAIR_COLUMNS)[:PROFILE_SENTENCES]
    encoded = load_tokenizer(info)(
        [r["sentence1"].strip() for r in rows],
        [r["sentence2"].strip() for r in rows],
        truncation="longest_first",
        max_length=info.max_length,
    )
    lengths = [len(ids) for ids in encoded["input_ids"]]
    assert profiles == derive_profiles(
        lengths, max_batch=8, max_length=info.max_length, buckets=derivation.buckets
    )
    assert profiles[-1].max_seq == info.max_length
    firsts = ProfileText(datasets.CALIBRATION_PAIRS, "sentence1", None, info.max_length)
    with pytest.raises(InputError, match="--pair-column"):
        derive_dataset_profiles(info, firsts, derivation)


@pytest.mark.unit
def test_pair_files_missing_a_column_are_one_line(cross_encoders, tmp_path):
    info = resolve_model(cross_encoders["bert"])
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("query\tpassage\na\tb\n")
    with pytest.raises(InputError, match=r"pairs.tsv:1: header .* lacks column\(s\) \['answer'\]"):
        list(iter_file_texts(info, tsv, column="query", pair_column="answer"))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"q": "a", "p": "b"}\n{"q": "c"}\n')
    with pytest.raises(InputError, match="pairs.jsonl:2: no string field 'p'"):
        list(iter_file_texts(info, jsonl, column="q", pair_column="p"))


@pytest.mark.e2e
def test_load_generator_sends_pairs_to_a_cross_encoder(served_cross_encoder):
    import subprocess
    import sys

    from tests.triton_server import REPO_ROOT

    _info, _out, server, ensemble = served_cross_encoder
    load = [sys.executable, str(REPO_ROOT / "scripts" / "triton_load.py"), "--url", server.grpc]
    load += ["--model", ensemble, "--concurrency", "2", "--requests", "12", "--warmup", "2"]
    result = subprocess.run([*load, "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout.strip().splitlines()[-1])["results"]
    assert row["completed"] == 12 and row["errors"] == 0


@pytest.mark.e2e
def test_serves_try_line_for_a_cross_encoder_sends_a_pair(served_cross_encoder):
    import subprocess
    import sys

    from bert_compiler.triton.server import describe
    from tests.triton_server import REPO_ROOT

    _info, _out, server, ensemble = served_cross_encoder
    summary = describe(server, SERVER, server.repository)
    # The fixture serves the tokenizer model too, which takes pairs as well.
    assert sorted(summary.text_pairs) == sorted(summary.models)
    assert ensemble in summary.models
    (line,) = [x for x in summary.lines().splitlines() if x.startswith("  try: ")]
    command = line.removeprefix("  try: ").replace("python ", f"{sys.executable} ", 1)
    result = subprocess.run(
        ["bash", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "logits: shape [1, 1]" in result.stderr
