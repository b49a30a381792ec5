"""The INT8 precision fallback: an INT8 engine that fails its gate keeps the MatMuls that hurt
most in float and is verified again, within a bound.

Calibration runs once: every later round reuses its ranges (keeping a MatMul in float does not
change any activation's range, stages/calibrate.py). The quantized MatMuls are ranked by the
error each alone adds, on calibration sentences; the search then looks for the shortest prefix
of that ranking to keep in float that passes the gate, by growing groups and bisection
(calibration/sensitivity.py: about 2 log2(limit) rounds, not one per MatMul). It stops at
``max_float`` of the quantizable MatMuls: an engine that needs more in float fails, since a
mostly-float "INT8" engine is not what was asked for.

Never chosen on the set that is reported: every round's gate runs on the selection split (train
rows, ``selection_split``), and only the engine left at the end is verified on the reporting set
(the dev set ``verify`` scores), once. The record names the files that decided what.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.calibration import datasets
from bert_compiler.calibration.sensitivity import smallest_passing_prefix
from bert_compiler.core import progress
from bert_compiler.core.artifacts import sha256_file
from bert_compiler.core.errors import InputError
from bert_compiler.core.stage import StageReport, StageResult
from bert_compiler.models.loading import ModelInfo
from bert_compiler.stages.calibrate import (
    MODEL_FILE,
    CalibrationSpec,
    calibrate,
    rank_for_fallback,
)

log = logging.getLogger("bert_compile")


@dataclass(frozen=True)
class Split:
    """The data one verification reads: its name, parity sentences and task-metric file."""

    name: str
    parity: Path
    metric: Path


# Builds and verifies an engine from a graph on a split (None: the reporting set, verify's own
# data): (build result, verify result). The second argument is ``force``.
BuildAndVerify = Callable[[Path, bool, Split | None], tuple[StageResult, StageResult]]
# One round's build and verify, its split fixed: (graph, force) -> (build, verify) results.
_RoundBuild = Callable[[Path, bool], tuple[StageResult, StageResult]]


@dataclass(frozen=True)
class FallbackSpec:
    """Settings of the INT8 precision fallback.

    Attributes:
        enabled: search for MatMuls to keep in float when the INT8 engine fails its gate.
        max_float: the largest fraction of the quantizable MatMuls that may end in float
            (--keep-float ones included); an engine that needs more fails.
        ranking_sentences: calibration sentences the sensitivity ranking runs on: its time grows
            with them, and 64 rank the most sensitive MatMuls as 128 do, in half the time
            (docs/benchmarks.md, "CPU INT8 chosen on a selection split").
        selection_data: the task-metric file every round's gate reads (None: the bundled
            selection split for the model's task); never the reporting set.
    """

    enabled: bool = True
    max_float: float = 0.25
    ranking_sentences: int = 64
    selection_data: Path | None = None

    def validate(self) -> None:
        if not 0 <= self.max_float <= 1:
            raise InputError(f"--fallback-max-float {self.max_float}: must be in [0, 1]")
        if self.ranking_sentences < 1:
            raise InputError("the sensitivity ranking needs at least one sentence")

    def selection_split(self, info: ModelInfo) -> Split:
        """The rows the rounds are gated on, the train-side twins of verify's dev files: SST-2
        train sentences for parity (STS-B train pairs for a cross-encoder), and STS-B train pairs
        (SST-2 train for single-text classifiers) for the task metric."""
        sentences = info.task == "sequence-classification" and not info.pairs
        metric = datasets.SST2_SELECTION if sentences else datasets.STSB_SELECTION
        parity = datasets.STSB_SELECTION if info.pairs else datasets.SST2_SELECTION
        return Split("selection", parity, Path(self.selection_data or metric))

    def float_limit(self, quantizable: int) -> int:
        """How many of ``quantizable`` MatMuls may end in float."""
        return math.floor(self.max_float * quantizable + 1e-9)


def same_rows(selection: Path, reporting: Path) -> bool:
    """Whether two data files hold the same bytes (a copy of the reporting set is no split). Files
    of different sizes are not opened: the rounds' data must not read the reporting set."""
    if not selection.is_file() or not reporting.is_file():
        return False
    if selection.stat().st_size != reporting.stat().st_size:
        return False
    return sha256_file(selection) == sha256_file(reporting)


def _fmt_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def int8_with_fallback(
    *,
    info: ModelInfo,
    float_graph: Path,
    calibrate_dir: Path,
    calibration: CalibrationSpec,
    fallback: FallbackSpec,
    build_and_verify: BuildAndVerify,
    reporting: Path,
    force: bool,
    stages: dict[str, StageReport],
) -> tuple[StageResult, StageResult, dict[str, Any]]:
    """Calibrate, build and verify an INT8 engine; when it fails its gate and the fallback is
    on, search the fewest most-sensitive MatMuls to keep in float.

    With the fallback on, every round is gated on the selection split and the final engine is
    then verified on the reporting set; with it off, the one round is verified on the reporting
    set only (nothing is chosen).

    Args:
        float_graph: the float standard-ops graph calibration quantizes.
        calibrate_dir: the calibrate stage's folder.
        calibration: calibration settings (its keep_float stays float in every round).
        build_and_verify: builds and verifies an engine from a graph (BuildAndVerify).
        reporting: the task-metric file verify reports on; a selection split with the same
            content is refused.
        stages: the run's stage summaries; the calibrate entry is set here.

    Returns:
        The final build and verify results (those of the engine left on disk; the verify is
        the reporting set's), and the fallback record: every round (``steps``, gated on the
        selection split), the ranking, what was kept in float, which data decided what
        (``decided_by``) and, when the engine still fails on the selection split, why the search
        gave up (``failure``, else None).

    Raises:
        InputError: the selection split holds the same rows as ``reporting``.
    """
    fallback.validate()
    split = _selection_split(info, fallback, reporting)
    rounds = _Rounds(
        info=info,
        float_graph=float_graph,
        calibrate_dir=calibrate_dir,
        calibration=calibration,
        build_and_verify=lambda graph, force: build_and_verify(graph, force, split),
        stages=stages,
    )
    with progress.bar(desc="int8 rounds", unit="round") as bar:
        rounds.bar = bar
        record = _first_round_and_search(rounds, fallback, force)
        if split is not None:
            # The only read of the reporting set: the engine the selection split chose.
            rounds.built, rounds.verified = build_and_verify(rounds.graph(), False, None)
    last = rounds.steps[-1]
    record.update(
        decided_by={
            "scales": str(calibration.data_file()),
            "ranking": str(calibration.data_file()),
            "kept_float": split and {"parity": str(split.parity), "metric": str(split.metric)},
            "reported": "the verify report's data (the reporting set), read once at the end",
        },
        kept_float=list(last["kept_float"]),
        steps=rounds.steps,
        rounds=len(rounds.steps) - 1,
        seconds=round(time.perf_counter() - rounds.started, 3),
    )
    assert rounds.built is not None and rounds.verified is not None
    return rounds.built, rounds.verified, record


def _selection_split(info: ModelInfo, fallback: FallbackSpec, reporting: Path) -> Split | None:
    """The selection split the fallback gates rounds on (None with the fallback off).

    Raises:
        InputError: it holds the same rows as ``reporting``.
    """
    split = fallback.selection_split(info) if fallback.enabled else None
    if split is not None and same_rows(split.metric, reporting):
        raise InputError(
            f"--selection-data {split.metric}: the same rows as the set verify reports "
            f"({reporting}); choose on another split, e.g. a train subset"
        )
    return split


def _first_round_and_search(rounds: _Rounds, fallback: FallbackSpec, force: bool) -> dict[str, Any]:
    """The first round (nothing more kept in float) and, when it fails and the fallback is on,
    the search; returns the fallback record so far."""
    passed = rounds.trial((), force)
    assert rounds.calibrated is not None  # the first trial calibrates
    quantizable = len(set(rounds.calibrated.results["quantized_matmuls"]) | set(rounds.user_kept))
    record: dict[str, Any] = {
        "max_float": fallback.max_float,
        "float_limit": fallback.float_limit(quantizable),
        "quantizable": quantizable,
        "ranking": [],
        "failure": None,
    }
    if not passed and fallback.enabled:
        record.update(rounds.search(fallback, quantizable, record["float_limit"]))
    return record


class _Rounds:
    """The rounds of one INT8 engine: each calibrates (with its MatMuls kept float), builds and
    verifies; the stage folders hold the last round's artifacts."""

    def __init__(
        self,
        *,
        info: ModelInfo,
        float_graph: Path,
        calibrate_dir: Path,
        calibration: CalibrationSpec,
        build_and_verify: _RoundBuild,
        stages: dict[str, StageReport],
    ):
        self.info = info
        self.float_graph = float_graph
        self.calibrate_dir = calibrate_dir
        self.calibration = calibration
        self.build_and_verify = build_and_verify
        self.stages = stages
        self.user_kept = tuple(dict.fromkeys(calibration.keep_float))
        self.started = time.perf_counter()
        self.steps: list[dict[str, Any]] = []
        self.calibrated: StageResult | None = None
        self.built: StageResult | None = None
        self.verified: StageResult | None = None
        self.bar: Any = None

    def trial(self, extra: tuple[str, ...], force: bool) -> bool:
        """One round with ``extra`` MatMuls float besides the user's; True when it passed."""
        kept = self.user_kept + extra
        calibrated = calibrate(
            info=self.info,
            source=self.float_graph,
            out_dir=self.calibrate_dir,
            spec=replace(self.calibration, keep_float=kept),
            force=force,
        )
        self.stages["calibrate"] = calibrated.report()
        self.built, self.verified = self.build_and_verify(calibrated.output(MODEL_FILE), force)
        self.calibrated = calibrated
        report = self.verified.results
        self.steps.append(
            {
                "round": len(self.steps),
                "kept_float": list(kept),
                "metric": report["metric"]["value"],
                "pytorch_metric": report["pytorch_metric"]["value"],
                "split": report.get("split"),
                "passed": bool(report["passed"]),
                "failures": list(report["failures"]),
            }
        )
        if self.bar is not None:
            self.bar.update(1)
        return bool(report["passed"])

    def graph(self) -> Path:
        """The calibrated graph of the last round (the engine on disk was built from it)."""
        assert self.calibrated is not None
        return self.calibrated.output(MODEL_FILE)

    def outcome(self) -> str:
        """The last round's result in a few words: passed, or every limit it failed."""
        last = self.steps[-1]
        return "passed" if last["passed"] else "; ".join(last["failures"]) or "failed"

    def search(self, fallback: FallbackSpec, quantizable: int, limit: int) -> dict[str, Any]:
        """After a failed first round: rank, then search the prefix to keep float. Returns the
        record's ``ranking`` and ``failure``."""
        assert self.calibrated is not None
        users = len(self.user_kept)
        if limit - users < 1:
            failure = (
                f"fallback: --fallback-max-float {fallback.max_float:g} allows {limit}/"
                f"{quantizable} MatMuls in float and {users} already are; nothing left to try"
            )
            log.warning("[fallback] round 0: %s; %s", self.outcome(), failure)
            return {"failure": failure}
        log.info(
            "[fallback] round 0: %s; searching which MatMuls to keep in float (at most %d/%d)",
            self.outcome(),
            limit,
            quantizable,
        )
        ranking_started = time.perf_counter()
        ranking = rank_for_fallback(
            info=self.info,
            float_source=self.float_graph,
            calibrated=self.calibrated,
            spec=self.calibration,
            sentences=fallback.ranking_sentences,
        )
        order = tuple(s.node for s in ranking)
        ranked = [{"node": s.node, "error": s.error} for s in ranking]
        if ranking:
            log.info(
                "[fallback] ranked in %s; most sensitive: %s (error alone %.2e)",
                _fmt_seconds(time.perf_counter() - ranking_started),
                ranking[0].node,
                ranking[0].error,
            )

        def passes(size: int, why: str = "") -> bool:
            last = self.steps[-1]
            change = size + users - len(last["kept_float"])
            # Round 0's result was said with the ranking.
            said = f"round {last['round']}: {self.outcome()}; " if last["round"] else ""
            log.info(
                "[fallback] %skeeping %d %s MatMul%s float (%d/%d)%s",
                said,
                abs(change),
                "more" if change > 0 else "fewer",
                "" if abs(change) == 1 else "s",
                size + users,
                quantizable,
                why,
            )
            return self.trial(order[:size], False)

        size = smallest_passing_prefix(min(limit - users, len(order)), passes)
        if size is not None and len(self.steps[-1]["kept_float"]) != size + users:
            # The last round tried fewer and failed: the smallest that passed is built again
            # (its calibration reuses the ranges; the stage folders hold one engine at a time).
            passes(size, ": the fewest that passed, built again")
        last = self.steps[-1]
        elapsed = _fmt_seconds(time.perf_counter() - self.started)
        if not last["passed"]:
            failure = (
                "fallback: the gate on the selection split still fails with "
                f"{len(last['kept_float'])}/{quantizable} MatMuls in float, and "
                f"--fallback-max-float {fallback.max_float:g} allows at "
                f"most {limit} ({last['round']} rounds, {elapsed})"
            )
            log.warning("[fallback] round %d: %s; %s", last["round"], self.outcome(), failure)
            return {"ranking": ranked, "failure": failure}
        log.info(
            "[fallback] round %d: passed; done: %d/%d MatMuls float after %d rounds (%s)",
            last["round"],
            len(last["kept_float"]),
            quantizable,
            last["round"],
            elapsed,
        )
        return {"ranking": ranked}
