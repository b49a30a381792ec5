"""`bert-compile bench` works end to end on a tiny model (it measures nothing worth keeping here:
benchmarks run on real models, see docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.runtime import encoder as runtime
from tests.conftest import cpu_engine_dir

pytestmark = pytest.mark.e2e

FIELDS = {
    "model",
    "runner",
    "data",
    "batching",
    "batch",
    "seq",
    "sentences_per_s",
    "tokens_per_s",
    "padding_fraction",
    "p50_ms",
    "p99_ms",
    "includes_tokenization",
    "roofline_fraction",
}


def test_bench_times_engines_and_peers_side_by_side(tiny_run, tmp_path):
    info, out, _spec, _summary = tiny_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    args = ["bench", "--model", str(info.path), "--out", str(copy), "--limit", "40"]
    args += ["--rounds", "2", "--peer-batches", "32", "--runtime-batches", "8,32x4096"]
    args += ["--fixed-shapes", "2x16", "--json", "--progress"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # --progress: bars on stderr even with --json; stdout holds only the JSON object.
    assert "bench all runners" in result.stderr
    (line,) = result.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["device"]["kind"] == "cpu" and report["sentences"] == 40
    rows = report["results"]
    assert all(set(row) == FIELDS for row in rows)
    # The roofline is a GPU's (bench/roofline.py): none on a CPU.
    assert report["roofline"] is None and {r["roofline_fraction"] for r in rows} == {None}
    runners = [(row["runner"], row["data"]) for row in rows]
    engine = next(r["runner"] for r in rows if r["runner"].endswith("(runtime)"))
    name = engine.removesuffix(" (runtime)")
    assert {
        (engine, "real"),
        (f"{name} (fed in dataset order)", "real"),
        ("torch fp32 eager", "real"),
        ("ORT fp32 (ORT's optimizer)", "real"),
        (name, "fixed"),
        ("torch fp32 eager", "fixed"),
    } <= set(runners)
    assert runners.count((name, "fixed")) == 1
    # End to end, texts in: the engine through encode, sentence-transformers at its default
    # batch and a large one, and the tokenizers alone; every other row starts from tokens.
    end_to_end = {(r["runner"], r["batching"]) for r in rows if r["includes_tokenization"]}
    assert {runner for runner, _ in end_to_end} == {
        f"{name} (runtime, texts in)",
        "sentence-transformers fp32 encode",
        "tokenizer: Hugging Face fast __call__ (lists)",
        "tokenizer: runtime row tokenizer, cold piece cache",
        "tokenizer: runtime row tokenizer, warm piece cache",
    }
    assert {b for r, b in end_to_end if r.startswith("sentence-")} == {
        "its own, batch 32",
        "its own, batch 256",
    }
    assert not any(r["includes_tokenization"] for r in rows if r["runner"] == engine)
    # The default (also given as 32x4096), 8 rows and, where the default runs several batches
    # at once, the default one batch at a time.
    concurrent = min(runtime.CPU_CONCURRENT_BATCHES, runtime.usable_cores())
    assert runners.count((engine, "real")) == (3 if concurrent > 1 else 2)
    at_once = {r["batching"].split("tokens")[-1] for r in rows if r["runner"] == engine}
    if concurrent > 1:
        assert at_once == {f", {concurrent} batches at a time", ", one batch at a time"}
    else:
        assert at_once == {""}
    assert any(r["batching"].startswith("length-sorted, <= 8 rows") for r in rows)
    for row in rows:
        assert row["sentences_per_s"] > 0 and row["tokens_per_s"] >= row["sentences_per_s"]
        assert 0 <= row["padding_fraction"] < 1
    sorted_peer = next(r for r in rows if r["batching"] == "length-sorted, batch 32")
    in_order = next(r for r in rows if r["batching"] == "dataset order, batch 32")
    assert sorted_peer["padding_fraction"] < in_order["padding_fraction"]
    files = report["files"]
    assert json.loads((copy / "bench" / "bench.json").read_text())["results"] == rows
    assert (copy / "bench" / "bench.txt").read_text().startswith("runner")
    if "chart" in files:
        assert (copy / "bench" / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_without_engines_says_to_run_first(tiny_embedding_model, tmp_path):
    result = CliRunner().invoke(
        cli, ["bench", "--model", str(tiny_embedding_model), "--out", str(tmp_path)]
    )
    assert result.exit_code == 3, result.output
    assert "no engines to benchmark" in result.stderr and "bert-compile run" in result.stderr


def test_bad_bench_shapes_are_one_line(tiny_embedding_model, tmp_path):
    result = CliRunner().invoke(
        cli, ["bench", "--model", str(tiny_embedding_model), "--fixed-shapes", "32by128"]
    )
    assert result.exit_code == 2 and "BATCHxSEQUENCE" in result.output


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--runtime-batches", "99999999999999999999x1"),  # overflowed numpy: a traceback
        ("--runtime-batches", "1x99999999999999999999"),
        ("--fixed-shapes", "1000000000x128"),  # three int64 matrices of 1 TB
        ("--fixed-shapes", "2x\u00b2"),  # a digit to str.isdigit, not to int()
        ("--peer-batches", "32,\u00b2"),
        ("--peer-batches", ","),
    ],
)
def test_bench_lists_out_of_bounds_name_their_flag(tiny_embedding_model, tmp_path, flag, value):
    argv = ["bench", "--model", str(tiny_embedding_model), "--out", str(tmp_path), flag, value]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}': {value!r}" in result.output
    # A usage error, not an exception escaping the command.
    assert isinstance(result.exception, SystemExit), result.exception


def test_bench_refuses_to_write_into_a_folder_that_is_not_ours(tiny_run, tmp_path):
    """OUT/bench went into any --out (a user's folder, the root) after the timing."""
    info, out, _spec, _summary = tiny_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    engine = str(cpu_engine_dir(out))
    argv = ["bench", "--model", str(info.path), "--engine", engine, "--no-peers", "--rounds", "1"]
    result = CliRunner().invoke(cli, [*argv, "--out", str(mine)])
    assert result.exit_code == 3, result.output
    assert "not an output folder of bert-compile" in result.stderr and "--force-out" in (
        result.stderr
    )
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    fresh = tmp_path / "fresh"
    result = CliRunner().invoke(cli, [*argv, "--fixed-shapes", "", "--out", str(fresh)])
    assert result.exit_code == 0, result.output
    assert (fresh / "bench" / "bench.json").is_file()


def test_an_engine_named_twice_is_timed_once(tiny_run, tmp_path):
    from bert_compiler.bench.measure import _engine_folders
    from bert_compiler.stages.layout import Layout

    engine = cpu_engine_dir(tiny_run[1])
    given = [engine, Path(f"{engine}/"), engine / ".", tmp_path, engine]
    assert _engine_folders(Layout(tmp_path), "m", given) == [engine, tmp_path]


@pytest.mark.parametrize("cap", ["sentences", "chars"])
def test_data_past_the_caps_is_read_up_to_them(tmp_path, monkeypatch, caplog, cap):
    """--data far larger than what is timed, without --limit: bench keeps the first sentences
    up to its caps (count or characters), says so, and reads no further."""
    from bert_compiler.bench import measure as bench
    from bert_compiler.models.loading import resolve_model

    if cap == "sentences":
        monkeypatch.setattr(bench, "DATA_MAX_SENTENCES", 50)
    else:
        monkeypatch.setattr(bench, "DATA_MAX_CHARS", 1000)
    data = tmp_path / "large.txt"
    data.write_text("".join(f"sentence number {index}\n" for index in range(5000)))
    with caplog.at_level("WARNING", logger="bert_compile"):
        got = bench.real_sentences(
            bench.BenchSpec(data=data), on_gpu=False, info=resolve_model("default")
        )
    expected = 50 if cap == "sentences" else 1000 // len("sentence number 10")
    assert len(got) == pytest.approx(expected, abs=expected // 5 + 1)
    assert got[:2] == ["sentence number 0", "sentence number 1"]
    assert "timing its first" in caplog.text and "pass --limit to choose" in caplog.text
