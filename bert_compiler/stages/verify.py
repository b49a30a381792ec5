"""verify: an engine against the PyTorch model, on real tokenized text, plus the task metric.

Parity inputs are SST-2 dev sentences (never the calibration sentences) batched at several sizes,
plus edge rows: an empty string (2 tokens), a single word, a row at the maximum length, and batches
that mix short and long rows; a cross-encoder's are STS-B dev pairs and pairs of edge rows. The
metric is STS-B dev Spearman x100 for embedding models (of the embeddings' cosine) and for
cross-encoders (of their one score per pair), and SST-2 dev accuracy x100 for two-class
classifiers, computed for PyTorch fp32 and for the engine.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.core import progress
from bert_compiler.core.artifacts import StageRecord, atomic_write_text, input_file, sha256_file
from bert_compiler.core.errors import EnvironmentProblem, InputError, ParityError
from bert_compiler.core.stage import StageResult, run_stage
from bert_compiler.models.loading import (
    ModelInfo,
    build_wrapper,
    load_torch_model,
    output_name,
)
from bert_compiler.runtime.encoder import Encoder, load_model_engine, pool_token_rows
from bert_compiler.runtime.parity import (
    DEFAULT_MAX_METRIC_DROP,
    DEFAULT_MIN_METRIC_RETENTION,
    DEFAULT_TOLERANCES,
    OutputParity,
    Tolerance,
    compare_batch,
)
from bert_compiler.runtime.text import (
    PARITY_SENTENCES,
    Text,
    default_parity_file,
    parity_batches,
    parity_texts,
    tokenize,
)

log = logging.getLogger("bert_compile")

_TOLERANCE_LIMITS = {f.name for f in fields(Tolerance)}
# The range of each limit, and the option that sets it. NaN is no limit: every comparison with it
# is false, so a gate against NaN would pass anything. Infinity is allowed where it means "no
# limit" (INT8's default max_abs_err).
LIMIT_RANGES = {
    "max_abs_err": ("--max-abs-err", 0.0, math.inf),
    "rel_l2_err": ("--max-rel-l2", 0.0, math.inf),
    "min_cosine": ("--min-cosine", -1.0, 1.0),
    # Below 0: the engine must beat PyTorch by that many points.
    "max_metric_drop": ("--max-metric-drop", -math.inf, math.inf),
    # Above 1: the engine must beat PyTorch (tests use it to force a failing gate).
    "min_metric_retention": ("--min-metric-retention", 0.0, math.inf),
}
REPORT_FILE = "report.json"
# How PyTorch's and ONNX Runtime's allocators say they ran out of memory.
_OUT_OF_MEMORY = re.compile(
    r"not enough memory|out of memory|failed to allocate|can't allocate", re.IGNORECASE
)
METRIC_BATCH_SIZE = 64
SPEED_NOTE = (
    "one pass of the task-metric sentences through the runtime, tokenization included, during "
    "verify (a rough figure; `bert-compile bench` measures)"
)

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# Texts (a cross-encoder's: pairs) -> one row per text: logits, or the pooled, normalised sentence
# embedding.
Embedder = Callable[[list[Text]], np.ndarray]
_PYTORCH_METRICS: dict[tuple, MetricResult] = {}


@dataclass(frozen=True)
class VerifySpec:
    """Settings of the verify stage.

    Attributes:
        precision: selects the default tolerances.
        tolerance_overrides: (limit, value) pairs replacing the precision's default limits
            (max_abs_err, rel_l2_err, min_cosine).
        max_metric_drop: largest metric drop (points) allowed against PyTorch; None: default.
        min_metric_retention: smallest fraction of PyTorch's metric to keep; None: default.
        metric_gate: apply the two metric gates (the metric is always reported).
        max_length: truncation length in tokens; None takes the model's.
        parity_sentences: how many sentences go into the parity batches.
        metric_limit: use only the first N metric examples (None: the whole dev set).
        parity_data: TSV with a ``sentence`` column for parity, for a cross-encoder
            ``sentence1`` and ``sentence2`` (None: bundled SST-2 dev, or STS-B dev pairs).
        metric_data: TSV for the task metric, STS-B columns for embedding models and
            cross-encoders or SST-2 columns for classifiers (None: the bundled dev set).
        precision_limits: (precision, limit, value): a limit (max_abs_err, rel_l2_err,
            min_cosine, max_metric_drop, min_metric_retention) for engines of that precision
            only, winning over the three fields above (a config file's ``[int8]`` table).
        split: which data this verification is: ``reporting`` (the set results are reported
            on) or ``selection`` (rows choices are made on: the INT8 fallback's rounds).
    """

    precision: str = "fp32"
    tolerance_overrides: tuple[tuple[str, float], ...] = ()
    max_metric_drop: float | None = None
    min_metric_retention: float | None = None
    metric_gate: bool = True
    max_length: int | None = None
    parity_sentences: int = PARITY_SENTENCES
    metric_limit: int | None = None
    parity_data: Path | None = None
    metric_data: Path | None = None
    precision_limits: tuple[tuple[str, str, float], ...] = ()
    split: str = "reporting"

    def validate(self) -> None:
        """Raises InputError for a limit that is NaN or out of its range (LIMIT_RANGES), or a
        metric limit below 1."""
        given: list[tuple[str, float | None, str]] = [
            (name, value, "") for name, value in self.tolerance_overrides
        ]
        given += [
            ("max_metric_drop", self.max_metric_drop, ""),
            ("min_metric_retention", self.min_metric_retention, ""),
        ]
        given += [(name, value, f" ([{p}] table)") for p, name, value in self.precision_limits]
        for name, value, where in given:
            if value is None:
                continue
            flag, low, high = LIMIT_RANGES[name]
            if not low <= value <= high:  # NaN fails both comparisons
                raise InputError(
                    f"{flag}{where} {value}: expected a number from {low:g} to {high:g}"
                )
        if self.metric_limit is not None and self.metric_limit < 1:
            raise InputError(f"--metric-limit {self.metric_limit}: expected 1 or more examples")

    def _own_limits(self) -> dict[str, float]:
        return {k: v for precision, k, v in self.precision_limits if precision == self.precision}

    def parity_file(self, info: ModelInfo) -> Path:
        return Path(self.parity_data) if self.parity_data else default_parity_file(info)

    def metric_file(self, info: ModelInfo) -> Path:
        if self.metric_data:
            return Path(self.metric_data)
        if info.task == "sequence-classification" and not info.pairs:
            return datasets.SST2_DEV
        return datasets.STSB_DEV

    def resolved_tolerance(self) -> Tolerance:
        limits = dict(self.tolerance_overrides)
        limits.update((k, v) for k, v in self._own_limits().items() if k in _TOLERANCE_LIMITS)
        return replace(DEFAULT_TOLERANCES[self.precision], **limits)

    def resolved_metric_drop(self) -> float | None:
        drop = self._own_limits().get("max_metric_drop", self.max_metric_drop)
        return DEFAULT_MAX_METRIC_DROP[self.precision] if drop is None else drop

    def resolved_metric_retention(self) -> float | None:
        retention = self._own_limits().get("min_metric_retention", self.min_metric_retention)
        return DEFAULT_MIN_METRIC_RETENTION[self.precision] if retention is None else retention


@dataclass
class MetricResult:
    name: str
    value: float | None
    examples: int
    note: str = ""


def format_metric(value: float | None) -> str:
    """A metric value as the CLI prints it (n/a where it could not be computed)."""
    return "n/a" if value is None else f"{value:.2f}"


def or_nan(value: float | None) -> float:
    """A parity figure to print with a float format (nan where nothing was compared)."""
    return float("nan") if value is None else value


@dataclass(frozen=True)
class Metric:
    """A task metric's name and value (None where it could not be computed)."""

    name: str
    value: float | None

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Metric:
        return cls(record["name"], record["value"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value}


@dataclass(frozen=True)
class ParitySummary:
    """The worst case over an engine's outputs (None where no output was compared)."""

    max_abs_err: float | None
    rel_l2_err: float | None
    min_cosine: float | None
    passed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "max_abs_err": self.max_abs_err,
            "rel_l2_err": self.rel_l2_err,
            "min_cosine": self.min_cosine,
            "passed": self.passed,
        }


@dataclass
class VerifyOutcome:
    parity: dict[str, dict]
    pytorch_metric: MetricResult
    engine_metric: MetricResult
    passed: bool
    failures: list[str] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)


def torch_runner(info: ModelInfo, pooling_in_graph: bool) -> Runner:
    """PyTorch fp32 with the library's default attention (not the export's eager form): SDPA
    where transformers has it for the architecture, else eager (MPNet)."""
    import torch

    model = load_torch_model(info, attn_implementation=None)
    wrapper = build_wrapper(info, model, pooling_in_graph=pooling_in_graph)
    name = output_name(info, pooling_in_graph=pooling_in_graph)

    def run(feeds):
        args = tuple(torch.from_numpy(feeds[n]) for n in info.architecture.input_names)
        with torch.inference_mode():
            return {name: wrapper(*args).numpy()}

    return run


def _embeddings(outputs: dict[str, np.ndarray], feeds, info: ModelInfo) -> np.ndarray:
    if "sentence_embedding" in outputs:
        return outputs["sentence_embedding"]
    hidden = outputs["last_hidden_state"]
    mask = feeds["attention_mask"][..., None].astype(hidden.dtype)
    if info.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _batched(items: list[Text], size: int) -> Iterable[tuple[list[int], list[Text]]]:
    # Length-sorted batches: far less padding; the metric does not depend on order.
    order = sorted(range(len(items)), key=lambda i: len("".join(items[i])))
    for start in range(0, len(order), size):
        index = order[start : start + size]
        yield index, [items[i] for i in index]


def torch_embedder(
    run: Runner, tokenizer, info: ModelInfo, max_length: int, label: str
) -> Embedder:
    """Texts -> one row per text (logits, or pooled and normalised embeddings) from PyTorch."""

    def embed(texts: list[Text]) -> np.ndarray:
        rows: list[np.ndarray | None] = [None] * len(texts)
        for index, batch in progress.bar(list(_batched(texts, METRIC_BATCH_SIZE)), desc=label):
            feeds = tokenize(tokenizer, batch, info, max_length)
            outputs = run(feeds)
            values = outputs["logits"] if "logits" in outputs else _embeddings(outputs, feeds, info)
            for i, row in zip(index, values, strict=True):
                rows[i] = row
        return np.stack(cast(list[np.ndarray], rows))  # every row was filled

    return embed


def engine_embedder(
    encoder: Encoder, label: str = "engine metric", timing: dict[str, Any] | None = None
) -> Embedder:
    """Texts -> one row per text from an engine, through the runtime (what serving runs);
    ``timing`` receives the sentences and seconds of the call."""

    def embed(texts: list[Text]) -> np.ndarray:
        started = time.perf_counter()
        outputs = encoder.encode(texts, desc=label)
        if timing is not None:
            timing.update(sentences=len(texts), seconds=time.perf_counter() - started)
        for name in ("logits", "sentence_embedding"):
            if name in outputs:
                return outputs[name]
        return pool_token_rows(outputs["last_hidden_state"], encoder.info.pooling or "mean")

    return embed


def compute_metric(
    embed: Embedder, info: ModelInfo, limit: int | None, data_file: Path
) -> MetricResult:
    """The task metric of one runner over a dev set."""
    from scipy.stats import spearmanr

    if info.pairs:
        pairs = datasets.load_stsb(data_file)
        kept = list(zip(pairs.sentences1, pairs.sentences2, strict=True))[:limit]
        texts: list[Text] = [(a, b) for a, b in kept]
        scores = embed(texts)[:, 0].astype(np.float64)
        value = float(spearmanr(scores, pairs.scores[: len(texts)]).statistic * 100)
        return MetricResult("stsb_spearman", value, len(texts))
    if info.task == "sequence-classification":
        if info.num_labels != 2:
            return MetricResult(
                "sst2_accuracy", None, 0, f"{info.num_labels}-class head: no metric"
            )
        data = datasets.load_sst2(data_file)
        sentences: list[Text] = list(data.sentences[:limit])
        labels = np.asarray(data.labels[:limit])
        predictions = embed(sentences).argmax(axis=1)
        value = float((predictions == labels).mean() * 100)
        return MetricResult("sst2_accuracy", value, len(sentences))
    pairs = datasets.load_stsb(data_file)
    first, second = pairs.sentences1[:limit], pairs.sentences2[:limit]
    both: list[Text] = [*first, *second]
    matrix = embed(both).astype(np.float64)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    count = len(first)
    cosine = (matrix[:count] * matrix[count:]).sum(axis=1)
    value = float(spearmanr(cosine, pairs.scores[:limit]).statistic * 100)
    return MetricResult("stsb_spearman", value, count)


def metric_gate_failures(
    reference: MetricResult, engine: MetricResult, spec: VerifySpec
) -> list[str]:
    """Why the engine's task metric fails its gates against PyTorch (empty when it passes).
    A metric that is NaN or infinite fails: constant scores or outputs, or a single example,
    give a Spearman of NaN, which no comparison would catch."""
    if not spec.metric_gate or reference.value is None or engine.value is None:
        return []
    unusable = [
        f"{who}'s {result.name} is {result.value} (constant scores or outputs, or too few "
        "examples): it cannot be judged; use more --metric-data or --no-metric-gate"
        for who, result in (("the engine", engine), ("PyTorch", reference))
        if result.value is not None and not math.isfinite(result.value)
    ]
    if unusable:
        return unusable
    failures = []
    drop = reference.value - engine.value
    max_drop = spec.resolved_metric_drop()
    if max_drop is not None and drop > max_drop:
        failures.append(
            f"{engine.name} {engine.value:.2f} is {drop:.3f} points below PyTorch's "
            f"{reference.value:.2f} (allowed {max_drop:g})"
        )
    retention = spec.resolved_metric_retention()
    if retention is not None and reference.value <= 0:
        failures.append(
            f"{engine.name}: PyTorch's {reference.value:.2f} is not positive, so a retention "
            "fraction means nothing (an untrained model?); use --no-metric-gate or "
            "--max-metric-drop"
        )
    elif retention is not None and engine.value < retention * reference.value:
        failures.append(
            f"{engine.name} {engine.value:.2f} keeps {engine.value / reference.value:.2%} of "
            f"PyTorch's {reference.value:.2f} (needs {retention:.1%})"
        )
    return failures


def _as_batch(rows: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rows of one output for one parity batch, in the batch's padded layout: token outputs
    (one [length, hidden] array per row) are zero-padded, and compared on valid tokens only."""
    if isinstance(rows, np.ndarray):
        return rows
    batch, sequence = feeds["attention_mask"].shape
    padded = np.zeros((batch, sequence, rows[0].shape[-1]), dtype=np.float32)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return padded


def run_verification(
    *, info: ModelInfo, encoder: Encoder, pooling_in_graph: bool, spec: VerifySpec
) -> VerifyOutcome:
    """Compare the engine behind ``encoder`` with PyTorch fp32 on the parity set, then both task
    metrics.

    The engine runs through the runtime, as served: the parity texts once with the serving
    batching (length-sorted batches padded to the ladder) and once one row at a time (the
    latency path); each output row is compared with PyTorch's row for the same text.
    """
    # The engine's tokenizer and length: PyTorch sees exactly the rows the engine sees.
    max_length = encoder.max_length
    tokenizer = encoder.tokenizer
    reference = torch_runner(info, pooling_in_graph)
    tolerance = spec.resolved_tolerance()

    sentences = parity_texts(info, spec.parity_file(info), spec.parity_sentences)
    batches = [
        (tokenize(tokenizer, texts, info, max_length), texts)
        for texts in parity_batches(sentences, max_length)
    ]
    references = [reference(feeds) for feeds, _ in progress.bar(batches, desc="parity")]
    texts = [text for _, batch in batches for text in batch]
    parity: dict[str, OutputParity] = {}
    for batching in (encoder.batching, replace(encoder.batching, max_batch=1)):
        outputs = encoder.with_batching(batching).encode(texts, desc="parity (engine)")
        start = 0
        for (feeds, batch), expected in zip(batches, references, strict=True):
            candidate = {
                name: _as_batch(rows[start : start + len(batch)], feeds)
                for name, rows in outputs.items()
            }
            compare_batch(parity, expected, candidate, feeds["attention_mask"])
            start += len(batch)
    parity_report = {name: entry.report(tolerance) for name, entry in parity.items()}

    # PyTorch's metric depends only on the model, the data and the length: computed once per
    # process, not again for every engine or every precision-fallback step.
    metric_file = spec.metric_file(info)
    key = (
        info.fingerprint()["sha256"],
        str(metric_file),
        sha256_file(metric_file),
        max_length,
        spec.metric_limit,
        pooling_in_graph,
    )
    if key not in _PYTORCH_METRICS:
        embed = torch_embedder(reference, tokenizer, info, max_length, "pytorch metric")
        _PYTORCH_METRICS[key] = compute_metric(embed, info, spec.metric_limit, metric_file)
    torch_metric = _PYTORCH_METRICS[key]
    timing: dict[str, Any] = {}
    engine_metric = compute_metric(
        engine_embedder(encoder, timing=timing), info, spec.metric_limit, metric_file
    )
    failures = [
        f"{name}: {reason}" for name, rep in parity_report.items() for reason in rep["failures"]
    ]
    failures.extend(metric_gate_failures(torch_metric, engine_metric, spec))
    speed = {}
    if timing:
        speed = {
            "sentences_per_s": round(timing["sentences"] / max(timing["seconds"], 1e-9), 1),
            "sentences": timing["sentences"],
            "measured": SPEED_NOTE,
        }
    return VerifyOutcome(parity_report, torch_metric, engine_metric, not failures, failures, speed)


def summarize_parity(parity: Mapping[str, Mapping[str, Any]]) -> ParitySummary:
    """Worst case over all outputs, the shape the run summary and the gate report."""
    reports = list(parity.values())
    return ParitySummary(
        max_abs_err=max((r["max_abs_err"] for r in reports), default=None),
        rel_l2_err=max((r["rel_l2_err"] for r in reports), default=None),
        min_cosine=min((r["min_cosine"] for r in reports), default=None),
        passed=bool(reports) and all(r["passed"] for r in reports),
    )


def verify(
    *,
    info: ModelInfo,
    engine_dir: Path,
    out_dir: Path,
    spec: VerifySpec = VerifySpec(),
    force: bool = False,
) -> StageResult:
    """Verify the engine in ``engine_dir``; write ``out_dir/report.json`` and its manifest.

    The report is written whether parity passes or not (CI reads it); the caller raises ParityError
    from ``require_passed``.
    """
    engine, engine_manifest = load_model_engine(engine_dir, info)
    return verify_engine(
        info=info,
        engine=engine,
        engine_spec=engine_manifest.get("spec", {}),
        label=str(engine_dir),
        out_dir=out_dir,
        spec=spec,
        force=force,
    )


def verify_engine(
    *,
    info: ModelInfo,
    engine,
    engine_spec: Mapping[str, Any],
    label: str,
    out_dir: Path,
    spec: VerifySpec,
    force: bool = False,
) -> StageResult:
    """Verify a loaded engine (any backend: ``run`` on numpy feeds, ``path``, ``output_names``)
    whose file was already checked against a manifest; ``engine_spec`` is its recorded build spec
    and ``label`` names it in the report."""
    spec.validate()
    data_files = {"parity": spec.parity_file(info), "metric": spec.metric_file(info)}
    record = StageRecord(
        stage="verify",
        inputs={
            "engine": input_file(engine.path, "engine file"),
            "model": info.fingerprint(),
            "data": {role: input_file(path, "dataset file") for role, path in data_files.items()},
        },
        spec={
            **asdict(spec),
            "resolved_tolerance": asdict(spec.resolved_tolerance()),
            "resolved_max_metric_drop": spec.resolved_metric_drop(),
            "resolved_min_metric_retention": spec.resolved_metric_retention(),
            "engine": dict(engine_spec),
        },
    )
    pooling_in_graph = "sentence_embedding" in engine.output_names
    encoder = Encoder(engine, info, max_length=spec.max_length)

    def body(artifact):
        try:
            outcome = run_verification(
                info=info, encoder=encoder, pooling_in_graph=pooling_in_graph, spec=spec
            )
        except (MemoryError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not _OUT_OF_MEMORY.search(str(err)):
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise EnvironmentProblem(
                f"{label}: verify ran out of memory ({reason}); verify shorter rows with "
                "--max-length, or use a machine with more memory"
            ) from err
        report = {
            "engine": label,
            "split": spec.split,
            "passed": outcome.passed,
            "failures": outcome.failures,
            "parity": outcome.parity,
            "summary": summarize_parity(outcome.parity).to_json(),
            "metric": asdict(outcome.engine_metric),
            "pytorch_metric": asdict(outcome.pytorch_metric),
            "batching": asdict(encoder.batching),
            "speed": outcome.speed,
        }
        atomic_write_text(artifact.path / REPORT_FILE, json.dumps(report, indent=2) + "\n")
        return [REPORT_FILE], report

    return run_stage(record, Path(out_dir), body, force=force)


def require_passed(result: StageResult) -> None:
    """Raise ParityError when a verify result failed; the message lists every failure."""
    if not result.results.get("passed"):
        reasons = "; ".join(result.results.get("failures", [])) or "unknown"
        raise ParityError(
            f"{result.output(REPORT_FILE)}: parity failed ({reasons}); loosen tolerances only with "
            "--max-abs-err/--min-cosine/--max-metric-drop if you accept the difference"
        )
