"""`bert-compile calibrate --sweep` on a tiny model: one row per grid point, both splits named,
bad axis values one line. The tiny model's metrics and speeds mean nothing; the table on the
default model is in docs/benchmarks.md."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from bert_compiler.calibration import datasets
from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import InputError
from bert_compiler.stages.sweep import PEERS

pytestmark = pytest.mark.e2e


def test_sweep_prints_one_row_per_grid_point(tiny_embedding_model, tmp_path):
    out = tmp_path / "out"
    args = ["calibrate", "--sweep", "--model", str(tiny_embedding_model), "--out", str(out)]
    grid = [
        *("--sweep-methods", "percentile:99.99,minmax", "--sweep-dynamic", "all"),
        *("--sweep-weight-granularity", "channel,tensor"),
    ]
    small = ["--sweep-pairs", "20", "--sweep-sentences", "32", "--sweep-rounds", "1"]
    result = CliRunner().invoke(cli, [*args, *grid, *small, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    runners = [r["runner"] for r in report["rows"]]
    assert runners[0] == "torch fp32" and [label for label, _, _ in PEERS] == runners[1:3]
    engines = [r for r in report["rows"] if "method" in r]
    assert len(engines) == len(report["rows"]) - 3
    assert sorted((r["method"], r["weight_granularity"], r["dynamic"]) for r in engines) == sorted(
        (m, g, "all") for m in ("percentile:99.99", "minmax") for g in ("channel", "tensor")
    )
    assert report["splits"]["selection"]["role"].startswith("choices")
    assert report["splits"]["dev"]["role"] == "reported only"
    torch_row = report["rows"][0]
    assert all(math.isfinite(torch_row[split]) for split in ("selection", "dev"))
    for row in report["rows"]:
        assert row["vs_torch"] > 0
    for row in engines:
        # Every INT8 variant tracks float closely (tests/closeness.py): its Spearman on each
        # split is the float model's to within a few points of rank noise over 20 pairs.
        for split in ("selection", "dev"):
            assert abs(row[split] - torch_row[split]) <= 5, (row, torch_row)
    assert json.loads((out / "sweep" / "sweep.json").read_text())["rows"] == report["rows"]
    table = result.stderr
    assert "selection" in table and "reported only" in table
    assert sum(line.startswith(("percentile", "minmax")) for line in table.splitlines()) == 4


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--sweep-methods", "percentile:101", "percentile:P"),
        ("--sweep-methods", "median", "METHOD"),
        ("--sweep-dynamic", "some", "expected comma-separated values"),
        ("--sweep-weight-granularity", "row", "expected comma-separated values"),
        ("--sweep-kept-float", "-1", "counts >= 0"),
        ("--sweep-smooth-alpha", "2", "alpha in [0, 1]"),
    ],
)
def test_bad_sweep_axes_are_one_line(tiny_embedding_model, tmp_path, flag, value, expected):
    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            "--sweep",
            "--model",
            str(tiny_embedding_model),
            "--out",
            str(tmp_path / "o"),
            flag,
            value,
        ],
    )
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_sweep_of_a_classifier_says_what_it_scores(tiny_classifier_model, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["calibrate", "--sweep", "--model", str(tiny_classifier_model), "--out", str(tmp_path)],
    )
    assert result.exit_code == 3, result.output
    assert "sentence embeddings on STS-B" in result.stderr


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("missing.tsv", "no such file"),
        ("dev-copy.tsv", "are STS-B dev pairs, which the sweep only reports"),
    ],
)
def test_sweep_refuses_a_selection_split_that_is_not_one(
    tiny_embedding_model, tmp_path, selection, expected
):
    (tmp_path / "dev-copy.tsv").write_bytes(datasets.STSB_DEV.read_bytes())
    out = tmp_path / "o"
    args = ["calibrate", "--sweep", "--model", str(tiny_embedding_model), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--sweep-selection-data", str(tmp_path / selection)])
    assert result.exit_code == 3, result.output
    assert expected in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "sweep").exists()  # refused before any engine was built


def test_keeping_more_matmuls_in_float_than_the_graph_has_is_one_line(
    tiny_embedding_model, tmp_path
):
    """A grid point with every MatMul in float would be labelled with a count it does not
    keep: refused once the graph is read, before any engine is built."""
    out = tmp_path / "o"
    args = ["calibrate", "--sweep", "--model", str(tiny_embedding_model), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--no-sweep-peers", "--sweep-kept-float", "0,99"])
    assert result.exit_code == 3, result.output
    assert "--sweep-kept-float 99: tiny-embed has 12 quantizable MatMuls" in result.stderr
    assert "Traceback" not in result.output and not (out / "sweep").exists()


@pytest.mark.parametrize(
    ("flag", "value", "parsed"),
    [
        ("--sweep-kept-float", "0,2,00,2", {"kept_float": (0, 2)}),
        ("--sweep-smooth-alpha", "-0,0.0,none,0.5,none", {"smooth_alpha": (0.0, None, 0.5)}),
        (
            "--sweep-methods",
            "percentile:99.99,percentile:99.990,minmax",
            {"methods": ("percentile:99.99", "minmax")},
        ),
    ],
)
def test_a_grid_point_given_twice_is_swept_once(
    tiny_embedding_model, flag, value, parsed, monkeypatch, tmp_path
):
    """Two spellings of one value (0 and 00, -0 and 0.0) are one grid point, not two rows."""
    from bert_compiler.cli import stage_commands as cli_module

    seen = {}

    def record(*, spec, **_kwargs):
        seen["spec"] = spec
        raise InputError("recorded")

    monkeypatch.setattr(cli_module, "run_sweep", record)
    model = str(tiny_embedding_model)
    argv = ["calibrate", "--sweep", "--model", model, "--out", str(tmp_path / "o"), flag, value]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 3 and "recorded" in result.stderr, result.output
    for name, expected in parsed.items():
        assert getattr(seen["spec"], name) == expected
        assert [str(v) for v in getattr(seen["spec"], name)] == [str(v) for v in expected]


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--sweep-methods", ","), ("--sweep-smooth-alpha", ","), ("--sweep-formats", "int4")],
)
def test_a_bad_sweep_list_names_its_flag(tiny_embedding_model, flag, value, tmp_path):
    model = str(tiny_embedding_model)
    argv = ["calibrate", "--sweep", "--model", model, "--out", str(tmp_path / "o"), flag, value]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}':" in result.output and "Traceback" not in result.output
