"""Gates that cannot pass on NaN: every limit is a number in its range (NaN is none), parity
fails against a NaN limit, the metric gate fails on a NaN or infinite metric, and --json stays
strict JSON when a number is not finite."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import click
import numpy as np
import pytest

from bert_compiler.cli.app import strict_json
from bert_compiler.cli.commands import cli
from bert_compiler.cli.options import VerifyOptions
from bert_compiler.core.errors import InputError
from bert_compiler.runtime.parity import DEFAULT_TOLERANCES, OutputParity, Tolerance
from bert_compiler.stages.verify import MetricResult, VerifySpec, metric_gate_failures

NAN, INF = math.nan, math.inf


def _verify_spec(*args) -> VerifySpec:
    parent = click.Context(cli)
    with cli.commands["verify"].make_context(
        "verify", [str(a) for a in args], parent=parent
    ) as ctx:
        return VerifyOptions().parse(ctx.params)


def _identical_parity() -> OutputParity:
    parity = OutputParity("sentence_embedding")
    rows = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    parity.update(rows, rows.copy(), None)
    return parity


@pytest.mark.parametrize("limit", ["max_abs_err", "rel_l2_err", "min_cosine"])
def test_parity_fails_against_a_nan_limit(limit):
    parity = _identical_parity()
    assert parity.failures(DEFAULT_TOLERANCES["fp32"]) == []
    tolerance = replace(DEFAULT_TOLERANCES["fp32"], **{limit: NAN})
    assert parity.failures(tolerance) == [f"{limit} limit is NaN: no limit"]
    # Infinity is a limit (INT8's max_abs_err: none), and identical outputs pass it.
    assert parity.failures(Tolerance(max_abs_err=INF, rel_l2_err=INF, min_cosine=-1.0)) == []


def test_parity_fails_on_engine_outputs_that_are_not_finite():
    parity = OutputParity("sentence_embedding")
    rows = np.ones((2, 4), np.float32)
    bad = rows.copy()
    bad[0, 0], bad[1, 1] = NAN, INF
    parity.update(rows, bad, None)
    assert parity.failures(DEFAULT_TOLERANCES["int8"])[0] == "2 NaN/Inf values"


@pytest.mark.parametrize(
    ("engine", "reference", "failing"),
    [(NAN, 80.0, "the engine"), (80.0, NAN, "PyTorch"), (INF, 80.0, "the engine"),
     (-INF, 80.0, "the engine"), (80.0, INF, "PyTorch")],
)  # fmt: skip
def test_metric_gate_fails_on_a_metric_that_is_not_finite(engine, reference, failing):
    for precision in ("fp32", "fp16", "int8", "fp8"):
        spec = VerifySpec(precision=precision)
        failures = metric_gate_failures(
            MetricResult("stsb_spearman", reference, 10),
            MetricResult("stsb_spearman", engine, 10),
            spec,
        )
        assert len(failures) == 1 and failures[0].startswith(f"{failing}'s stsb_spearman is ")
        assert "cannot be judged" in failures[0]
    good = metric_gate_failures(
        MetricResult("stsb_spearman", 80.0, 10), MetricResult("stsb_spearman", 80.0, 10), spec
    )
    assert good == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-abs-err", "nan", "--max-abs-err nan: expected a number from 0 to inf"),
        ("--max-rel-l2", "nan", "--max-rel-l2 nan: expected a number from 0 to inf"),
        ("--min-cosine", "nan", "--min-cosine nan: expected a number from -1 to 1"),
        ("--min-cosine", "1.5", "--min-cosine 1.5: expected a number from -1 to 1"),
        ("--max-abs-err", "-1", "--max-abs-err -1.0: expected a number from 0 to inf"),
        ("--max-metric-drop", "nan", "--max-metric-drop nan: expected a number from -inf to inf"),
        ("--min-metric-retention", "-0.5", "--min-metric-retention -0.5: expected a number"),
        ("--min-metric-retention", "nan", "--min-metric-retention nan: expected a number from 0"),
    ],
)
def test_a_limit_that_is_not_a_number_in_range_is_refused(flag, value, message):
    with pytest.raises(InputError, match="^" + message.replace("(", r"\(")):
        _verify_spec(flag, value)


def test_an_unlimited_max_abs_err_is_a_limit():
    assert _verify_spec("--max-abs-err", "inf").resolved_tolerance().max_abs_err == INF


def test_a_nan_limit_in_a_config_precision_table_is_refused(tmp_path):
    config = tmp_path / "gates.toml"
    config.write_text("[int8]\nmin-cosine = nan\n")  # TOML has nan
    with pytest.raises(InputError, match=r"^--min-cosine \(\[int8\] table\) nan: expected"):
        _verify_spec("--config", config)


def test_the_cli_refuses_a_nan_tolerance_in_one_line(tmp_path):
    """Before any stage runs: nothing is written."""
    from click.testing import CliRunner

    out = tmp_path / "out"
    args = ["run", "--model", "default", "--out", str(out), "--max-abs-err", "nan"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == InputError.exit_code, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        "bert-compile: input error: --max-abs-err nan: expected a number from 0 to inf"
    ]
    assert not out.exists()


def test_metric_limit_zero_is_refused(tmp_path):
    from click.testing import CliRunner

    result = CliRunner().invoke(
        cli, ["verify", "--model", "default", "--out", str(tmp_path), "--metric-limit", "0"]
    )
    assert result.exit_code == 2 and "--metric-limit" in result.output


def test_json_output_is_strict_when_a_number_is_not_finite():
    summary = {"metric": {"value": NAN}, "tolerance": {"max_abs_err": INF}, "rows": [1.5, -INF]}

    def refuse(constant):
        raise ValueError(f"bare {constant} in the JSON")

    parsed = json.loads(strict_json(summary), parse_constant=refuse)
    assert parsed == {"metric": {"value": None}, "tolerance": {"max_abs_err": None},
                      "rows": [1.5, None]}  # fmt: skip
