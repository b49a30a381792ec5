"""bench's report: the results as a fixed-width table, a chart, and the files under OUT/bench."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bert_compiler.bench.roofline import Roofline
from bert_compiler.core.artifacts import atomic_write_text

log = logging.getLogger("bert_compile")

RESULTS_FILE = "bench.json"
CHART_FILE = "bench.png"
TABLE_FILE = "bench.txt"


@dataclass
class Measurement:
    """One row of bench's results (the JSON schema of ``results``)."""

    model: str
    runner: str
    data: str
    batching: str
    batch: int
    seq: int | None
    sentences_per_s: float
    tokens_per_s: float
    padding_fraction: float
    p50_ms: float | None
    p99_ms: float | None
    # Whether the time includes turning texts into token rows (end to end: texts in, outputs
    # out), or starts from the token rows every runner shares.
    includes_tokenization: bool = False
    # Its tokens per second over the roofline of the model on this GPU (bench/roofline.py), at
    # its own mean row length; None on a CPU, for a GPU the table lacks, and for the tokenizer.
    roofline_fraction: float | None = None


@dataclass(frozen=True)
class BenchDevice:
    """Where bench ran: a GPU's name and compute capability, or a CPU's and its usable cores."""

    kind: str
    name: str
    compute_capability: str | None = None
    cores: int | None = None

    def to_json(self) -> dict[str, Any]:
        extra = (
            {"compute_capability": self.compute_capability}
            if self.kind == "cuda"
            else {"cores": self.cores}
        )
        return {"kind": self.kind, "name": self.name, **extra}


@dataclass(frozen=True)
class BenchReport:
    """Everything one bench measured, side by side; ``to_json`` is OUT/bench/bench.json."""

    device: BenchDevice
    engine_load: str
    sentences: int
    data: str
    settings: Mapping[str, Any]
    versions: Mapping[str, str]
    results: tuple[Measurement, ...]
    # At the data's mean row length; None where no row has a fraction.
    roofline: Roofline | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "device": self.device.to_json(),
            "engine_load": self.engine_load,
            "sentences": self.sentences,
            "data": self.data,
            "spec": dict(self.settings),
            "versions": dict(self.versions),
            "results": [asdict(row) for row in self.results],
            "roofline": self.roofline and self.roofline.to_json(),
        }


def format_table(report: BenchReport) -> str:
    """The results as a fixed-width table."""
    header = (
        f"{'runner':<52} {'data':<5} {'batching':<44} {'sent/s':>10} {'pad':>5} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'roof':>5}"
    )
    lines = [header]
    for row in report.results:
        shape = f"{row.batch}x{row.seq}" if row.data == "fixed" else row.batching
        lines.append(
            f"{row.runner[:52]:<52} {row.data:<5} {shape[:44]:<44} "
            f"{row.sentences_per_s:>10,.0f} {row.padding_fraction:>5.0%} "
            f"{_ms(row.p50_ms):>8} {_ms(row.p99_ms):>8} {_share(row.roofline_fraction):>5}"
        )
    if report.roofline is not None:
        roof = report.roofline
        lines.append(
            f"roof: the share of the fp16 {roof.bound}-bound limit of this model on the "
            f"{roof.gpu.name} ({roof.sentences_per_s:,.0f} sentences/s at {roof.mean_length:.2f} "
            f"tokens per sentence; bench/roofline.py)"
        )
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_chart(report: BenchReport, path: Path) -> Path | None:
    """A bar chart of real-text throughput per runner (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("[bench] no chart: matplotlib is not installed")
        return None
    rows = [r for r in report.results if r.data == "real" and "tokenizer" not in r.runner]
    labels = [f"{r.runner}\n{r.batching}" for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    axes.barh(range(len(rows)), [r.sentences_per_s for r in rows], color="tab:blue")
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("sentences/s")
    axes.set_title(
        f"{rows[0].model if rows else ''} on {report.device.name}: {report.sentences} sentences"
    )
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    temporary.replace(path)
    return path


def write_report(report: BenchReport, folder: Path) -> dict[str, Path]:
    """bench.json, bench.txt and bench.png (when matplotlib is there) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {"json": folder / RESULTS_FILE, "table": folder / TABLE_FILE}
    atomic_write_text(written["json"], json.dumps(report.to_json(), indent=2) + "\n")
    atomic_write_text(written["table"], format_table(report) + "\n")
    chart = write_chart(report, folder / CHART_FILE)
    if chart is not None:
        written["chart"] = chart
    return written
