"""bench: this project's engines against their peers, side by side in one process, on real text
and at fixed shapes.

Real text is the bundled STS-B dev sentences (both columns) or the user's file, repeated to a
minimum count. Every engine-only runner gets the same token rows; tokenization is timed on its
own (the ``tokenizer:`` rows), and end to end, texts in, by each engine through the runtime's
``encode`` and by sentence-transformers' ``encode`` (rows with ``includes_tokenization``). Runners
alternate round by round so that drift on a shared machine hits
them all; the median round's throughput is reported, with per-batch latency percentiles over all
rounds (the GPU synchronised after each batch). Engines run through the runtime (runtime/
encoder.py), which is what serving and verify run; peers run the same rows batched the way a
careful user would: PyTorch in dataset order and length-sorted, ONNX Runtime's own optimizer
(fp16 and CUDA graphs on a GPU) length-sorted, and the engine itself fed in dataset order.

Benchmarks measure; the tests only check that the command works.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import platform
import statistics
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np

from bert_compiler.bench.report import BenchDevice, BenchReport, Measurement
from bert_compiler.bench.roofline import EncoderShape, Roofline, gpu_peak, roofline
from bert_compiler.bench.runners import (
    Runner,
    engine_runner,
    fresh,
    fresh_in_order,
    peer_factories,
    sentence_transformers_factories,
    text_runner,
)
from bert_compiler.calibration import datasets
from bert_compiler.core import progress
from bert_compiler.core.artifacts import tool_versions
from bert_compiler.core.errors import EnvironmentProblem, InputError
from bert_compiler.engines.backend import Engine
from bert_compiler.models.loading import (
    ModelInfo,
    load_tokenizer,
)
from bert_compiler.runtime.encoder import Encoder, load_model_engine, usable_cores
from bert_compiler.runtime.text import Text, encode_texts, iter_file_texts, resolve_max_length
from bert_compiler.runtime.tokenizing import new_row_tokenizer, tokenize_rows
from bert_compiler.runtime.tokens import Tokens
from bert_compiler.stages.layout import Layout

log = logging.getLogger("bert_compile")

# Fixed-shape calls are repeated for at least this long (after a warm-up) per runner and shape.
FIXED_SECONDS = 0.5
# What bench keeps of --data without --limit (a pipe or FIFO may never end): at most this many
# sentences and characters, the first ones, said in a warning.
DATA_MAX_SENTENCES = 1_000_000
DATA_MAX_CHARS = 256 << 20


@dataclass(frozen=True)
class BenchSpec:
    """What bench measures.

    Attributes:
        data: text file (TSV with ``text_column``, or one sentence per line); None: the bundled
            STS-B dev sentences (a cross-encoder's: its pairs).
        text_column: TSV column of ``data``.
        pair_column: a cross-encoder's second text column of ``data``.
        min_sentences: repeat the data to at least this many sentences (0: per device, 12,000
            on a GPU, the data once on a CPU).
        limit: use only the first N sentences of the data (before repeating).
        rounds: timed passes per runner; the median is reported.
        peer_batches: batch sizes of the peers (empty: 32 and 128 on a CPU; 32, 128, 512 and
            1024 on a GPU).
        fixed_shapes: (batch, sequence) shapes timed with all positions real.
        runtime_batches: also run each engine through the runtime at these (row limit, token
            budget) pairs, beside its default batching; a budget of 0 scales the default's
            budget with the row limit.
        tokenizer_workers: also run each engine end to end with encode tokenizing in these
            numbers of processes, beside its default.
        peers: also run the peers (off: engines only).
        max_length: truncation length; None takes the model's.
    """

    data: Path | None = None
    text_column: str = datasets.TEXT_COLUMN
    pair_column: str | None = None
    min_sentences: int = 0
    limit: int | None = None
    rounds: int = 3
    peer_batches: tuple[int, ...] = ()
    fixed_shapes: tuple[tuple[int, int], ...] = ((1, 128), (32, 128))
    runtime_batches: tuple[tuple[int, int], ...] = ()
    tokenizer_workers: tuple[int, ...] = ()
    peers: bool = True
    max_length: int | None = None


def real_sentences(spec: BenchSpec, on_gpu: bool, info: ModelInfo) -> list[Text]:
    """The benchmark's sentences (a cross-encoder's: pairs): the data (limited), repeated to the
    minimum count."""
    sentences: list[Text]
    if spec.data is None:
        pairs = datasets.load_stsb(datasets.STSB_DEV)
        if info.pairs:
            sentences = list(zip(pairs.sentences1, pairs.sentences2, strict=True))
        else:
            sentences = [*pairs.sentences1, *pairs.sentences2]
    else:
        texts = iter_file_texts(
            info,
            Path(spec.data),
            column=spec.text_column,
            pair_column=spec.pair_column,
            flags=("--data-column", "--data-pair-column"),
        )
        # Streamed: with --limit, a file far larger than what is timed is not read whole;
        # without, a stream is read up to the data caps.
        sentences = (
            list(islice(texts, spec.limit)) if spec.limit else _capped(texts, Path(spec.data))
        )
    sentences = sentences[: spec.limit] if spec.limit else sentences
    if not sentences:
        raise InputError(f"{spec.data or datasets.STSB_DEV}: no sentences to benchmark")
    minimum = spec.min_sentences or (12_000 if on_gpu else 0)
    repeats = max(1, -(-minimum // len(sentences)))
    return sentences * repeats


def _capped(texts: Iterator[Text], path: Path) -> list[Text]:
    """The texts up to DATA_MAX_SENTENCES of them or DATA_MAX_CHARS characters, whichever
    comes first (a warning says where the rest were left, and the file is closed there)."""
    kept: list[Text] = []
    chars = 0
    with contextlib.closing(cast(Generator[Text, None, None], texts)):  # a file's reader
        for text in texts:
            chars += sum(map(len, text)) if isinstance(text, tuple) else len(text)
            if len(kept) == DATA_MAX_SENTENCES or chars > DATA_MAX_CHARS:
                log.warning(
                    "[bench] %s: timing its first %d sentences (at most %d sentences or %d MiB "
                    "of text without --limit); pass --limit to choose",
                    path,
                    len(kept),
                    DATA_MAX_SENTENCES,
                    DATA_MAX_CHARS >> 20,
                )
                break
            kept.append(text)
    return kept


def _percentile(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if len(values) else None


def _engine_folders(layout: Layout, model: str, given: Sequence[Path]) -> list[Path]:
    if given:
        # One engine named twice (X, ./X, X/) is timed once.
        unique: dict[Path, Path] = {}
        for folder in given:
            unique.setdefault(Path(folder).resolve(), Path(folder))
        return list(unique.values())
    root = layout.engines(model)
    folders = [f for f in sorted(root.glob("*")) if (f / "manifest.json").is_file()]
    if not folders:
        raise InputError(
            f"{root}: no engines to benchmark; build them with `bert-compile run` (or pass "
            "--engine FOLDER)"
        )
    return folders


def _loadable_engines(
    folders: Sequence[Path], explicit: bool, info: ModelInfo
) -> list[tuple[Path, Engine]]:
    """(folder, engine) for every folder this machine can run; an engine built for another
    device is skipped with a note, unless it was asked for by name. An engine of another model
    is refused (load_model_engine)."""
    loaded = []
    for folder in folders:
        try:
            engine, _manifest = load_model_engine(folder, info)
        except EnvironmentProblem as err:
            if explicit:
                raise
            log.warning("[bench] skipping %s: %s", folder.name, err)
            continue
        loaded.append((folder, engine))
    if not loaded:
        raise InputError("no engine under --out runs on this machine; pass --engine FOLDER")
    return loaded


def run_bench(
    *, info: ModelInfo, layout: Layout, engine_dirs: Sequence[Path], spec: BenchSpec
) -> BenchReport:
    """Measure every engine of ``layout`` (or ``engine_dirs``) and the peers on real text and
    fixed shapes, side by side."""
    engines = _loadable_engines(
        _engine_folders(layout, info.name, engine_dirs), bool(engine_dirs), info
    )
    on_gpu = any(engine.device == "cuda" for _, engine in engines)
    max_length = resolve_max_length(info, spec.max_length)
    tokenizer = load_tokenizer(info)
    sentences = real_sentences(spec, on_gpu, info)

    tokenizer_rows = _time_tokenizers(tokenizer, sentences, info, max_length)
    tokens = tokenize_rows(tokenizer, sentences, info, max_length)
    pad_id = int(tokenizer.pad_token_id or 0)
    setting = _Setting(info, tokenizer, max_length, on_gpu, spec)
    factories: list[Callable[[], Runner]] = []
    for folder, engine in engines:
        if on_gpu and engine.device != "cuda":
            continue  # a CPU engine beside GPU peers measures nothing useful
        factories += _runtime_factories(folder, engine, setting)
        factories += _text_factories(folder, engine, setting, sentences)
        factories.append(partial(fresh_in_order, folder, engine, pad_id, on_gpu))
    if spec.peers:
        factories.extend(peer_factories(info, layout, spec.peer_batches, pad_id, on_gpu))
        factories.extend(sentence_transformers_factories(info, sentences, on_gpu))
    runners, fixed = _measure_all(factories, tokens, setting)
    results = [_tokenizer_row(info, tokens, name, seconds) for name, seconds in tokenizer_rows]
    results += [_real_text_row(info, tokens, runner) for runner in runners]
    results.extend(sorted(fixed, key=lambda row: (row.batch, row.seq)))
    device = _device(on_gpu)
    results, roof = with_roofline(results, info, device, float(tokens.lengths.mean()))
    return BenchReport(
        device=device,
        engine_load="fresh engine per runner, measured in turn"
        if on_gpu
        else "runners alternate round by round",
        sentences=len(tokens),
        data=str(spec.data or datasets.STSB_DEV),
        settings={**asdict(spec), "data": str(spec.data) if spec.data else None},
        versions=tool_versions(),
        results=tuple(results),
        roofline=roof,
    )


@dataclass(frozen=True)
class _Setting:
    """What every runner of one bench shares."""

    info: ModelInfo
    tokenizer: Any
    max_length: int
    on_gpu: bool
    spec: BenchSpec


def _runtime_factories(
    folder: Path, engine: Engine, setting: _Setting
) -> list[Callable[[], Runner]]:
    """The engine through the runtime on token rows: its default batching, the spec's other
    batchings, and (on a GPU) its outputs left there, or (on a CPU) one batch at a time."""
    info, max_length, on_gpu = setting.info, setting.max_length, setting.on_gpu
    probe = Encoder(engine, info, max_length=max_length, tokenizer=setting.tokenizer)
    default, concurrent = probe.batching, probe.concurrent_batches
    variants = [
        replace(
            default,
            max_batch=rows,
            token_budget=budget or rows * default.token_budget // default.max_batch,
        )
        for rows, budget in setting.spec.runtime_batches
    ]
    variants = [v for v in dict.fromkeys(variants) if v != default]
    # On a GPU the default batching also with the outputs left there (what the plain ORT
    # peer does: its outputs are never copied back nor put in input order).
    # On a CPU the default batching also one batch at a time: what running batches at once adds.
    settings = [(default, False, concurrent), *((v, False, concurrent) for v in variants)]
    if on_gpu:
        settings.insert(1, (default, True, concurrent))
    elif concurrent > 1:
        settings.insert(1, (default, False, 1))
    factories: list[Callable[[], Runner]] = []
    for batching, device_outputs, at_a_time in settings:
        at_once = f", {at_a_time} batches at a time" if at_a_time > 1 else ""
        if concurrent > 1 and at_a_time == 1:
            at_once = ", one batch at a time"

        def make(batching=batching, kept=device_outputs, at_a_time=at_a_time, at_once=at_once):
            ladder = f", ladder {list(batching.ladder)}" if batching.ladder else ""
            encoder = Encoder(
                fresh(folder, engine, on_gpu),
                info,
                max_length=max_length,
                batching=batching,
                tokenizer=setting.tokenizer,
                time_batches=True,
                concurrent_batches=at_a_time,
            )
            label = (
                f"length-sorted, <= {batching.max_batch} rows, <= {batching.token_budget} "
                f"tokens{', outputs left on the GPU' if kept else ''}{at_once}{ladder}"
            )
            return engine_runner(f"{folder.name} (runtime)", label, encoder, kept)

        factories.append(make)
    return factories


def _text_factories(
    folder: Path, engine: Engine, setting: _Setting, sentences: list[Text]
) -> list[Callable[[], Runner]]:
    """The engine end to end, texts in: tokenized on a thread (and, on a GPU, its outputs left
    there), then in each of the spec's numbers of tokenizer processes."""
    text_settings: list[tuple[bool, int | None]] = [(False, None)]
    text_settings += [(True, None)] if setting.on_gpu else []
    text_settings += [(False, workers) for workers in setting.spec.tokenizer_workers]
    factories: list[Callable[[], Runner]] = []
    for kept, workers in text_settings:

        def make_text(kept=kept, workers=workers):
            encoder = Encoder(
                fresh(folder, engine, setting.on_gpu),
                setting.info,
                max_length=setting.max_length,
                tokenizer=setting.tokenizer,
                time_batches=True,
                tokenizer_workers=workers,
            )
            workers = encoder.tokenizer_workers
            label = (
                f"length-sorted in windows, <= {encoder.batching.max_batch} rows, "
                f"tokenized {f'in {workers} processes' if workers else 'on a thread'}"
                f"{', outputs left on the GPU' if kept else ''}"
            )
            return text_runner(
                f"{folder.name} (runtime, texts in)", label, encoder, sentences, kept
            )

        factories.append(make_text)
    return factories


def _measure_all(
    factories: Sequence[Callable[[], Runner]], tokens: Tokens, setting: _Setting
) -> tuple[list[Runner], list[Measurement]]:
    """Every runner timed on real text, then at the fixed shapes.

    On a GPU each runner is made, measured and dropped in turn (fresh engine sessions), since
    the CUDA graphs and arenas of a dozen sessions at once crowd the GPU's memory and slow
    whichever runner allocates; on a CPU they alternate round by round."""
    info, spec, on_gpu = setting.info, setting.spec, setting.on_gpu
    measured: set[str] = set()
    if not on_gpu:
        runners = [make() for make in factories]
        _measure(runners, tokens, spec.rounds, on_gpu)
        return runners, _fixed_shapes(info, runners, spec, setting.max_length, on_gpu, measured)
    import torch

    runners, fixed = [], []
    for factory in factories:
        runner = factory()
        _measure([runner], tokens, spec.rounds, on_gpu)
        fixed.extend(_fixed_shapes(info, [runner], spec, setting.max_length, on_gpu, measured))
        runner.run = runner.fixed = None  # type: ignore[assignment]
        runners.append(runner)
        gc.collect()
        torch.cuda.empty_cache()
    return runners, fixed


def _tokenizer_row(info: ModelInfo, tokens: Tokens, name: str, seconds: float) -> Measurement:
    return Measurement(
        model=info.name,
        runner=name,
        data="real",
        batching="all sentences in one call",
        batch=len(tokens),
        seq=None,
        sentences_per_s=round(len(tokens) / seconds, 1),
        tokens_per_s=round(float(tokens.lengths.sum()) / seconds, 1),
        padding_fraction=0.0,
        p50_ms=None,
        p99_ms=None,
        includes_tokenization=True,
    )


def _real_text_row(info: ModelInfo, tokens: Tokens, runner: Runner) -> Measurement:
    seconds = statistics.median(runner.rounds)
    return Measurement(
        model=info.name,
        runner=runner.name,
        data="real",
        batching=runner.batching,
        batch=runner.batch,
        seq=None,
        sentences_per_s=round(len(tokens) / seconds, 1),
        tokens_per_s=round(float(tokens.lengths.sum()) / seconds, 1),
        padding_fraction=round(runner.padding, 4),
        p50_ms=_percentile(runner.batch_ms, 50),
        p99_ms=_percentile(runner.batch_ms, 99),
        includes_tokenization=runner.includes_tokenization,
    )


def with_roofline(
    results: list[Measurement], info: ModelInfo, device: BenchDevice, mean_length: float
) -> tuple[list[Measurement], Roofline | None]:
    """Each engine and peer row with its share of the model's roofline on this GPU at the row's
    own mean length (fixed shapes: their sequence), and the roofline at the data's mean length;
    the rows unchanged and None on a CPU, for a GPU the table lacks, or a config without sizes."""
    peak = gpu_peak(device.name) if device.kind == "cuda" else None
    if peak is None:
        if device.kind == "cuda":
            log.warning("[bench] no roofline: %s is not in bench/roofline.py's table", device.name)
        return results, None
    try:
        shape = EncoderShape.from_config(info.config)
    except InputError as err:
        log.warning("[bench] no roofline: %s", err)
        return results, None
    rows = [
        row
        if row.runner.startswith("tokenizer") or not row.sentences_per_s
        else replace(
            row,
            roofline_fraction=round(
                roofline(shape, peak, row.tokens_per_s / row.sentences_per_s).fraction(
                    row.tokens_per_s
                ),
                4,
            ),
        )
        for row in results
    ]
    return rows, roofline(shape, peak, mean_length)


def _time_tokenizers(
    tokenizer, sentences: list[Text], info: ModelInfo, max_length: int
) -> list[tuple[str, float]]:
    """(runner name, seconds) of tokenizing the sentences alone, one thread: the Hugging Face
    tokenizer's own call, and the runtime's row tokenizer with its piece cache cold (a fresh
    one) and warm (the bench's, once more)."""
    started = time.perf_counter()
    encode_texts(tokenizer, sentences, info, max_length)
    rows = [("tokenizer: Hugging Face fast __call__ (lists)", time.perf_counter() - started)]
    fresh = new_row_tokenizer(tokenizer, max_length)
    started = time.perf_counter()
    fresh.encode(sentences)
    rows.append(
        ("tokenizer: runtime row tokenizer, cold piece cache", time.perf_counter() - started)
    )
    started = time.perf_counter()
    fresh.encode(sentences)
    rows.append(
        ("tokenizer: runtime row tokenizer, warm piece cache", time.perf_counter() - started)
    )
    return rows


def _measure(runners: Sequence[Runner], tokens: Tokens, rounds: int, on_gpu: bool) -> None:
    """A warm-up pass (sessions, allocators, CUDA graphs of every shape), then ``rounds`` timed
    passes, alternating between ``runners``."""
    import torch

    label = runners[0].name if len(runners) == 1 else "all runners"
    for runner in runners:
        runner.run(tokens)
    for _ in progress.bar(range(rounds), desc=f"bench {label}", unit="round"):
        for runner in runners:
            started = time.perf_counter()
            batch_ms, runner.padding = runner.run(tokens)
            if on_gpu:
                torch.cuda.synchronize()
            runner.rounds.append(time.perf_counter() - started)
            runner.batch_ms.extend(batch_ms)
    log.info("[bench] %s: %d rounds timed", label, rounds)


def _fixed_shapes(
    info: ModelInfo,
    runners: Sequence[Runner],
    spec: BenchSpec,
    max_length: int,
    on_gpu: bool,
    measured: set[str],
) -> list[Measurement]:
    """Each runner not in ``measured`` (names, updated) at each fixed shape, every position a
    real token. One engine is several real-text runners (runtime settings, dataset order) but
    one fixed-shape runner: the first of them is timed, the others are skipped."""
    rng = np.random.default_rng(0)
    vocab = int(info.config["vocab_size"])
    shapes = []
    for batch, seq in spec.fixed_shapes:
        seq = min(seq, max_length)
        feeds: dict[str, Any] = {
            "input_ids": rng.integers(min(1000, vocab - 1), vocab, (batch, seq)).astype(np.int64),
            "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64),
        }
        feeds = {n: feeds[n] for n in info.architecture.input_names}
        if on_gpu:
            import torch

            feeds = {n: torch.from_numpy(a).cuda() for n, a in feeds.items()}
        shapes.append((batch, seq, feeds))
    results = []
    for runner in runners:
        name = runner.name.removesuffix(" (fed in dataset order)").removesuffix(" (runtime)")
        if runner.fixed is None or name in measured:
            continue
        measured.add(name)
        for batch, seq, feeds in shapes:
            times = _time_calls(runner.fixed, feeds, on_gpu)
            seconds = statistics.median(times) / 1e3
            results.append(
                Measurement(
                    model=info.name,
                    runner=name,
                    data="fixed",
                    batching="fixed shape",
                    batch=batch,
                    seq=seq,
                    sentences_per_s=round(batch / seconds, 1),
                    tokens_per_s=round(batch * seq / seconds, 1),
                    padding_fraction=0.0,
                    p50_ms=_percentile(times, 50),
                    p99_ms=_percentile(times, 99),
                )
            )
    return results


def _time_calls(run: Callable, feeds: dict[str, Any], on_gpu: bool) -> list[float]:
    def sync():
        if on_gpu:
            import torch

            torch.cuda.synchronize()

    for _ in range(3):
        run(feeds)
    sync()
    times: list[float] = []
    deadline = time.perf_counter() + FIXED_SECONDS
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        run(feeds)
        sync()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def _device(on_gpu: bool) -> BenchDevice:
    if on_gpu:
        import torch

        major, minor = torch.cuda.get_device_capability()
        return BenchDevice(
            "cuda", torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}"
        )
    return BenchDevice("cpu", platform.processor() or platform.machine(), cores=usable_cores())
