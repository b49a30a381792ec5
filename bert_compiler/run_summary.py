"""What `run` returns and writes to run.json: typed results with the JSON docs/guides/ci.md's
"Machine-readable output" documents (``to_json``) and the lines the CLI prints (``lines``).

Verify's report and the fallback's record are JSON files other tools read; these types are read
from them once, here, so no caller reads a result back by key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_compiler.core.stage import StageReport
from bert_compiler.stages.verify import Metric, ParitySummary, format_metric, or_nan
from bert_compiler.triton.package import PackagedRepository


@dataclass(frozen=True)
class FloatOps:
    """An INT8 engine's quantizable MatMuls left in float: ``float`` of ``total``."""

    float: int
    total: int

    def to_json(self) -> dict[str, int]:
        return {"float": self.float, "total": self.total}


@dataclass(frozen=True)
class FallbackReport:
    """The INT8 precision fallback's search; ``record`` is the whole record run.json keeps."""

    rounds: int
    seconds: float
    failure: str | None
    record: Mapping[str, Any] = field(repr=False)

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> FallbackReport:
        return cls(record["rounds"], record["seconds"], record["failure"], record)

    def to_json(self) -> dict[str, Any]:
        return dict(self.record)


@dataclass(frozen=True)
class VerifySpeed:
    """How fast verify's metric pass ran through the runtime: a rough figure, tokenization
    included (``measured`` says so); `bert-compile bench` is what measures."""

    sentences_per_s: float
    sentences: int
    measured: str

    @classmethod
    def of(cls, record: Mapping[str, Any] | None) -> VerifySpeed | None:
        if not record:
            return None
        return cls(record["sentences_per_s"], record["sentences"], record["measured"])

    def to_json(self) -> dict[str, Any]:
        return {
            "sentences_per_s": self.sentences_per_s,
            "sentences": self.sentences,
            "measured": self.measured,
        }

    def line(self) -> str:
        return (
            f"\n  speed: {self.sentences_per_s:,.0f} sentences/s over {self.sentences} "
            "metric sentences in verify (tokenization included; rough: `bert-compile bench` "
            "measures)"
        )


def float_ops_line(float_ops: FloatOps | None, fallback: FallbackReport | None = None) -> str:
    """``\n  float_ops: 2/36 ...`` for an INT8 engine: its quantizable MatMuls left in float."""
    if not float_ops:
        return ""
    line = f"\n  float_ops: {float_ops.float}/{float_ops.total} quantizable MatMuls in float"
    if fallback and fallback.rounds:
        line += f" (fallback: {fallback.rounds} rounds, {fallback.seconds:.0f}s)"
    return line


@dataclass(frozen=True)
class EngineReport:
    """One engine of the run: where it is, what verify found, and whether it passed."""

    backend: str
    precision: str
    device: str
    compute_capability: str | None
    name: str
    path: Path
    manifest: Path
    report: Path
    parity: ParitySummary
    metric: Metric
    passed: bool
    failures: tuple[str, ...]
    float_ops: FloatOps | None
    speed: VerifySpeed | None
    fallback: FallbackReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "compute_capability": self.compute_capability,
            "name": self.name,
            "path": str(self.path),
            "manifest": str(self.manifest),
            "report": str(self.report),
            "parity": self.parity.to_json(),
            "metric": self.metric.to_json(),
            "passed": self.passed,
            "failures": list(self.failures),
            "float_ops": self.float_ops and self.float_ops.to_json(),
            # verify writes {} where it timed nothing (a metric without an embedding pass).
            "speed": self.speed.to_json() if self.speed else {},
            **({"fallback": self.fallback.to_json()} if self.fallback is not None else {}),
        }

    def lines(self, pytorch_metric: Metric | None) -> str:
        """PASS/FAIL, the path, parity and metric beside PyTorch's, then the report's path."""
        reference = pytorch_metric.value if pytorch_metric else None
        return (
            f"{'PASS' if self.passed else 'FAIL'} {self.backend} {self.device} "
            f"{self.precision}: {self.path}\n"
            f"  parity min_cosine={or_nan(self.parity.min_cosine):.6f} "
            f"max_abs_err={or_nan(self.parity.max_abs_err):.2e}; "
            f"{self.metric.name}={format_metric(self.metric.value)} "
            f"(PyTorch fp32 {format_metric(reference)})"
            f"{float_ops_line(self.float_ops, self.fallback)}"
            f"{self.speed.line() if self.speed else ''}\n  report: {self.report}"
        )


@dataclass(frozen=True)
class RunSummary:
    """The whole run; ``ok`` only when every engine passed."""

    ok: bool
    model_name: str
    model_path: Path
    task: str
    out: Path
    fused_operators: Mapping[str, int]
    fusion_note: str
    pytorch_fp32_metric: Metric | None
    engines: tuple[EngineReport, ...]
    repository: PackagedRepository | None
    stages: Mapping[str, StageReport]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "model": {"name": self.model_name, "path": str(self.model_path), "task": self.task},
            "out": str(self.out),
            "fused_operators": dict(self.fused_operators),
            "fusion_note": self.fusion_note,
            "pytorch_fp32_metric": self.pytorch_fp32_metric and self.pytorch_fp32_metric.to_json(),
            "engines": [engine.to_json() for engine in self.engines],
            "repository": self.repository and self.repository.to_json(),
            "stages": {name: stage.to_json() for name, stage in self.stages.items()},
        }

    def failures(self) -> str:
        """Each failed engine's path and failures, for the one-line error."""
        return " | ".join(
            f"{e.path}: {'; '.join(e.failures)}" for e in self.engines if not e.passed
        )
