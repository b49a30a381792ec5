"""Pipeline config files (TOML) and doctor; property-based tests of the config and dataset
parsers: whatever the bytes, a result or one InputError, never a traceback."""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import replace
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bert_compiler.calibration import datasets
from bert_compiler.cli.app import VERIFY
from bert_compiler.cli.commands import cli
from bert_compiler.cli.config import command_defaults
from bert_compiler.cli.doctor import Readiness, diagnose
from bert_compiler.core.errors import InputError
from bert_compiler.core.targets import Environment, Gpu
from bert_compiler.runtime.parity import DEFAULT_MIN_METRIC_RETENTION, DEFAULT_TOLERANCES
from bert_compiler.stages.verify import VerifySpec
from tests.conftest import cpu_engine_dir

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "pipeline.toml"


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _defaults(path: Path, command: str = "run") -> dict:
    command_obj = cli.commands[command]
    with click.Context(command_obj) as ctx:
        return command_defaults(path, command_obj, cli.commands, ctx)


def _sample_value(option: click.Option):
    """A valid value of the option's type, as TOML gives it."""
    if option.is_flag:
        return True
    kind = option.type
    if isinstance(kind, click.Choice):
        value = kind.choices[0]
    elif isinstance(kind, (click.IntRange, click.FloatRange)):
        value = kind.min if kind.min is not None else 1
    elif isinstance(kind, click.types.IntParamType):
        value = 1
    elif isinstance(kind, click.types.FloatParamType):
        value = 0.5
    else:
        value = "default"
    return [value] if option.multiple else value


def test_every_option_of_every_command_is_a_key():
    for name, command in cli.commands.items():
        for option in command.params:
            if not isinstance(option, click.Option) or option.name in ("help", "config"):
                continue
            long = next(o for o in option.opts if o.startswith("--"))[2:]
            with tempfile.TemporaryDirectory() as folder:
                config = Path(folder) / "c.toml"
                config.write_text(f"[{name}]\n{long} = {json.dumps(_sample_value(option))}\n")
                assert option.name in _defaults(config, name), (name, long)


def test_example_config_is_valid_for_run_and_package():
    run = _defaults(EXAMPLE, "run")
    assert run["precisions"] == ["fp32", "int8"] and run["target"] == "auto"
    assert Path(run["out"]).is_absolute()  # relative to the file's folder
    assert _defaults(EXAMPLE, "package")["max_batch_size"] == 64


def _verify_spec(*args, command: str = "run") -> VerifySpec:
    """The VerifySpec ``command`` would build from ``args`` (config files applied)."""
    parent = click.Context(cli)
    with cli.commands[command].make_context(command, [str(a) for a in args], parent=parent) as ctx:
        return VERIFY.parse(ctx.params)


def test_example_config_gates_int8_by_int8_limits_and_fp32_as_written():
    spec = _verify_spec("--config", EXAMPLE)
    int8 = replace(spec, precision="int8")
    tolerance, default = int8.resolved_tolerance(), DEFAULT_TOLERANCES["int8"]
    # The int8 defaults or looser: the fp32 limits of the same file must not reach INT8.
    assert tolerance.max_abs_err >= default.max_abs_err
    assert tolerance.rel_l2_err >= default.rel_l2_err
    assert tolerance.min_cosine <= default.min_cosine
    assert int8.resolved_metric_retention() <= DEFAULT_MIN_METRIC_RETENTION["int8"]
    assert int8.resolved_metric_drop() is None  # int8 has no absolute drop limit by default
    fp32 = replace(spec, precision="fp32")
    assert fp32.resolved_tolerance() == replace(
        DEFAULT_TOLERANCES["fp32"], max_abs_err=1e-3, min_cosine=0.9999
    )
    assert fp32.resolved_metric_drop() == 0.05


def test_gate_precedence_flag_then_precision_table_then_file(tmp_path):
    config = tmp_path / "gates.toml"
    config.write_text(
        "min-cosine = 0.5\nmax-metric-drop = 3\n"
        "[run]\nmax-abs-err = 0.25\n"
        "[int8]\nmin-cosine = 0.8\nmax-abs-err = 2\n"
        "[fp16]\nmin-metric-retention = 0.9\n"
    )
    spec = _verify_spec("--config", config)
    int8, fp16, fp32 = (replace(spec, precision=p) for p in ("int8", "fp16", "fp32"))
    assert (int8.resolved_tolerance().min_cosine, int8.resolved_tolerance().max_abs_err) == (0.8, 2)
    assert (fp32.resolved_tolerance().min_cosine, fp32.resolved_tolerance().max_abs_err) == (
        0.5,
        0.25,
    )
    assert fp16.resolved_metric_retention() == 0.9 and fp32.resolved_metric_retention() is None
    assert int8.resolved_metric_drop() == 3  # the file's top level: every precision
    # A flag on the command line applies to every precision, tables included.
    flagged = _verify_spec("--config", config, "--min-cosine", 0.7)
    for precision in ("int8", "fp16", "fp32"):
        assert replace(flagged, precision=precision).resolved_tolerance().min_cosine == 0.7
    assert replace(flagged, precision="int8").resolved_tolerance().max_abs_err == 2
    # verify reads the same tables.
    verify = _verify_spec("--config", config, command="verify")
    assert replace(verify, precision="int8").resolved_tolerance().min_cosine == 0.8


@pytest.mark.e2e
def test_config_drives_a_run_and_flags_win(tiny_embedding_model, tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        f'model = "{tiny_embedding_model}"\n'
        'out = "out"\n'
        "metric-limit = 100\n"
        "metric_gate = false\n"
        "threads = 1\n"
        "[run]\n"
        'precision = "fp32"\n'
        "package = false\n"
    )
    result = _invoke("run", "--config", config, "--threads", 2, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(summary["out"]) == tmp_path / "out" and summary["repository"] is None
    manifest = json.loads((cpu_engine_dir(tmp_path / "out") / "manifest.json").read_text())
    assert manifest["spec"]["session"]["intra_op_num_threads"] == 2  # the flag beat the file


@pytest.mark.e2e
def test_example_config_builds_a_real_int8_engine(tiny_embedding_model, tmp_path):
    result = _invoke(
        "run",
        *("--config", EXAMPLE, "--model", tiny_embedding_model, "--out", tmp_path / "out"),
        # Here: CPU engines, the tiny model's length, and no metric gate (a random model's
        # metric means nothing, conftest.py).
        *("--target", "cpu", "--no-package", "--no-metric-gate", "--metric-limit", "100"),
        *("--num-samples", "64", "--max-length", "128", "--json"),
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    engines = {e["precision"]: e for e in summary["engines"]}
    assert set(engines) == {"fp32", "int8"} and summary["ok"]
    int8 = engines["int8"]
    assert int8["passed"] and int8["float_ops"]["total"] == 12
    assert int8["float_ops"]["float"] <= 0.25 * 12  # a real INT8 engine
    # Each engine was judged by its own precision's gates from the file.
    for precision, min_cosine, max_abs_err in (("fp32", 0.9999, 1e-3), ("int8", 0.90, None)):
        report = json.loads(
            Path(engines[precision]["report"]).with_name("manifest.json").read_text()
        )
        tolerance = report["spec"]["resolved_tolerance"]
        assert tolerance["min_cosine"] == min_cosine
        assert max_abs_err is None or tolerance["max_abs_err"] == max_abs_err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('threads = "many"', "threads = 'many': Invalid value for '--threads'"),
        ("thread = 2", "unknown key 'thread'"),
        ("[rnu]\nforce = true", "table [rnu] is not a command"),
        ("[export]\nthreads = 2", "[export] threads: `bert-compile export` has no such option"),
        ('precision = ["fp64"]', "'fp64' is not one of"),
        ('force = "yes"', "expected true or false"),
        ("threads = true", "expected integer, not true/false"),
        ('target = ["cpu", "cuda"]', "takes one value, not a list"),
        ("max-abs-err = {a = 1}", "max-abs-err: expected a value, not a table"),
        ('precision = [["fp32"]]', "expected a single value"),
        ("a = [", "not valid TOML"),
        ("[int8]\nthreads = 2", "[int8] threads: a precision table takes only the gates"),
        ('[int8]\nmin-cosine = "high"', "[int8] min-cosine = 'high': Invalid value"),
        ("[run.int8]\nmin-cosine = 0.9", "[run.int8]: precision tables are top-level ([int8])"),
        ("[int4]\nmin-cosine = 0.9", "table [int4] is not a command or a precision"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    result = _invoke("run", "--config", config, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert message in result.stderr and str(config) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "export").exists()


def test_config_file_problems(tmp_path):
    assert _invoke("run", "--config", tmp_path / "none.toml").exit_code == 3
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe threads = 1")
    result = _invoke("run", "--config", binary)
    assert result.exit_code == 3 and "not UTF-8" in result.stderr


_KEYS = st.sampled_from(
    ["threads", "precision", "target", "force", "max-abs-err", "model", "profile", "json", "x"]
)
_SCALARS = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(string.printable, max_size=20),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3), st.dictionaries(_KEYS, _SCALARS))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value > 0 else "-inf")
            if abs(value) == float("inf")
            else repr(value)
        )
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(v)}' for k, v in value.items()) + "}"
    return str(value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_config_parser_returns_defaults_or_one_input_error(table):
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "c.toml"
        config.write_text("\n".join(f'"{k}" = {_toml_value(v)}' for k, v in table.items()))
        try:
            defaults = _defaults(config)
        except InputError as err:
            assert str(config) in str(err)
        else:
            assert set(defaults) <= {p.name for p in cli.commands["run"].params}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([".tsv", ".txt", ".jsonl"]))
def test_dataset_readers_return_texts_or_one_input_error(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(data)
        try:
            texts = datasets.load_texts(path)
        except InputError as err:
            assert str(path) in str(err)
        else:
            assert texts and all(isinstance(t, str) and t == t.strip() and t for t in texts)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.text(max_size=12), min_size=1, max_size=4).map("\t".join), st.binary(max_size=200)
)
def test_tsv_reader_with_a_header_and_random_rows(header, body):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.tsv"
        path.write_bytes(header.encode("utf-8", "surrogatepass") + b"\n" + body)
        try:
            rows = datasets.read_tsv(path, ("sentence",))
        except InputError as err:
            assert str(path) in str(err)
        else:
            assert rows and all(isinstance(r["sentence"], str) for r in rows)


def test_doctor_on_this_machine(tmp_path):
    result = _invoke("doctor", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["targets"]["cpu"]["ready"] and report["package"]["ready"]
    assert report["disk"]["path"] == str(tmp_path) and report["disk"]["writable"]
    if not report["gpus"]:
        assert "no NVIDIA GPU found" in report["targets"]["cuda"]["missing"]
        strict = _invoke("doctor", "--out", tmp_path, "--target", "tensorrt")
        assert strict.exit_code == 6 and "no NVIDIA GPU found" in strict.stderr


def test_doctor_names_what_each_target_lacks(tmp_path):
    h100 = Gpu(0, "NVIDIA H100 80GB HBM3", "9.0", 81559, "580.159.04")
    env = Environment(
        gpus=(h100,),
        tensorrt=None,
        tensorrt_problem="the tensorrt package is not installed",
        onnxruntime="1.31.1",
        ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
    )
    report = diagnose(env, tmp_path).to_json()
    assert report["targets"]["cuda"] == {"ready": True, "builds": ["onnxruntime-cuda-sm90-fp16"]}
    assert "tensorrt package is not installed" in report["targets"]["tensorrt"]["missing"]
    assert report["targets"]["cpu"]["ready"] and report["ok"]
    no_ort = diagnose(Environment(), tmp_path)
    assert no_ort.targets["cpu"] == Readiness(False, missing="onnxruntime is not installed")
    assert not no_ort.ok


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_non_finite_number_for_an_integer_option_is_one_input_error(tmp_path, value):
    # Found by the property test below: click converts floats to int with int().
    config = tmp_path / "c.toml"
    config.write_text(f"threads = {value}\n")
    with pytest.raises(InputError, match="threads"):
        _defaults(config)
