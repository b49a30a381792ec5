"""The one way a stage runs: skip when up to date, else invalidate, build, commit the manifest."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import ArtifactDir, StageRecord, check_free_space
from bert_compiler.core.interrupts import checkpoint

log = logging.getLogger("bert_compile")

# A stage body writes its outputs into the folder (atomically) and returns (output names, results).
StageBody = Callable[[ArtifactDir], tuple[list[str], Mapping[str, Any]]]


@dataclass(frozen=True)
class StageResult:
    """What a stage produced: its folder, its manifest, and whether it was reused."""

    stage: str
    path: Path
    manifest: dict[str, Any]
    skipped: bool

    def output(self, name: str) -> Path:
        return ArtifactDir(self.path).output_path(name)

    @property
    def results(self) -> dict[str, Any]:
        return self.manifest.get("results", {})

    def report(self) -> StageReport:
        return StageReport(self.path, self.skipped, self.results.get("seconds"))


@dataclass(frozen=True)
class StageReport:
    """One stage of a run, as the run summary lists it: its folder, whether it was up to date,
    how long it took."""

    path: Path
    skipped: bool
    seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "skipped": self.skipped, "seconds": self.seconds}


def run_stage(
    record: StageRecord,
    folder: Path,
    body: StageBody,
    *,
    force: bool,
    prepare: Callable[[], None] | None = None,
) -> StageResult:
    """Run ``body`` into ``folder`` unless a complete manifest for the same record exists.

    Args:
        prepare: loads and checks the stage's inputs (what the stage requires); it runs only
            when the stage will run, and before the folder is touched, so a bad input fails
            with the previous complete artifact still intact.
    """
    checkpoint()
    artifact = ArtifactDir(folder)
    if not force and artifact.is_up_to_date(record):
        log.info("[%s] up to date: %s", record.stage, folder)
        return StageResult(record.stage, folder, artifact.read_manifest() or {}, skipped=True)
    if prepare is not None:
        prepare()
    check_free_space(folder, artifact.expected_bytes(record))
    log.info("[%s] running -> %s", record.stage, folder)
    started = time.perf_counter()
    artifact.begin()
    outputs, results = body(artifact)
    # Before the manifest makes the stage complete: a signal whose exception was swallowed
    # inside the body still stops here.
    checkpoint()
    results = {**results, "seconds": round(time.perf_counter() - started, 3)}
    manifest = artifact.commit(record, outputs, results)
    log.info("[%s] done in %.1fs", record.stage, results["seconds"])
    return StageResult(record.stage, folder, manifest, skipped=False)
