"""calibrate --sweep's results: typed rows, the table the CLI prints and OUT/sweep/sweep.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_compiler.calibration import datasets
from bert_compiler.core.artifacts import atomic_write_text

RESULTS_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepPoint:
    """The grid point of an engine's row (peers and PyTorch have none)."""

    format: str
    method: str
    smooth_alpha: float | None
    dynamic: str | None
    kept_float: int
    weight_granularity: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "method": self.method,
            "smooth_alpha": self.smooth_alpha,
            "dynamic": self.dynamic,
            "kept_float": self.kept_float,
            "weight_granularity": self.weight_granularity,
        }


@dataclass(frozen=True)
class SweepRow:
    """One runner's metric on each split, its drop from PyTorch fp32 (the first row), and its
    speed against PyTorch (None: scored only)."""

    runner: str
    point: SweepPoint | None
    selection: float | None
    dev: float | None
    selection_drop: float | None
    dev_drop: float | None
    vs_torch: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            **(self.point.to_json() if self.point else {}),
            "selection": self.selection,
            "dev": self.dev,
            "vs_torch": self.vs_torch,
            "selection_drop": self.selection_drop,
            "dev_drop": self.dev_drop,
        }


@dataclass(frozen=True)
class SweepReport:
    """The method table; ``to_json`` is OUT/sweep/sweep.json."""

    model: str
    selection_file: Path
    pairs: int
    sentences: int
    rounds: int
    rows: tuple[SweepRow, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "splits": {
                "selection": {
                    "file": str(self.selection_file),
                    "role": "choices are read from this split",
                },
                "dev": {"file": str(datasets.STSB_DEV), "role": "reported only"},
            },
            "metric": "stsb_spearman",
            "pairs": self.pairs,
            "sentences": self.sentences,
            "rounds": self.rounds,
            "rows": [row.to_json() for row in self.rows],
        }


def format_table(report: SweepReport) -> str:
    """The table: one row per runner, the selection split's columns first."""
    width = max(len(row.runner) for row in report.rows)
    lines = [
        f"STS-B Spearman on {report.pairs} pairs per split; selection: choose on it; "
        "dev: reported only",
        f"{'runner':<{width}} {'selection':>9} {'sel drop':>8} {'dev':>6} {'dev drop':>8} "
        f"{'vs torch':>8}",
    ]
    for row in report.rows:
        lines.append(
            f"{row.runner:<{width}} {_cell(row.selection, 9)} {_cell(row.selection_drop, 8)} "
            f"{_cell(row.dev, 6)} {_cell(row.dev_drop, 8)} "
            + ("     n/a" if row.vs_torch is None else f"{row.vs_torch:>7.2f}x")
        )
    return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.2f}"


def write_report(report: SweepReport, folder: Path) -> Path:
    """OUT/sweep/sweep.json, written last (after every engine)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESULTS_FILE
    atomic_write_text(path, json.dumps(report.to_json(), indent=2, default=str))
    return path
