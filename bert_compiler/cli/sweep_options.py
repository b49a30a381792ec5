"""The calibration sweep's option group (calibrate --sweep): the grid of INT8 settings tried on
the selection split -> SweepSpec."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from bert_compiler.calibration.qdq import (
    INT8,
    QUANTIZED_FORMATS,
    WEIGHT_GRANULARITIES,
)
from bert_compiler.calibration.ranges import METHODS
from bert_compiler.cli.option_group import (
    MAX_LISTED_COUNT,
    Decorator,
    OptionGroup,
    Values,
    count_in_range,
    default_of,
    given,
    listed,
)
from bert_compiler.core.errors import InputError
from bert_compiler.engines.ort_int8 import DYNAMIC_SCOPES
from bert_compiler.stages.sweep import SweepSpec

log = logging.getLogger("bert_compile")


def _method_list(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    chosen: dict[tuple[str, float | None], str] = {}
    for item in items:
        method, _, percentile = item.partition(":")
        usable = method in METHODS and (
            not percentile
            or (method == "percentile" and _is_number(percentile) and 0 < float(percentile) <= 100)
        )
        if not usable:
            raise click.BadParameter(
                f"{item!r}: expected METHOD or percentile:P with METHOD one of "
                f"{', '.join(METHODS)} and 0 < P <= 100, e.g. percentile:99.99"
            )
        # percentile:99.99 and percentile:99.990 are one grid point: the first spelling names it.
        chosen.setdefault((method, float(percentile) if percentile else None), item)
    if not chosen:
        raise click.BadParameter("expected at least one method")
    return tuple(chosen.values())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _choice_list(text: str, choices: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(i.strip() for i in text.split(",") if i.strip()))
    unknown = [i for i in items if i not in choices]
    if unknown or not items:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated values of {', '.join(choices)}"
        )
    return items


def _alpha_list(text: str) -> tuple[float | None, ...]:
    alphas: list[float | None] = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        if item == "none":
            alphas.append(None)
        elif _is_number(item) and 0 <= float(item) <= 1:
            alphas.append(float(item) + 0.0)  # -0 is 0
        else:
            raise click.BadParameter(f"{item!r}: expected 'none' or an alpha in [0, 1], e.g. 0.5")
    if not alphas:
        raise click.BadParameter("expected at least one alpha (or none)")
    return tuple(dict.fromkeys(alphas))


def _count_list(text: str) -> tuple[int, ...]:
    items = tuple(count_in_range(i, 0, MAX_LISTED_COUNT) for i in text.split(",") if i.strip())
    if not items or None in items:
        raise click.BadParameter(f"{text!r}: expected comma-separated counts >= 0, e.g. 0,2")
    return tuple(dict.fromkeys(items))  # type: ignore[arg-type]  # None was refused above


class SweepOptions(OptionGroup):
    """calibrate --sweep: the INT8 method table's grid and scoring -> SweepSpec (or None)."""

    def options(self) -> list[Decorator]:
        return [
            *_grid_options(),
            *_scoring_options(),
        ]

    # The sweep's own settings, read only with --sweep.
    SWEEP_ONLY = (
        "sweep_methods",
        "sweep_dynamic",
        "sweep_weight_granularity",
        "sweep_formats",
        "sweep_kept_float",
        "sweep_smooth_alpha",
        "sweep_pairs",
        "sweep_selection_data",
        "sweep_sentences",
        "sweep_rounds",
        "sweep_threads",
        "sweep_peers",
    )
    # What calibrate reads without --sweep, and the sweep's flag for it (None: the sweep
    # calibrates on the bundled calibration sentences at the model's maximum length, its own
    # float graph).
    CALIBRATE_ONLY = {
        "method": "--sweep-methods",
        "percentile": "--sweep-methods",
        "smooth_alpha": "--sweep-smooth-alpha",
        "weight_granularity": "--sweep-weight-granularity",
        "quantized_format": "--sweep-formats",
        "keep_float": "--sweep-kept-float",
        "quantize_op": None,
        "num_samples": None,
        "min_samples": None,
        "calibration_data": None,
        "text_column": None,
        "pair_column": None,
        "max_length": None,
        "input_path": None,
    }

    def parse(self, values: Values) -> SweepSpec | None:
        """The sweep's spec with --sweep (None without it).

        Raises:
            InputError: a sweep flag without --sweep, or with it a calibrate flag the sweep
                does not read (either would be silently ignored).
        """
        if not values["sweep"]:
            stray = given(*self.SWEEP_ONLY)
            if stray:
                raise InputError(
                    f"{', '.join(stray)}: only read by calibrate --sweep; add --sweep, or drop "
                    "them to calibrate"
                )
            return None
        ignored = given(*self.CALIBRATE_ONLY)
        if ignored:
            instead = sorted(
                {flag for name, flag in self.CALIBRATE_ONLY.items() if flag and given(name)}
            )
            hint = (
                f"use {', '.join(instead)} for the grid, or drop them" if instead else "drop them"
            )
            raise InputError(
                f"{', '.join(ignored)}: calibrate --sweep does not read them (it exports the "
                f"model and calibrates the bundled calibration sentences per grid point); {hint}"
            )
        formats = listed(
            "--sweep-formats", _choice_list, values["sweep_formats"], QUANTIZED_FORMATS
        )
        if INT8.name not in formats and given("sweep_dynamic"):
            raise InputError(
                f"--sweep-dynamic: its axis is the CPU INT8 engine's and --sweep-formats "
                f"{','.join(formats)} sweeps no INT8 rows; add int8 to --sweep-formats or drop "
                "--sweep-dynamic"
            )
        return SweepSpec(
            methods=listed("--sweep-methods", _method_list, values["sweep_methods"]),
            dynamic=listed(
                "--sweep-dynamic", _choice_list, values["sweep_dynamic"], DYNAMIC_SCOPES
            ),
            kept_float=listed("--sweep-kept-float", _count_list, values["sweep_kept_float"]),
            formats=formats,
            weight_granularity=listed(
                "--sweep-weight-granularity",
                _choice_list,
                values["sweep_weight_granularity"],
                WEIGHT_GRANULARITIES,
            ),
            smooth_alpha=listed("--sweep-smooth-alpha", _alpha_list, values["sweep_smooth_alpha"]),
            pairs=values["sweep_pairs"],
            sentences=values["sweep_sentences"],
            rounds=values["sweep_rounds"],
            threads=values["sweep_threads"],
            selection_data=values["sweep_selection_data"],
            peers=values["sweep_peers"],
        )


def _grid_options() -> list[Decorator]:
    """--sweep, and the grid of INT8 settings it tries."""
    return [
        click.option(
            "--sweep",
            is_flag=True,
            help="Instead of calibrating: build one CPU INT8 engine per grid point and print "
            "the method table (selection-split metric, dev metric reported only, speed vs "
            "PyTorch fp32); results in OUT/sweep/sweep.json.",
        ),
        click.option(
            "--sweep-methods",
            default=",".join(default_of(SweepSpec, "methods")),
            show_default=True,
            help="Comma-separated METHOD or percentile:P.",
        ),
        click.option(
            "--sweep-dynamic",
            default=",".join(default_of(SweepSpec, "dynamic")),
            show_default=True,
            help=f"Comma-separated CPU INT8 dynamic scopes ({', '.join(DYNAMIC_SCOPES)}).",
        ),
        click.option(
            "--sweep-weight-granularity",
            default=",".join(default_of(SweepSpec, "weight_granularity")),
            show_default=True,
            help=f"Comma-separated weight scales ({', '.join(WEIGHT_GRANULARITIES)}).",
        ),
        click.option(
            "--sweep-formats",
            default=",".join(default_of(SweepSpec, "formats")),
            show_default=True,
            help=f"Comma-separated quantized types ({', '.join(QUANTIZED_FORMATS)}); fp8 rows "
            "score the fp8 Q/DQ graph as written on the CPU (no speed: TensorRT runs it).",
        ),
        click.option(
            "--sweep-kept-float",
            default=",".join(str(k) for k in default_of(SweepSpec, "kept_float")),
            show_default=True,
            help="Comma-separated counts of the most sensitive MatMuls kept in float.",
        ),
        click.option(
            "--sweep-smooth-alpha",
            default=",".join(
                "none" if a is None else str(a) for a in default_of(SweepSpec, "smooth_alpha")
            ),
            show_default=True,
            help="Comma-separated SmoothQuant alphas, or none.",
        ),
    ]


def _scoring_options() -> list[Decorator]:
    """How each grid point is scored and timed, and beside which peer."""
    return [
        click.option(
            "--sweep-pairs",
            type=click.IntRange(1, None),
            default=default_of(SweepSpec, "pairs"),
            show_default=True,
            help="STS-B pairs scored per split (every k-th pair).",
        ),
        click.option(
            "--sweep-selection-data",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="STS-B TSV scored as the selection split (default: the bundled "
            "stsb-selection.tsv).",
        ),
        click.option(
            "--sweep-sentences",
            type=click.IntRange(1, None),
            default=default_of(SweepSpec, "sentences"),
            show_default=True,
            help="Selection sentences per timed pass (batches of 32).",
        ),
        click.option(
            "--sweep-rounds",
            type=click.IntRange(1, 100),
            default=default_of(SweepSpec, "rounds"),
            show_default=True,
            help="Timed passes per runner, interleaved; the median is reported.",
        ),
        click.option(
            "--sweep-threads",
            type=click.IntRange(1, 1024),
            default=default_of(SweepSpec, "threads"),
            show_default=True,
            help="ONNX Runtime and PyTorch threads.",
        ),
        click.option(
            "--sweep-peers/--no-sweep-peers",
            default=default_of(SweepSpec, "peers"),
            show_default=True,
            help="Also score and time ORT's dynamic INT8 quantization.",
        ),
    ]
