"""calibrate --sweep: the INT8 method table (SmoothQuant alpha x calibration method x MatMuls
kept float x dynamic activation scope) with the selection-split metric (what choices are read
from), the dev metric (reported only) and the speed against PyTorch fp32, all in one process.

Ranges are collected once per smoothing variant on the calibration sentences (histograms); each
method's amax gives one Q/DQ graph and one CPU INT8 engine built with the pipeline's own build
stage. Kept-float MatMuls are the most sensitive of the fallback's ranking (calibration
sentences, the default method, the unsmoothed graph). Metrics: STS-B Spearman on every k-th pair
of the selection split and of STS-B dev (both files are in genre order, so their first pairs are
captions only). Speed: timed passes over selection sentences in batches of 32, runners
interleaved round by round, median; ratio to PyTorch fp32. Activations are per-tensor in every
row; weights per channel or per tensor (an axis). Peers (ORT's own dynamic INT8 quantization of
the exported and of the fused graph) are scored and timed the same way.

fp8 rows (``formats`` with ``fp8``): the float8 e4m3fn Q/DQ graph of the same grid point, run as
written by ONNX Runtime on the CPU (exact float8 rounding, float math): what a TensorRT fp8 engine
approximates, so its accuracy is known without TensorRT. They have no speed: the CPU has no fp8
GEMM, and timing ORT's reference kernels would say nothing about the GPU engine (``vs_torch`` is
None, printed n/a). The dynamic axis is the CPU INT8 engine's, so fp8 rows do not repeat over it.
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.calibration.qdq import FP8, INT8, insert_qdq, quantizable_matmuls
from bert_compiler.calibration.ranges import collect_channel_amax, collect_histograms, compute_amax
from bert_compiler.calibration.sensitivity import rank_sensitivity
from bert_compiler.calibration.smooth import apply_smoothing, smoothing_factors
from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import load_onnx, save_onnx
from bert_compiler.engines import ort_session
from bert_compiler.engines.backend import BuildSpec
from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime.encoder import Encoder
from bert_compiler.runtime.text import resolve_max_length, tokenize
from bert_compiler.stages.build import build
from bert_compiler.stages.calibrate import (
    CalibrationSpec,
    calibration_batches,
    calibration_texts,
)
from bert_compiler.stages.export import export
from bert_compiler.stages.fallback import FallbackSpec
from bert_compiler.stages.fuse import fuse
from bert_compiler.stages.layout import Layout
from bert_compiler.stages.simplify import simplify
from bert_compiler.stages.sweep_report import SweepPoint, SweepReport, SweepRow
from bert_compiler.stages.verify import (
    compute_metric,
    engine_embedder,
    torch_embedder,
    torch_runner,
)

TIMED_BATCH = 32


@dataclass(frozen=True)
class SweepSpec:
    """The grid and how each row is scored.

    Attributes:
        methods: calibration methods, ``method`` or ``method:percentile``. The default grid is
            kept small enough for minutes on 2 cores (docs/benchmarks.md, "CPU INT8 chosen on a
            selection split"): the chosen recipe (dynamic activations) against the static
            engine at two percentiles.
        dynamic: ``int8_dynamic`` scopes of the CPU INT8 engine (engines/ort_int8.py).
        kept_float: how many of the most sensitive MatMuls stay in float.
        weight_granularity: weight scales per output channel and/or per tensor
            (calibration/qdq.py WEIGHT_GRANULARITIES).
        formats: quantized types (calibration/qdq.py QUANTIZED_FORMATS): ``int8`` rows are CPU
            INT8 engines; ``fp8`` rows are the fp8 Q/DQ graph run as written, scored only.
        smooth_alpha: SmoothQuant alphas (None: unsmoothed).
        pairs: STS-B pairs scored per split (500 is too noisy to choose on).
        selection_data: the selection split's STS-B file (None: the bundled one).
        sentences: selection sentences per timed pass.
        rounds: timed passes per runner; the median is reported.
        threads: ONNX Runtime and PyTorch intra-op threads.
        peers: also score and time ORT's dynamic INT8 quantization.
    """

    methods: tuple[str, ...] = ("percentile:99.99", "percentile:99.999")
    dynamic: tuple[str, ...] = ("none", "all")
    kept_float: tuple[int, ...] = (0,)
    weight_granularity: tuple[str, ...] = ("channel",)
    formats: tuple[str, ...] = (INT8.name,)
    smooth_alpha: tuple[float | None, ...] = (None,)
    pairs: int = 1500
    selection_data: Path | None = None
    sentences: int = 256
    rounds: int = 3
    threads: int = 2
    peers: bool = True


# ORT's dynamic INT8 peers: (label, graph it quantizes, per-channel weights).
PEERS = (
    ("ORT dynamic INT8, exported graph", "export", False),
    ("ORT dynamic INT8, fused, per-channel", "fuse", True),
)


def quiet_engine(engine_dir: Path):
    """Load a built engine, hash-checked against its manifest, with its recorded options but
    idle threads not spinning (side by side in one process, spinning runners slow the others)."""
    folder = ArtifactDir(engine_dir)
    manifest = folder.require_complete()
    options = ort_session.OrtEngineOptions.from_dict(manifest["spec"]["session"])
    engine_file = folder.output_path(manifest["results"]["engine_file"])
    return ort_session.load(engine_file, replace(options, allow_spinning=False))


def peer_session(path: Path, threads: int):
    """An ORT CPU session of a peer's graph: ``threads`` threads, idle ones not spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_dynamic_int8(source: Path, destination: Path, per_channel: bool) -> Path:
    """ORT's own dynamic INT8 quantization of ``source`` (the peer a careful user would try)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(destination),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return destination


def parse_method(text: str) -> tuple[str, float | None]:
    """``percentile:99.99`` -> ("percentile", 99.99); ``entropy`` -> ("entropy", None)."""
    method, _, percentile = text.partition(":")
    return method, float(percentile) if percentile else None


def _strided(path: Path, rows: int, pairs: int, folder: Path) -> Path:
    """Every k-th data row of the STS-B file ``path`` of ``rows`` rows (about ``pairs`` of
    them), streamed, as a sentence1/sentence2/score TSV in ``folder``.

    Raises:
        InputError: fewer than two distinct scores among the rows kept (no Spearman).
    """
    step = max(1, rows // pairs)
    subset = folder / f"{path.stem}-every-{step}.tsv"
    kept, scores = 0, set()
    with open(subset, "w", encoding="utf-8") as handle:
        handle.write("\t".join(datasets.STSB_COLUMNS) + "\n")
        for index, (_, first, second, score) in enumerate(datasets.iter_stsb(path)):
            if index % step or kept == pairs:
                continue
            handle.write(f"{first}\t{second}\t{score}\n")
            kept += 1
            scores.add(score)
    if len(scores) < 2:
        raise InputError(
            f"{path}: the {kept} pairs scored have {len(scores)} distinct "
            "score(s); Spearman needs at least two: give more pairs with varied scores"
        )
    return subset


def check_selection(path: Path, reporting: Path) -> tuple[int, int]:
    """Read the selection split's STS-B file and ``reporting``'s through once each (streamed,
    checked line by line) before any work: their numbers of rows. A split that shares a pair
    with ``reporting`` (the set only reported) is refused, whatever its bytes (a copy with
    other line order, another header or extra rows is still the reported set).

    Raises:
        InputError: a missing or malformed file (at its first bad line), or shared pairs.
    """
    if not path.is_file():
        raise InputError(
            f"--sweep-selection-data {path}: no such file; give an STS-B TSV of train pairs"
        )
    reported_rows, reported = 0, set()
    for _, first, second, _ in datasets.iter_stsb(reporting):
        reported_rows += 1
        reported.add((first, second))
    rows, shared, first_shared = 0, 0, 0
    for number, first, second, _ in datasets.iter_stsb(path):
        rows += 1
        if (first, second) in reported:
            shared += 1
            first_shared = first_shared or number
    if shared:
        raise InputError(
            f"--sweep-selection-data {path}: {shared} of its {rows} pairs (the first at line "
            f"{first_shared}) are STS-B dev pairs, which the sweep only reports; choose on "
            "another split, e.g. a train subset without them"
        )
    return rows, reported_rows


def _label(alpha: float | None, method: str, weights: str, scope: str | None, kept: int) -> str:
    """An INT8 engine row's label; an fp8 row (``scope`` None) starts with ``fp8``."""
    smooth = "none" if alpha is None else alpha
    if scope is None:
        return f"fp8 {method} smooth {smooth} weights {weights} kept-float {kept}"
    return f"{method} smooth {smooth} weights {weights} dynamic {scope} kept-float {kept}"


def _save_variant(quantized, folder: Path) -> Path:
    """A grid point's Q/DQ graph written as ``folder``/model.onnx (through a temporary name)."""
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "model.onnx.tmp"
    save_onnx(quantized, staged)
    os.replace(staged, folder / "model.onnx")
    return folder / "model.onnx"


@dataclass
class _Scored:
    """A row scored on both splits, and what times it (None: scored only)."""

    runner: str
    point: SweepPoint | None
    scores: dict[str, float | None]
    run: Callable[[dict], Any] | None


@dataclass(frozen=True)
class _Variant:
    """One smoothing variant of the float graph with its activation histograms."""

    alpha: float | None
    model: Any
    histograms: Any


def run_sweep(*, info: ModelInfo, layout: Layout, spec: SweepSpec) -> SweepReport:
    """Build every grid point's engine under OUT/sweep/, score and time them beside PyTorch
    fp32."""
    import torch

    if info.pairs or info.task == "sequence-classification":
        raise InputError(
            f"{info.name}: calibrate --sweep scores sentence embeddings on STS-B; "
            "use it on an embedding model"
        )
    selection = Path(spec.selection_data or datasets.STSB_SELECTION)
    # Before the first export: a bad file is one line in seconds, naming the file and line.
    selection_rows, dev_rows = check_selection(selection, datasets.STSB_DEV)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        splits = {
            "selection": _strided(selection, selection_rows, spec.pairs, scratch),
            "dev": _strided(datasets.STSB_DEV, dev_rows, spec.pairs, scratch),
        }
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        torch.set_num_threads(spec.threads)
        graphs = _graphs(info, layout, spec)
        model = load_onnx(graphs["simplify"])
        quantizable = len(quantizable_matmuls(model))
        if max(spec.kept_float) > quantizable:
            raise InputError(
                f"--sweep-kept-float {max(spec.kept_float)}: {info.name} has {quantizable} "
                "quantizable MatMuls; keep at most that many in float"
            )
        calibration = CalibrationSpec()
        texts, _ = calibration_texts(calibration)
        batches = calibration_batches(info, texts, calibration)
        variants = _variants(model, spec, calibration, batches)
        order = _sensitivity_order(model, spec, calibration, batches)

        scorer = _Scorer(info, splits, resolve_max_length(info, None), load_tokenizer(info))
        pairs = datasets.load_stsb(splits["selection"])
        timed = (pairs.sentences1 + pairs.sentences2)[: spec.sentences]
        feeds = [
            tokenize(scorer.tokenizer, timed[i : i + TIMED_BATCH], info, scorer.max_length)
            for i in range(0, len(timed), TIMED_BATCH)
        ]
        scored = [scorer.torch_fp32()]
        if spec.peers:
            for label, graph, per_channel in PEERS:
                quantized_peer = scratch / f"{graph}-dynamic-int8.onnx"
                session = peer_session(
                    ort_dynamic_int8(graphs[graph], quantized_peer, per_channel), spec.threads
                )
                scored.append(scorer.session(label, None, session, timed=True))
        for variant in variants:
            for method_text in spec.methods:
                for point, quantized in _grid(variant, method_text, spec, order):
                    scored.append(scorer.grid_point(point, quantized, layout, spec))
        speeds = _speeds_vs_first([row.run for row in scored], feeds, spec.rounds)
    first = scored[0].scores
    rows = tuple(
        SweepRow(
            runner=row.runner,
            point=row.point,
            selection=row.scores["selection"],
            dev=row.scores["dev"],
            selection_drop=_drop(first["selection"], row.scores["selection"]),
            dev_drop=_drop(first["dev"], row.scores["dev"]),
            vs_torch=speed,
        )
        for row, speed in zip(scored, speeds, strict=True)
    )
    return SweepReport(info.name, selection, spec.pairs, len(timed), spec.rounds, rows)


class _Scorer:
    """Scores runners on both splits with one tokenizer and truncation length."""

    def __init__(self, info: ModelInfo, splits: dict[str, Path], max_length: int, tokenizer):
        self.info, self.splits = info, splits
        self.max_length, self.tokenizer = max_length, tokenizer

    def score(
        self, runner: str, point: SweepPoint | None, embed, run: Callable[[dict], Any] | None
    ) -> _Scored:
        scores = {
            split: compute_metric(embed, self.info, None, path).value
            for split, path in self.splits.items()
        }
        return _Scored(runner, point, scores, run)

    def torch_fp32(self) -> _Scored:
        reference = torch_runner(self.info, pooling_in_graph=True)
        embed = torch_embedder(reference, self.tokenizer, self.info, self.max_length, "torch")
        return self.score("torch fp32", None, embed, reference)

    def session(self, runner: str, point: SweepPoint | None, session, *, timed: bool) -> _Scored:
        embed = _session_embedder(session, self.tokenizer, self.info, self.max_length)
        return self.score(runner, point, embed, session_run(session) if timed else None)

    def grid_point(self, point: SweepPoint, quantized, layout: Layout, spec: SweepSpec) -> _Scored:
        """An INT8 point as the CPU INT8 engine the pipeline builds; an fp8 point as its Q/DQ
        graph run as written, scored only."""
        label = _label(
            point.smooth_alpha,
            point.method,
            point.weight_granularity,
            point.dynamic,
            point.kept_float,
        )
        folder = layout.root / "sweep" / label.replace(" ", "-").replace(":", "")
        if point.format != INT8.name:
            session = peer_session(_save_variant(quantized, folder), spec.threads)
            return self.session(label, point, session, timed=False)
        engine = _int8_engine(quantized, folder, point, spec)
        encoder = Encoder(engine, self.info, max_length=self.max_length)
        return self.score(label, point, engine_embedder(encoder), engine.run)


def _drop(reference: float | None, value: float | None) -> float | None:
    """How far ``value`` fell below PyTorch fp32's (None where either has no value: a constant
    embedding has no Spearman)."""
    return None if reference is None or value is None else reference - value


def _graphs(info: ModelInfo, layout: Layout, spec: SweepSpec) -> dict[str, Path]:
    """The exported and simplified graphs (and, for the peers, the fused one)."""
    exported = export(info=info, out_dir=layout.export)
    simplified = simplify(source=exported.output("model.onnx"), out_dir=layout.simplify)
    graphs = {"export": exported.output("model.onnx"), "simplify": simplified.output("model.onnx")}
    if spec.peers:
        graphs["fuse"] = fuse(info=info, source=graphs["simplify"], out_dir=layout.fuse).output(
            "model.onnx"
        )
    return graphs


def _variants(model, spec: SweepSpec, calibration: CalibrationSpec, batches) -> list[_Variant]:
    """Each smoothing alpha's graph (None: the float graph) with its activation histograms."""
    activations = sorted({t.activation for t in quantizable_matmuls(model)})
    channel_amax = collect_channel_amax(model, activations, batches)
    variants = []
    for alpha in dict.fromkeys(spec.smooth_alpha):
        variant = model
        if alpha is not None:
            variant = apply_smoothing(model, smoothing_factors(model, channel_amax, alpha=alpha))
        names = sorted({t.activation for t in quantizable_matmuls(variant)})
        histograms = collect_histograms(variant, names, batches, bins=calibration.bins)
        variants.append(_Variant(alpha, variant, histograms))
    return variants


def _sensitivity_order(model, spec: SweepSpec, calibration: CalibrationSpec, batches) -> list[str]:
    """The quantizable MatMuls, most sensitive first (the fallback's ranking on the calibration
    sentences, the default method, the unsmoothed graph); empty when none is kept float."""
    if max(spec.kept_float) == 0:
        return []
    activations = sorted({t.activation for t in quantizable_matmuls(model)})
    histograms = collect_histograms(model, activations, batches, bins=calibration.bins)
    amax = compute_amax(histograms, calibration.method, percentile=calibration.percentile)
    rows_used = FallbackSpec().ranking_sentences // calibration.batch_size or 1
    ranking = rank_sensitivity(float_model=model, amax=amax, batches=batches[:rows_used])
    return [s.node for s in ranking]


def _grid(variant: _Variant, method_text: str, spec: SweepSpec, order: list[str]):
    """(grid point, its Q/DQ graph) for one variant and method: the INT8 points (weights x
    kept float x dynamic scope), then the fp8 ones (weights x kept float)."""
    method, percentile = parse_method(method_text)
    amax = compute_amax(variant.histograms, method, percentile=percentile)
    points: list[tuple[str, str, int, str | None]] = []
    if INT8.name in spec.formats:
        grid = itertools.product(spec.weight_granularity, spec.kept_float, spec.dynamic)
        points += [(INT8.name, weights, kept, scope) for weights, kept, scope in grid]
    if FP8.name in spec.formats:
        grid_fp8 = itertools.product(spec.weight_granularity, spec.kept_float)
        points += [(FP8.name, weights, kept, None) for weights, kept in grid_fp8]
    for format_name, weights, kept, scope in points:
        quantized, _ = insert_qdq(
            variant.model,
            amax,
            exclude=frozenset(order[:kept]),
            weight_granularity=weights,
            format=format_name,
        )
        point = SweepPoint(format_name, method_text, variant.alpha, scope, kept, weights)
        yield point, quantized


def _int8_engine(quantized, folder: Path, point: SweepPoint, spec: SweepSpec):
    """The CPU INT8 engine of one grid point, built by the pipeline's own build stage."""
    assert point.dynamic is not None  # every INT8 point has a dynamic scope
    options = OnnxRuntimeBuildOptions(intra_op_num_threads=spec.threads)
    built = build(
        source=_save_variant(quantized, folder),
        out_dir=folder / "engine",
        spec=BuildSpec(precision="int8", options=replace(options, int8_dynamic=point.dynamic)),
    )
    return quiet_engine(built.path)


def _speeds_vs_first(
    runs: list[Callable[[dict], Any] | None], feeds: list[dict], rounds: int
) -> list[float | None]:
    """Each runner's speed as a multiple of the first's (PyTorch fp32): a warm-up call, then
    ``rounds`` timed passes over ``feeds``, runners interleaved round by round, median."""
    timings: list[list[float]] = [[] for _ in runs]
    timed_runners = [(times, run) for times, run in zip(timings, runs, strict=True) if run]
    for _, run in timed_runners:
        run(feeds[0])
    for _ in range(rounds):
        for times, run in timed_runners:
            begun = time.perf_counter()
            for feed in feeds:
                run(feed)
            times.append(time.perf_counter() - begun)
    torch_s = statistics.median(timings[0])
    return [torch_s / statistics.median(times) if times else None for times in timings]


def session_run(session) -> Callable[[dict], Any]:
    """Feeds (possibly with extra inputs) -> the session's outputs."""
    names = [i.name for i in session.get_inputs()]
    return lambda feeds: session.run(None, {n: feeds[n] for n in names})


def _session_embedder(session, tokenizer, info: ModelInfo, max_length: int):
    """Texts -> mean-pooled rows from a peer's session (its graph may pool already)."""
    run = session_run(session)

    def embed(texts):
        rows = []
        for i in range(0, len(texts), TIMED_BATCH):
            feeds = tokenize(tokenizer, texts[i : i + TIMED_BATCH], info, max_length)
            hidden = run(feeds)[0]
            if hidden.ndim == 2:  # the graph pools already
                rows.append(hidden)
                continue
            mask = feeds["attention_mask"][..., None].astype(hidden.dtype)
            rows.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
        return np.concatenate(rows)

    return embed
