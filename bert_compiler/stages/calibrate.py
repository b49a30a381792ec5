"""calibrate: real text -> activation ranges -> an explicit-quantization (Q/DQ) INT8 or fp8 graph.

TensorRT 11 has no implicit calibrators: INT8 must be in the graph. This stage runs the calibration
sentences through the float graph, derives each MatMul input's amax (minmax, percentile, entropy
or mse), and writes the graph with symmetric INT8 Q/DQ on those inputs and per-channel INT8
weights, every scale (also in the manifest), and a TensorRT calibration cache for users of older
TensorRT. With ``--format fp8`` the same inputs get float8 e4m3fn Q/DQ instead (scale = amax / 448,
weights stored as float8), the graph TensorRT's fp8 engine builds from; it goes to its own folder
(OUT/calibrate-fp8, stages/layout.py) and has no calibration cache (that format is INT8 only).

It runs on the standard-ops (simplified, unfused) graph, and the one Q/DQ graph it writes is the
input of both INT8 engines: TensorRT builds from it, and ONNX Runtime turns every Q/DQ MatMul into
MatMulIntegerToFloat. On the CPU that engine ran faster than ORT's dynamic INT8 and scored higher,
while the fused-graph alternative (Q/DQ on the FFN plus dynamic QAttention) ran slower and needs
two quantization recipes (docs/benchmarks.md, "INT8 range methods on STS-B dev";
docs/guides/int8.md).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bert_compiler.calibration import datasets
from bert_compiler.calibration.qdq import (
    INT8,
    QUANTIZED_FORMATS,
    WEIGHT_GRANULARITIES,
    QuantizableMatMul,
    insert_qdq,
    optional_inputs,
    quantizable_matmuls,
)
from bert_compiler.calibration.ranges import (
    METHODS,
    collect_channel_amax,
    collect_histograms,
    compute_amax,
)
from bert_compiler.calibration.sensitivity import Sensitivity, rank_sensitivity
from bert_compiler.calibration.smooth import apply_smoothing, smoothed_name, smoothing_factors
from bert_compiler.core import progress
from bert_compiler.core.artifacts import ArtifactDir, StageRecord, atomic_write_text, input_file
from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.core.onnx_io import load_onnx, onnx_input, op_counts, save_onnx
from bert_compiler.core.stage import StageResult, run_stage
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime.text import (
    Text,
    check_pair_column,
    encode_texts,
    read_texts,
    resolve_max_length,
    tokenize,
)

log = logging.getLogger("bert_compile")

MODEL_FILE = "model.onnx"
SCALES_FILE = "scales.json"
# Every calibrated activation's amax, also those of MatMuls kept in float: keep_float does not
# change them, so a calibration that differs from the previous one only there reuses them.
RANGES_FILE = "ranges.json"
TRT_CACHE_FILE = "calibration.cache"
OUTPUTS = (MODEL_FILE, SCALES_FILE, RANGES_FILE, TRT_CACHE_FILE)
# TensorRT's calibration cache is for implicit INT8 only: an fp8 calibration writes none.
FP8_OUTPUTS = (MODEL_FILE, SCALES_FILE, RANGES_FILE)
# The cache header names the algorithm; TensorRT only reads caches whose header it recognises.
TRT_CACHE_HEADER = "TRT-8601-EntropyCalibration2"


@dataclass(frozen=True)
class CalibrationSpec:
    """Settings of the calibrate stage.

    Attributes:
        method: minmax, percentile, entropy or mse.
        percentile: for ``percentile``: the share of magnitudes kept unclipped. Chosen on the
            selection split (STS-B train pairs, never dev) with `calibrate --sweep`, static
            activations (what TensorRT runs; docs/benchmarks.md, "CPU INT8 chosen on a selection
            split").
        num_samples: sentences used (the first N of the file).
        min_samples: fewer usable sentences than this is an error.
        batch_size: sentences per calibration batch, in file order (realistic mixed lengths).
        bins: histogram bins for percentile and entropy.
        max_length: token limit (None: the model's).
        data: a .tsv/.txt/.jsonl file (None: the bundled calibration sentences).
        text_column: the TSV column or JSONL key holding the text.
        pair_column: the column or key holding a cross-encoder's second text (None: single
            texts); with no ``data``, the bundled STS-B train pairs are read.
        keep_float: MatMul node names to leave in float (the precision fallback fills this).
        quantize_ops: op types (of calibration.qdq.OPTIONAL_QUANTIZED_OPS: Add, LayerNormalization,
            Softmax, Erf, Gelu) whose float inputs get Q/DQ as well; empty keeps them float.
        smooth_alpha: SmoothQuant migration strength for every quantized MatMul input
            (calibration/smooth.py); None leaves activations as they are.
        weight_granularity: ``channel`` (one weight scale per output channel) or ``tensor``
            (one per weight), calibration/qdq.py WEIGHT_GRANULARITIES. The sensitivity ranking
            of the fallback quantizes per channel either way.
        format: the quantized type, calibration/qdq.py QUANTIZED_FORMATS: ``int8`` (every INT8
            engine) or ``fp8`` (float8 e4m3fn, the TensorRT fp8 engine's graph).
    """

    method: str = "percentile"
    percentile: float = 99.99
    num_samples: int = 512
    min_samples: int = 32
    batch_size: int = 32
    bins: int = 2048
    max_length: int | None = None
    data: Path | None = None
    text_column: str = datasets.TEXT_COLUMN
    pair_column: str | None = None
    keep_float: tuple[str, ...] = ()
    quantize_ops: tuple[str, ...] = ()
    smooth_alpha: float | None = None
    weight_granularity: str = "channel"
    format: str = INT8.name

    @property
    def outputs(self) -> tuple[str, ...]:
        """The files this calibration writes."""
        return OUTPUTS if self.format == INT8.name else FP8_OUTPUTS

    def data_file(self) -> Path:
        if self.data:
            return Path(self.data)
        return datasets.CALIBRATION_PAIRS if self.pair_column else datasets.CALIBRATION_SENTENCES

    def texts(self, skipped: datasets.Skipped | None = None) -> Iterator[Text]:
        """The data file's texts (pairs with ``pair_column``), streamed; rows with an empty text
        (or pair side) are left out and counted in ``skipped``."""
        return read_texts(
            self.data_file(),
            column=self.text_column,
            pair_column=self.pair_column,
            skipped=skipped,
        )

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if not 0 < self.percentile <= 100:
            raise InputError(f"--percentile {self.percentile}: must be in (0, 100]")
        if self.num_samples < 1 or self.batch_size < 1 or self.bins < 256:
            raise InputError("--num-samples and --batch-size must be >= 1, bins >= 256")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise InputError(f"--smooth-alpha {self.smooth_alpha}: must be in [0, 1]")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise InputError(
                f"--weight-granularity {self.weight_granularity!r}: expected one of "
                f"{', '.join(WEIGHT_GRANULARITIES)}"
            )
        if self.format not in QUANTIZED_FORMATS:
            raise InputError(
                f"--format {self.format!r}: expected one of {', '.join(QUANTIZED_FORMATS)}"
            )


def calibration_texts(spec: CalibrationSpec) -> tuple[list[Text], dict[str, int]]:
    """The sentences to calibrate on, and counts worth recording (duplicates, shortfall).

    The file is streamed and reading stops once enough distinct sentences are in hand, so a
    file far larger than what is used costs neither the time nor the memory of reading it whole.

    Raises:
        InputError: unreadable file (at its first bad line), or fewer distinct sentences than
            ``min_samples``.
    """
    path = spec.data_file()
    needed = max(spec.num_samples, spec.min_samples)
    distinct: dict[Text, None] = {}
    read = 0
    skipped = datasets.Skipped()
    for text in spec.texts(skipped):
        read += 1
        distinct.setdefault(text)
        if len(distinct) >= needed:
            break
    empty = (
        f"{skipped.rows} rows with an empty text skipped, the first at line {skipped.first_line}"
        if skipped.rows
        else ""
    )
    if len(distinct) < spec.min_samples:
        raise InputError(
            f"{path}: {len(distinct)} distinct sentences{f' ({empty})' if empty else ''}, "
            f"calibration needs at least {spec.min_samples} (ask for fewer with --min-samples "
            "at your own risk)"
        )
    if empty:
        log.warning("[calibrate] %s: %s", path, empty)
    chosen = list(distinct)[: spec.num_samples]
    counts = {
        # Sentences read until enough distinct ones were found (the whole file when it has
        # fewer), the duplicates among them, and the rows left out for an empty text (or pair
        # side) on the way.
        "sentences_read": read,
        "duplicates_dropped": read - len(distinct),
        "empty_rows_skipped": skipped.rows,
        "used": len(chosen),
        "shortfall": max(0, spec.num_samples - len(chosen)),
    }
    return chosen, counts


def calibration_batches(info: ModelInfo, texts: list[Text], spec: CalibrationSpec) -> list[dict]:
    """Token feeds of ``texts`` in file order, ``spec.batch_size`` sentences a batch."""
    tokenizer = load_tokenizer(info)
    max_length = resolve_max_length(info, spec.max_length)
    return [
        tokenize(tokenizer, texts[i : i + spec.batch_size], info, max_length)
        for i in range(0, len(texts), spec.batch_size)
    ]


def trt_calibration_cache(scales: dict[str, float]) -> str:
    """TensorRT's cache text: a header, then ``tensor: scale`` as big-endian float32 hex."""
    lines = [TRT_CACHE_HEADER]
    for name, scale in sorted(scales.items()):
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return "\n".join(lines) + "\n"


def calibrate(
    *,
    info: ModelInfo,
    source: Path,
    out_dir: Path,
    spec: CalibrationSpec = CalibrationSpec(),
    force: bool = False,
) -> StageResult:
    """Calibrate ``source`` on text and write its Q/DQ version (``spec.format``) to ``out_dir``.

    Guarantees: every MatMul with a constant weight (except ``keep_float``) reads Q/DQ inputs of
    ``spec.format``; scales.json and the manifest list every quantized tensor's scale, and the
    manifest the format.

    Raises:
        InputError: bad calibration data or settings, or a graph with nothing to quantize.
    """
    spec.validate()
    source = Path(source)
    max_length = resolve_max_length(info, spec.max_length)
    record = StageRecord(
        stage="calibrate",
        inputs={
            "onnx": onnx_input(source),
            "data": input_file(spec.data_file(), "calibration data file"),
            "model": info.fingerprint(),
        },
        # The outputs are part of the promise: a calibration written before ranges.json
        # existed is not up to date.
        spec={**asdict(spec), "max_length": max_length, "outputs": list(spec.outputs)},
    )

    calibration = _Calibration(info, source, Path(out_dir), spec, record, max_length)
    return run_stage(
        record, Path(out_dir), calibration.body, force=force, prepare=calibration.prepare
    )


class _Calibration:
    """One calibrate run: ``prepare`` reads and checks the data and the graph (the MatMuls to
    quantize, the tensors to range, a previous calibration's ranges to reuse) before the folder
    is touched; ``body`` ranges the tensors and writes the Q/DQ graph."""

    def __init__(
        self,
        info: ModelInfo,
        source: Path,
        out_dir: Path,
        spec: CalibrationSpec,
        record: StageRecord,
        max_length: int,
    ) -> None:
        self.info = info
        self.source = source
        self.out_dir = out_dir
        self.spec = spec
        self.record = record
        self.max_length = max_length
        # What prepare reads.
        self.texts: list[Text] = []
        self.counts: dict[str, int] = {}
        self.model: Any = None
        self.targets: list[QuantizableMatMul] = []
        # The MatMul inputs SmoothQuant scales, and every tensor to range (smoothed names).
        self.smoothed: list[str] = []
        self.activations: list[str] = []
        # The previous calibration's ranges and smoothing factors, when they can be reused.
        self.ranges: dict[str, float] | None = None
        self.smoothing: dict[str, list[float]] | None = None

    def prepare(self) -> None:
        """Raises InputError for bad data, --keep-float naming no quantizable MatMul, or a graph
        with nothing to quantize."""
        spec, source = self.spec, self.source
        # Data and graph are checked before the previous calibration is touched.
        check_pair_column(self.info, spec.data_file(), spec.pair_column, column=spec.text_column)
        self.texts, self.counts = calibration_texts(spec)
        self.model = load_onnx(source)
        targets = quantizable_matmuls(self.model)
        unknown = set(spec.keep_float) - {t.node_name for t in targets}
        if unknown:
            raise InputError(f"--keep-float names no quantizable MatMul: {sorted(unknown)}")
        if not targets:
            raise InputError(f"{source}: no MatMul with a constant weight to quantize")
        self.targets = targets
        extra = optional_inputs(self.model, spec.quantize_ops)
        self.smoothed = sorted({t.activation for t in targets})
        rename = smoothed_name if spec.smooth_alpha is not None else str
        self.activations = sorted(
            {rename(t.activation) for t in targets} | {tensor for *_, tensor in extra}
        )
        # Before the folder is touched: the previous calibration's ranges, if only keep_float
        # differs from this one.
        self.ranges, self.smoothing = _previous_ranges(
            ArtifactDir(self.out_dir), self.record, self.activations
        )

    def body(self, artifact: ArtifactDir) -> tuple[list[str], dict[str, Any]]:
        spec, texts, targets = self.spec, self.texts, self.targets
        tokenizer = load_tokenizer(self.info)
        truncated = sum(
            len(ids) > self.max_length
            for ids in encode_texts(tokenizer, texts, self.info, None)["input_ids"]
        )
        log.info(
            "[calibrate] %d sentences, %d MatMuls (%d kept float), method %s, %s",
            len(texts),
            len(targets),
            len(spec.keep_float),
            spec.method,
            spec.format,
        )
        model, amax, factors = self._ranged_model()
        quantized, scales = insert_qdq(
            model,
            amax,
            exclude=frozenset(spec.keep_float),
            quantize_ops=spec.quantize_ops,
            weight_granularity=spec.weight_granularity,
            format=spec.format,
        )
        self._write(artifact.path, quantized, scales, amax, factors)
        quantized_nodes = [t.node_name for t in targets if t.node_name not in spec.keep_float]
        return list(spec.outputs), {
            **self.counts,
            "sentences_truncated": int(truncated),
            "method": spec.method,
            "format": spec.format,
            "ranges": "reused" if self.ranges is not None else "collected",
            "quantized_matmuls": quantized_nodes,
            "kept_float": list(spec.keep_float),
            "scales": scales,
            "op_counts": op_counts(quantized),
        }

    def _ranged_model(
        self,
    ) -> tuple[Any, dict[str, float], dict[str, list[float]] | None]:
        """The graph to quantize (smoothed, when SmoothQuant is on), every tensor's amax, and
        the smoothing factors (None without): reused from the previous calibration, or collected
        on the calibration sentences."""
        spec, model = self.spec, self.model
        amax, factors = self.ranges, self.smoothing
        if amax is not None:
            log.info("[calibrate] ranges reused: only --keep-float differs from the last one")
        else:
            batches = calibration_batches(self.info, self.texts, spec)
            if spec.smooth_alpha is not None:
                channel_amax = collect_channel_amax(model, self.smoothed, batches)
                factors = smoothing_factors(model, channel_amax, alpha=spec.smooth_alpha)
                model = apply_smoothing(model, factors)
            histograms = collect_histograms(
                model,
                self.activations,
                batches,
                bins=spec.bins,
                progress=lambda it: progress.bar(it, total=len(batches), desc="calibrate"),
            )
            amax = compute_amax(histograms, spec.method, percentile=spec.percentile)
        if factors is not None and self.ranges is not None:
            model = apply_smoothing(model, factors)
        return model, amax, factors

    def _write(
        self,
        folder: Path,
        quantized: Any,
        scales: dict[str, dict],
        amax: dict[str, float],
        factors: dict[str, list[float]] | None,
    ) -> None:
        """The Q/DQ graph, its scales, the ranges (and smoothing factors) and, for INT8,
        TensorRT's calibration cache."""
        save_onnx(quantized, folder / MODEL_FILE)
        atomic_write_text(folder / SCALES_FILE, json.dumps(scales, indent=1) + "\n")
        atomic_write_text(
            folder / RANGES_FILE,
            json.dumps(
                {"amax": amax, **({"smooth": factors} if factors is not None else {})},
                indent=1,
                sort_keys=True,
            )
            + "\n",
        )
        if TRT_CACHE_FILE in self.spec.outputs:
            activation_scales = {
                n: r["scale"] for n, r in scales.items() if r["kind"] == "activation"
            }
            atomic_write_text(folder / TRT_CACHE_FILE, trt_calibration_cache(activation_scales))


def _previous_ranges(
    artifact: ArtifactDir, record: StageRecord, activations: list[str]
) -> tuple[dict[str, float] | None, dict[str, list[float]] | None]:
    """The activation ranges (and smoothing factors, None without) of the calibration in
    ``artifact`` when it differs from ``record`` only in keep_float and has a range for every
    tensor in ``activations`` (else None, None)."""
    path = artifact.reusable_output(record, RANGES_FILE, ignore=("keep_float",))
    if path is None:
        return None, None
    amax = read_ranges(path)
    if amax is None or not set(activations) <= set(amax):
        return None, None
    return amax, read_smoothing(path)


def read_ranges(path: Path) -> dict[str, float] | None:
    """The ``{tensor: amax}`` of a ranges.json (None when it is not shaped like one)."""
    try:
        amax = json.loads(Path(path).read_text(encoding="utf-8")).get("amax")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(amax, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in amax.values()
    ):
        return None
    return {str(k): float(v) for k, v in amax.items()}


def read_smoothing(path: Path) -> dict[str, list[float]] | None:
    """The smoothing factors a ranges.json records (None: none, or not shaped like them)."""
    try:
        factors = json.loads(Path(path).read_text(encoding="utf-8")).get("smooth")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(factors, dict) or not all(
        isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
        for v in factors.values()
    ):
        return None
    return {str(k): [float(x) for x in v] for k, v in factors.items()}


def rank_for_fallback(
    *,
    info: ModelInfo,
    float_source: Path,
    calibrated: StageResult,
    spec: CalibrationSpec,
    sentences: int,
) -> list[Sensitivity]:
    """Rank the quantized MatMuls of ``calibrated`` (not those it keeps in float) by the error
    each alone adds, with the calibration's own ranges.

    Uses the first ``sentences`` calibration sentences (never the evaluation set).
    """
    texts, _ = calibration_texts(spec)
    batches = calibration_batches(info, texts[:sentences], spec)
    amax = read_ranges(calibrated.output(RANGES_FILE))
    if amax is None:
        raise ArtifactError(f"{calibrated.output(RANGES_FILE)}: not a ranges file; rerun --force")
    candidates = calibrated.results["quantized_matmuls"]
    log.info(
        "[fallback] ranking %d MatMuls by the error each alone adds (%d calibration sentences)",
        len(candidates),
        min(sentences, len(texts)),
    )
    float_model = load_onnx(float_source)
    factors = read_smoothing(calibrated.output(RANGES_FILE))
    if factors is not None:
        float_model = apply_smoothing(float_model, factors)
    return rank_sensitivity(
        float_model=float_model,
        amax=amax,
        batches=batches,
        candidates=candidates,
        progress=lambda it: progress.bar(it, total=len(candidates), desc="sensitivity"),
    )
