"""The CLI: exit codes, one stderr line, JSON as the last stdout line, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from tests.conftest import cpu_engine_dir
from tests.tiny_models import edit_config

QUICK = ["--metric-limit", "100", "--no-metric-gate"]  # see conftest.TINY_VERIFY


RUN_KEYS = {
    "ok", "model", "out", "fused_operators", "fusion_note", "pytorch_fp32_metric", "engines",
    "stages", "repository", "notes",
}  # fmt: skip
ENGINE_KEYS = {
    "name", "backend", "device", "precision", "compute_capability", "path", "manifest", "report",
    "passed", "failures", "parity", "metric", "float_ops", "speed",
}  # fmt: skip


def _invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def _last_json(result):
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_run_json_last_line(tiny_embedding_model, tmp_path):
    result = _invoke("run", "--model", tiny_embedding_model, "--out", tmp_path, "--json", *QUICK)
    assert result.exit_code == 0, result.output
    summary = _last_json(result)
    engine = summary["engines"][0]
    assert summary["ok"] and engine["passed"]
    # The schema docs/guides/ci.md documents ("Machine-readable output"), key for key.
    schema = {
        "top level": (summary, RUN_KEYS),
        "each of `engines`": (engine, ENGINE_KEYS),
        "an engine's `parity`": (engine["parity"], {"max_abs_err", "rel_l2_err", "min_cosine",
                                                     "passed"}),
        "its `metric`": (engine["metric"], {"name", "value"}),
        "its `speed`": (engine["speed"], {"measured", "sentences", "sentences_per_s"}),
        "each of `stages`": (summary["stages"]["export"], {"path", "seconds", "skipped"}),
    }  # fmt: skip
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "ci.md").read_text()
    documented = guide.split("\n## Machine-readable output", 1)[1].split("\n## ", 1)[0]
    for where, (value, keys) in schema.items():
        assert set(value) == keys, where
        line = documented.split(where, 1)[1].split(";", 1)[0]
        assert keys <= set(re.findall(r"`([^`]+)`", line)), where
    # The order too: the typed results write what the dicts they replaced wrote.
    assert list(summary) == [
        "ok", "model", "out", "fused_operators", "fusion_note", "pytorch_fp32_metric", "engines",
        "repository", "stages", "notes",
    ]  # fmt: skip
    assert list(engine) == [
        "backend", "precision", "device", "compute_capability", "name", "path", "manifest",
        "report", "parity", "metric", "passed", "failures", "float_ops", "speed",
    ]  # fmt: skip
    assert summary["pytorch_fp32_metric"]["name"] == "stsb_spearman"
    assert Path(engine["path"]).is_file()
    assert engine["float_ops"] is None  # fp32: nothing quantized
    assert "%|" not in result.stderr  # --json: no progress bars unless --progress


@pytest.mark.e2e
def test_stage_commands_chain(tiny_embedding_model, tmp_path):
    common = ["--model", tiny_embedding_model, "--out", tmp_path, "--json"]
    for stage in ("export", "simplify", "fuse"):
        result = _invoke(stage, *common)
        assert result.exit_code == 0, result.output
        assert _last_json(result)["stage"] == stage
        assert len(result.stdout.strip().splitlines()) == 1  # nothing but the JSON line
    # onnxsim's own lines, captured and labelled.
    assert "[simplify] Checking 0/3..." in _invoke("simplify", *common, "--force").stderr
    built = _invoke("build", *common)
    assert built.exit_code == 0, built.output
    (engine,) = _last_json(built)["engines"]
    assert engine["stage"] == "build" and Path(engine["path"]) == cpu_engine_dir(tmp_path)
    result = _invoke("verify", *common, *QUICK)
    assert result.exit_code == 0 and _last_json(result)["ok"]
    strict = _invoke("verify", *common, *QUICK, "--max-abs-err", "0", "--force")
    assert strict.exit_code == 5
    assert "parity error" in strict.stderr and "max_abs_err" in strict.stderr
    assert _last_json(strict)["ok"] is False
    assert (cpu_engine_dir(tmp_path, "fp32", "verify") / "report.json").is_file()


@pytest.mark.e2e
def test_a_stage_given_another_model_than_out_was_exported_from_is_one_line(
    tiny_embedding_model, tmp_path
):
    for stage in ("export", "simplify"):
        assert _invoke(stage, "--model", tiny_embedding_model, "--out", tmp_path).exit_code == 0
    # Without --model the stages read the default model: fuse would check the tiny graph
    # against its operator counts, build would file the engine under its name.
    for stage in ("fuse", "calibrate", "build"):
        result = _invoke(stage, "--out", tmp_path)
        assert result.exit_code == 3, result.output
        assert f"exported from {tiny_embedding_model}, not from --model" in result.stderr
        assert f"pass --model {tiny_embedding_model}" in result.stderr
    assert not (tmp_path / "fuse").exists() and not (tmp_path / "engines").exists()
    assert _invoke("fuse", "--model", tiny_embedding_model, "--out", tmp_path).exit_code == 0


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        (lambda m, t: t / "missing", 3, "no such local folder"),
        (lambda m, t: (edit_config(m, model_type="t5"), m)[1], 4, "unsupported architecture"),
        (lambda m, t: (edit_config(m, auto_map={"AutoModel": "evil.M"}), m)[1], 4, "auto_map"),
    ],
)
def test_bad_models_exit_with_their_code(tiny_model_copy, tmp_path, setup, code, message):
    model = setup(tiny_model_copy, tmp_path)
    out = tmp_path / "out"
    result = _invoke("run", "--model", model, "--out", out, "--json")
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _last_json(result)["error"]["exit_code"] == code
    assert not out.exists() or not list(out.rglob("manifest.json"))


@pytest.mark.e2e
def test_sequence_longer_than_positions(tiny_embedding_model, tmp_path):
    result = _invoke(
        "run", "--model", tiny_embedding_model, "--out", tmp_path, "--max-length", "4096"
    )
    assert result.exit_code == 3
    assert "max_position_embeddings (128)" in result.stderr


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 100])
def test_corrupt_onnx_input(tiny_embedding_model, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    result = _invoke("simplify", "--input", bad, "--out", tmp_path / "out")
    assert result.exit_code == 3 and str(bad) in result.stderr
    assert not (tmp_path / "out" / "simplify" / "manifest.json").exists()


def test_stage_without_its_input_says_what_to_run(tmp_path):
    result = _invoke("build", "--out", tmp_path)
    assert result.exit_code == 8 and "run the stage that makes it first" in result.stderr


@pytest.mark.e2e
def test_truncated_artifact_is_detected(tiny_embedding_model, tmp_path):
    assert _invoke("export", "--model", tiny_embedding_model, "--out", tmp_path).exit_code == 0
    exported = tmp_path / "export" / "model.onnx"
    exported.write_bytes(exported.read_bytes()[:1000])
    result = _invoke("simplify", "--out", tmp_path)
    assert result.exit_code == 8 and "does not match the manifest" in result.stderr


def test_unwritable_output_folder(tiny_embedding_model, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file cannot be created by anyone
        out = tmp_path / "file"
        out.write_text("x")
        out = out / "sub"
    else:
        out = tmp_path / "ro"
        out.mkdir(mode=0o500)
    result = _invoke("export", "--model", tiny_embedding_model, "--out", out)
    assert result.exit_code == 3 and "output folder" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "dataset file not found"),
        (b"", "dataset file is empty"),
        (b"sentence\tlabel\nfine\t1\nbad \xc3\x28 bytes\t0\n", ":3: not valid UTF-8"),
    ],
)
def test_bad_parity_dataset(tiny_embedding_model, tmp_path, content, message):
    data = tmp_path / "parity.tsv"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    result = _invoke(
        "run", "--model", tiny_embedding_model, "--out", out, "--parity-data", data, *QUICK
    )
    assert result.exit_code == 3
    assert message in result.stderr and str(data) in result.stderr
    assert not list(out.glob("verify/*/*/manifest.json"))
    assert not (out / "run.json").exists()


@pytest.mark.e2e
def test_user_metric_dataset(tiny_embedding_model, tmp_path):
    data = tmp_path / "sts.tsv"
    rows = [
        "sentence1\tsentence2\tscore",
        "a cat sits\ta cat sat\t4.5",
        "a dog runs\tstocks fell\t0.2",
        "it rains\tit is raining\t4.8",
        "red car\tblue sea\t0.5",
    ]
    data.write_text("\n".join(rows) + "\n")
    result = _invoke(
        "run",
        "--model",
        tiny_embedding_model,
        "--out",
        tmp_path / "out",
        "--json",
        "--metric-data",
        data,
        "--max-metric-drop",
        "100",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(
        (cpu_engine_dir(tmp_path / "out", "fp32", "verify") / "report.json").read_text()
    )
    assert report["metric"]["examples"] == 4
    manifest = json.loads(
        (cpu_engine_dir(tmp_path / "out", "fp32", "verify") / "manifest.json").read_text()
    )
    assert manifest["inputs"]["data"]["metric"]["path"] == str(data)


def test_missing_input_file(tmp_path):
    result = _invoke("simplify", "--input", tmp_path / "absent.onnx", "--out", tmp_path / "out")
    assert result.exit_code == 3 and "absent.onnx: ONNX file not found" in result.stderr


@pytest.mark.e2e
def test_int8_stage_commands(tiny_embedding_model, tmp_path):
    common = ["--model", tiny_embedding_model, "--out", tmp_path, "--json"]
    for stage in ("export", "simplify"):
        assert _invoke(stage, *common).exit_code == 0
    calibrated = _invoke("calibrate", *common, "--method", "entropy", "--num-samples", "64")
    assert calibrated.exit_code == 0, calibrated.stderr
    results = _last_json(calibrated)["results"]
    assert results["method"] == "entropy" and results["used"] == 64
    assert "scales" not in results  # thousands of numbers: in scales.json and the manifest
    assert _invoke("build", *common, "--precision", "int8").exit_code == 0
    verified = _invoke("verify", *common, "--precision", "int8", *QUICK)
    assert verified.exit_code == 0, verified.stderr
    assert (cpu_engine_dir(tmp_path, "int8", "verify") / "report.json").is_file()
    assert _last_json(verified)["float_ops"] == {"float": 0, "total": 12}
    assert "float_ops: 0/12" in verified.stderr
    # Another --keep-float changes no range: the calibration reuses them, only Q/DQ moves.
    name = "/model/encoder/layer.0/intermediate/dense/MatMul"
    again = _invoke(
        "calibrate", *common, "--method", "entropy", "--num-samples", "64", "--keep-float", name
    )
    assert again.exit_code == 0, again.stderr
    assert _last_json(again)["results"]["ranges"] == "reused"
    assert _invoke("build", *common, "--precision", "int8").exit_code == 0
    verified = _invoke("verify", *common, "--precision", "int8", *QUICK)
    assert _last_json(verified)["float_ops"] == {"float": 1, "total": 12}
    other = _invoke("calibrate", *common, "--method", "minmax", "--num-samples", "64")
    assert _last_json(other)["results"]["ranges"] == "collected"  # another method: measured


@pytest.mark.e2e
def test_int8_run_that_needs_too_much_float_fails_in_one_line(tiny_embedding_model, tmp_path):
    result = _invoke(
        "run",
        *("--model", tiny_embedding_model, "--out", tmp_path, "--precision", "int8"),
        *("--num-samples", "64", "--metric-limit", "200", "--no-package"),
        *("--min-metric-retention", "2", "--json", "--progress"),
    )
    assert result.exit_code == 5, result.output
    # stdout is JSON only (the summary, then the error); bars and logs are on stderr.
    summary, error = (json.loads(line) for line in result.stdout.strip().splitlines())
    (engine,) = summary["engines"]
    assert engine["float_ops"] == {"float": 3, "total": 12} and not engine["passed"]
    assert (
        error["error"]["kind"] == "parity" and "still fails with 3/12" in error["error"]["message"]
    )
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bert-compile: parity error:") and "--fallback-max-float 0.25" in last
    # Every round says which limit failed, by how much, and what comes next.
    assert (
        "[fallback] round 1: stsb_spearman" in result.stderr and "(needs 200.0%)" in result.stderr
    )
    assert "keeping 1 more MatMul float (2/12)" in result.stderr
    for bar in ("int8 rounds", "calibrate", "sensitivity", "parity", "engine metric"):
        assert f"{bar}:" in result.stderr, bar


@pytest.mark.e2e
def test_calibrate_with_unknown_keep_float_name(tiny_embedding_model, tmp_path):
    common = ["--model", tiny_embedding_model, "--out", tmp_path]
    for stage in ("export", "simplify"):
        assert _invoke(stage, *common).exit_code == 0
    result = _invoke("calibrate", *common, "--keep-float", "no/such/MatMul")
    assert result.exit_code == 3 and "--keep-float names no quantizable MatMul" in result.stderr


@pytest.mark.e2e
def test_run_ends_with_a_repository_and_verify_repository_gates_it(tiny_embedding_model, tmp_path):
    common = ["--model", tiny_embedding_model, "--out", tmp_path, "--json", *QUICK]
    result = _invoke("run", *common)
    assert result.exit_code == 0, result.output
    repository = _last_json(result)["repository"]
    assert Path(repository["path"]) == tmp_path / "triton"
    assert sorted(repository["models"].values()) == ["engine", "ensemble", "tokenizer"]
    checked = _invoke("verify", *common, "--repository", repository["path"])
    assert checked.exit_code == 0, checked.output
    summary = _last_json(checked)
    assert summary["ok"] and [e["status"] for e in summary["engines"]] == ["passed"]

    config = Path(repository["path"]) / "tiny-embed-ort-cpu-fp32" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 64", "max_batch_size: 640"))
    tampered = _invoke("verify", *common, "--repository", repository["path"])
    assert tampered.exit_code == 8 and "config.pbtxt" in tampered.stderr
    assert _last_json(tampered)["error"]["kind"] == "artifact"

    repackaged = _invoke("package", *common[: -len(QUICK)], "--force")
    assert repackaged.exit_code == 0, repackaged.output
    assert _last_json(repackaged)["skipped"] is False


def test_package_without_engines_says_what_to_run(tiny_embedding_model, tmp_path):
    result = _invoke("package", "--model", tiny_embedding_model, "--out", tmp_path)
    assert result.exit_code == 3 and "no engines to package" in result.stderr
    assert not (tmp_path / "triton").exists()


def test_verify_takes_an_engine_or_a_repository(tiny_embedding_model, tmp_path):
    result = _invoke(
        "verify",
        "--model",
        tiny_embedding_model,
        "--out",
        tmp_path,
        "--engine",
        tmp_path,
        "--repository",
        tmp_path,
    )
    assert result.exit_code == 2 and "exclude each other" in result.output


@pytest.mark.parametrize(
    ("force", "advice"), [(False, "again to resume"), (True, "again without --force to resume")]
)
def test_the_interrupt_message_says_how_to_resume(
    tiny_embedding_model, tmp_path, monkeypatch, force, advice
):
    from bert_compiler.cli import stage_commands as cli_module
    from bert_compiler.core.errors import Interrupted

    def interrupted(**_kwargs):
        raise Interrupted("SIGINT", 130)

    monkeypatch.setattr(cli_module, "export", interrupted)
    argv = ["export", "--model", tiny_embedding_model, "--out", tmp_path / "out"]
    result = _invoke(*argv, *(["--force"] if force else []))
    assert result.exit_code == 130 and f"run the command {advice}" in result.stderr


def test_the_cli_reference_is_the_one_the_option_groups_make():
    """docs/cli.md is generated from the commands' option groups
    (scripts/cli_reference.py): a flag added, removed or re-described without regenerating it
    fails here, naming the command that fixes it."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "cli_reference.py"
    checked = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stderr
