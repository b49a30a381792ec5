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
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, cast

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.core import progress
from bert_compiler.core.artifacts import atomic_write_text, tool_versions
from bert_compiler.core.errors import EnvironmentProblem, InputError
from bert_compiler.engines.backend import load_engine
from bert_compiler.engines.batching import BatchingSpec, padding_fraction, plan_batches
from bert_compiler.engines.ort_session import (
    ATTENTION_KERNELS,
    DEFAULT_ATTENTION_KERNELS,
    OrtEngine,
    OrtEngineOptions,
    provider_entries,
)
from bert_compiler.models.loading import (
    ModelInfo,
    build_wrapper,
    load_tokenizer,
    load_torch_model,
)
from bert_compiler.runtime.encoder import (
    Encoder,
    load_model_engine,
    new_row_tokenizer,
    tokenize_rows,
    usable_cores,
)
from bert_compiler.runtime.text import Text, encode_texts, iter_file_texts, resolve_max_length
from bert_compiler.runtime.tokens import Tokens
from bert_compiler.stages.layout import Layout

log = logging.getLogger("bert_compile")

RESULTS_FILE = "bench.json"
CHART_FILE = "bench.png"
TABLE_FILE = "bench.txt"
# Fixed-shape calls are repeated for at least this long (after a warm-up) per runner and shape.
FIXED_SECONDS = 0.5
# A batch size that means "no limit on padded tokens": peers are batched by row count alone.
_UNLIMITED = 1 << 40
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


@dataclass
class _Runner:
    """A runner on real text: ``run(tokens)`` returns per-batch milliseconds and the padding
    fraction; ``fixed(feeds)`` runs one fixed-shape batch (None: not timed there)."""

    name: str
    batching: str
    batch: int
    run: Callable[[Tokens], tuple[list[float], float]]
    fixed: Callable[[dict[str, np.ndarray]], Any] | None = None
    rounds: list[float] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    padding: float = 0.0
    # End to end: ``run`` ignores the shared token rows and encodes the texts itself.
    includes_tokenization: bool = False


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


def _engine_runner(
    name: str, batching: str, encoder: Encoder, device_outputs: bool = False
) -> _Runner:
    def run(tokens: Tokens) -> tuple[list[float], float]:
        encoder.run(tokens, device_outputs=device_outputs)
        return encoder.stats.batch_ms, encoder.stats.padding_fraction

    engine = encoder.engine
    if encoder.packed:
        fixed = _packed_fixed(engine)
    else:
        fixed = engine.run_device if encoder.on_gpu else engine.run
    return _Runner(name, batching, encoder.batching.max_batch, run, fixed)


def _text_runner(
    name: str, batching: str, encoder: Encoder, texts: list[Text], device_outputs: bool = False
) -> _Runner:
    """An engine end to end: the texts in (tokenized by the runtime as ``encode`` does it,
    windows ahead of the engine), outputs out."""

    def run(_tokens: Tokens) -> tuple[list[float], float]:
        encoder.encode(texts, device_outputs=device_outputs)
        return encoder.stats.batch_ms, encoder.stats.padding_fraction

    runner = _Runner(name, batching, encoder.batching.max_batch, run)
    runner.includes_tokenization = True
    return runner


def _sentence_transformers_runner(
    info: ModelInfo, texts: list[Text], batch: int, on_gpu: bool
) -> _Runner:
    """sentence-transformers' ``SentenceTransformer.encode`` on the model folder, end to end
    (its own tokenization and batching, length-sorted inside), fp16 on a GPU, fp32 on a CPU;
    embeddings to host memory as numpy."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(info.path), device="cuda" if on_gpu else "cpu")
    if on_gpu:
        model = model.half()

    def run(_tokens: Tokens) -> tuple[list[float], float]:
        model.encode(texts, batch_size=batch, convert_to_numpy=True, show_progress_bar=False)
        return [], 0.0

    precision = "fp16" if on_gpu else "fp32"
    runner = _Runner(
        f"sentence-transformers {precision} encode", f"its own, batch {batch}", batch, run
    )
    runner.includes_tokenization = True
    return runner


def _packed_fixed(engine: Any) -> Callable[[dict[str, Any]], Any]:
    """A packed-row engine at a fixed shape, fed as the runtime feeds it: every position of a
    fixed shape is a real token, so its rows back to back."""
    import torch

    def run(feeds):
        ids = torch.as_tensor(feeds["input_ids"])
        rows, seq = ids.shape
        types = feeds.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else torch.as_tensor(types)
        lengths = torch.full((rows,), seq, dtype=torch.int64, device=ids.device)
        return engine.run_packed(ids.reshape(-1), types.reshape(-1), lengths, seq)

    return run


def _feeds_runner(
    name: str,
    run_feeds: Callable[[dict[str, Any]], Any],
    *,
    input_names: Sequence[str],
    pad_id: int,
    batch: int,
    sort: bool,
    on_gpu: bool,
) -> _Runner:
    """A peer on real text: rows batched by count (sorted or in dataset order), each batch padded
    to its longest row; on a GPU the batches are uploaded before timing (in the peer's favour)."""
    prepared: dict[int, tuple[list, float]] = {}

    def run(tokens: Tokens) -> tuple[list[float], float]:
        key = id(tokens)
        if key not in prepared:
            prepared.clear()
            batches = plan_batches(tokens.lengths, BatchingSpec(batch, _UNLIMITED, sort=sort))
            matrices = tokens.matrices(input_names, pad_id)
            feeds: list[dict[str, Any]] = [
                {n: m[b.rows, : b.length] for n, m in matrices.items()} for b in batches
            ]
            if on_gpu:
                import torch

                feeds = [{n: torch.from_numpy(a).cuda() for n, a in f.items()} for f in feeds]
            prepared[key] = (feeds, padding_fraction(batches, tokens.lengths))
        feeds, padding = prepared[key]
        times = []
        for item in feeds:
            started = time.perf_counter()
            run_feeds(item)
            if on_gpu:
                import torch

                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
        return times, padding

    batching = f"{'length-sorted' if sort else 'dataset order'}, batch {batch}"
    return _Runner(name, batching, batch, run, run_feeds)


def _torch_runner(info: ModelInfo, on_gpu: bool) -> Callable[[dict[str, Any]], Any]:
    import torch

    wrapper = build_wrapper(info, load_torch_model(info, attn_implementation=None))
    if on_gpu:
        wrapper = wrapper.half().cuda()
    names = info.architecture.input_names

    def run(feeds):
        with torch.inference_mode():
            args = [
                f if isinstance(f, torch.Tensor) else torch.from_numpy(f)
                for f in (feeds[n] for n in names)
            ]
            return wrapper(*args)

    return run


def plain_ort_engine(
    info: ModelInfo, exported: Path, folder: Path, on_gpu: bool, attention: str = "default"
) -> OrtEngine:
    """The ONNX Runtime peer: ORT's transformer optimizer on the exported graph (and, on a GPU,
    its fp16 conversion and CUDA graphs), nothing of this project's but, when asked, its choice
    of attention kernels (``attention``: engines/ort_session.py ATTENTION_KERNELS)."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    destination = folder / ("ort-plain-fp16.onnx" if on_gpu else "ort-plain-fp32.onnx")
    if not destination.is_file():
        model = optimize_model(
            str(exported),
            model_type=info.architecture.ort_optimizer_type,
            num_heads=info.num_heads,
            hidden_size=info.hidden_size,
            use_gpu=on_gpu,
        )
        if on_gpu:
            model.convert_float_to_float16(keep_io_types=True)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_model_to_file(str(destination))
    options = OrtEngineOptions(
        device="cuda" if on_gpu else "cpu",
        fp16=on_gpu,
        cuda_graph=on_gpu,
        attention_kernels=attention if on_gpu else "default",
    )
    entries = provider_entries(options, None)
    session = ort.InferenceSession(
        str(destination),
        providers=[name for name, _ in entries],
        provider_options=[opts for _, opts in entries],
    )
    return OrtEngine(session, entries[0][0], destination, options)


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
) -> list[tuple[Path, Any]]:
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
) -> dict[str, Any]:
    """Measure, and return bench's JSON object (``device``, ``results``, settings)."""
    import torch

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

    # Factories: on a GPU each runner is made, measured and dropped in turn (fresh engine
    # sessions), since the CUDA graphs and arenas of a dozen sessions at once crowd the GPU's
    # memory and slow whichever runner allocates; on a CPU they alternate round by round.
    factories: list[Callable[[], _Runner]] = []
    for folder, engine in engines:
        if on_gpu and engine.device != "cuda":
            continue  # a CPU engine beside GPU peers measures nothing useful
        probe = Encoder(engine, info, max_length=max_length, tokenizer=tokenizer)
        default, concurrent = probe.batching, probe.concurrent_batches
        variants = [
            replace(
                default,
                max_batch=rows,
                token_budget=budget or rows * default.token_budget // default.max_batch,
            )
            for rows, budget in spec.runtime_batches
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
        for batching, device_outputs, at_a_time in settings:
            at_once = f", {at_a_time} batches at a time" if at_a_time > 1 else ""
            if concurrent > 1 and at_a_time == 1:
                at_once = ", one batch at a time"

            def make(
                folder=folder,
                engine=engine,
                batching=batching,
                kept=device_outputs,
                at_a_time=at_a_time,
                at_once=at_once,
            ):
                ladder = f", ladder {list(batching.ladder)}" if batching.ladder else ""
                encoder = Encoder(
                    _fresh(folder, engine, on_gpu),
                    info,
                    max_length=max_length,
                    batching=batching,
                    tokenizer=tokenizer,
                    time_batches=True,
                    concurrent_batches=at_a_time,
                )
                label = (
                    f"length-sorted, <= {batching.max_batch} rows, <= {batching.token_budget} "
                    f"tokens{', outputs left on the GPU' if kept else ''}{at_once}{ladder}"
                )
                return _engine_runner(f"{folder.name} (runtime)", label, encoder, kept)

            factories.append(make)
        text_settings: list[tuple[bool, int | None]] = [(False, None)]
        text_settings += [(True, None)] if on_gpu else []
        text_settings += [(False, workers) for workers in spec.tokenizer_workers]
        for kept, workers in text_settings:

            def make_text(folder=folder, engine=engine, kept=kept, workers=workers):
                encoder = Encoder(
                    _fresh(folder, engine, on_gpu),
                    info,
                    max_length=max_length,
                    tokenizer=tokenizer,
                    time_batches=True,
                    tokenizer_workers=workers,
                )
                workers = encoder.tokenizer_workers
                label = (
                    f"length-sorted in windows, <= {encoder.batching.max_batch} rows, "
                    f"tokenized {f'in {workers} processes' if workers else 'on a thread'}"
                    f"{', outputs left on the GPU' if kept else ''}"
                )
                return _text_runner(
                    f"{folder.name} (runtime, texts in)", label, encoder, sentences, kept
                )

            factories.append(make_text)
        factories.append(partial(_fresh_in_order, folder, engine, pad_id, on_gpu))
    if spec.peers:
        factories.extend(_peer_factories(info, layout, spec, pad_id, on_gpu))
        factories.extend(_sentence_transformers_factories(info, sentences, on_gpu))

    runners: list[_Runner] = []
    fixed: list[Measurement] = []
    measured: set[str] = set()
    if on_gpu:
        for factory in factories:
            runner = factory()
            _measure([runner], tokens, spec.rounds, on_gpu)
            fixed.extend(_fixed_shapes(info, [runner], spec, max_length, on_gpu, measured))
            runner.run = runner.fixed = None  # type: ignore[assignment]
            runners.append(runner)
            gc.collect()
            torch.cuda.empty_cache()
    else:
        runners = [make() for make in factories]
        _measure(runners, tokens, spec.rounds, on_gpu)
        fixed = _fixed_shapes(info, runners, spec, max_length, on_gpu, measured)

    results = [
        Measurement(
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
        for name, seconds in tokenizer_rows
    ]
    total_tokens = float(tokens.lengths.sum())
    for runner in runners:
        seconds = statistics.median(runner.rounds)
        results.append(
            Measurement(
                model=info.name,
                runner=runner.name,
                data="real",
                batching=runner.batching,
                batch=runner.batch,
                seq=None,
                sentences_per_s=round(len(tokens) / seconds, 1),
                tokens_per_s=round(total_tokens / seconds, 1),
                padding_fraction=round(runner.padding, 4),
                p50_ms=_percentile(runner.batch_ms, 50),
                p99_ms=_percentile(runner.batch_ms, 99),
                includes_tokenization=runner.includes_tokenization,
            )
        )
    results.extend(sorted(fixed, key=lambda row: (row.batch, row.seq)))
    return {
        "ok": True,
        "device": _device(on_gpu),
        "engine_load": "fresh engine per runner, measured in turn"
        if on_gpu
        else "runners alternate round by round",
        "sentences": len(tokens),
        "data": str(spec.data or datasets.STSB_DEV),
        "spec": {**asdict(spec), "data": str(spec.data) if spec.data else None},
        "versions": tool_versions(),
        "results": [asdict(r) for r in results],
    }


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


def _sentence_transformers_factories(
    info: ModelInfo, sentences: list[Text], on_gpu: bool
) -> list[Callable[[], _Runner]]:
    """The peer users know for embeddings, at its default batch (32) and a large one; none for
    a classifier, or where sentence-transformers is not installed (said in a warning)."""
    import importlib.util

    if info.task != "sentence-embedding":
        return []
    if importlib.util.find_spec("sentence_transformers") is None:
        log.warning("[bench] sentence-transformers is not installed: no end-to-end peer")
        return []
    return [
        partial(_sentence_transformers_runner, info, sentences, batch, on_gpu)
        for batch in (32, 1024 if on_gpu else 256)
    ]


def _fresh(folder: Path, loaded: Any, on_gpu: bool) -> Any:
    """A newly loaded engine on a GPU (its graphs and arena go with the runner), else the one
    already loaded."""
    return load_engine(folder)[0] if on_gpu else loaded


def _fresh_in_order(folder: Path, engine: Any, pad_id: int, on_gpu: bool) -> _Runner:
    """The engine itself fed in dataset order, loaded afresh on a GPU (_fresh)."""
    return _engine_in_order(folder.name, _fresh(folder, engine, on_gpu), pad_id, on_gpu)


def _engine_in_order(name: str, engine: Any, pad_id: int, on_gpu: bool) -> _Runner:
    """The engine fed as without the runtime: dataset order, each batch padded to its longest
    row (batch 128 on a GPU, 32 on a CPU)."""
    return _feeds_runner(
        f"{name} (fed in dataset order)",
        engine.run_device if on_gpu else engine.run,
        input_names=engine.input_names,
        pad_id=pad_id,
        batch=128 if on_gpu else 32,
        sort=False,
        on_gpu=on_gpu,
    )


def _peer_factories(
    info: ModelInfo, layout: Layout, spec: BenchSpec, pad_id: int, on_gpu: bool
) -> list[Callable[[], _Runner]]:
    """PyTorch in dataset order and length-sorted, and plain ONNX Runtime length-sorted."""
    torch_run = _torch_runner(info, on_gpu)
    label = "torch fp16 eager" if on_gpu else "torch fp32 eager"
    batches = spec.peer_batches or ((32, 128, 512, 1024) if on_gpu else (32, 128))
    common: dict[str, Any] = {
        "input_names": list(info.architecture.input_names),
        "pad_id": pad_id,
        "on_gpu": on_gpu,
    }
    factories: list[Callable[[], _Runner]] = [
        lambda: _feeds_runner(label, torch_run, batch=128 if on_gpu else 32, sort=False, **common)
    ]
    for batch in batches:
        factories.append(partial(_feeds_runner, label, torch_run, batch=batch, sort=True, **common))
    exported = layout.export / "model.onnx"
    if not exported.is_file():
        log.warning("[bench] %s missing: no plain ONNX Runtime peer", exported)
        return factories
    if on_gpu and "CUDAExecutionProvider" not in _ort_providers():
        log.warning("[bench] ONNX Runtime has no CUDA provider here: no plain ONNX Runtime peer")
        return factories
    folder = layout.root / "bench" / "peers"
    plain_label = (
        "ORT fp16 + CUDA graphs (ORT's optimizer)" if on_gpu else "ORT fp32 (ORT's optimizer)"
    )
    shared = None if on_gpu else plain_ort_engine(info, exported, folder, on_gpu)

    def plain_runner(batch: int, attention: str = "default") -> _Runner:
        plain = shared or plain_ort_engine(info, exported, folder, on_gpu, attention)
        run = plain.run_device if on_gpu else plain.run
        label = plain_label + (f", {attention} attention kernels" if attention != "default" else "")
        return _feeds_runner(label, run, batch=batch, sort=True, **common)

    # With CUDA graphs every distinct padded shape keeps its own graph and buffers: small
    # batches of exact lengths would make hundreds of them.
    for batch in [b for b in batches if b >= 128] if on_gpu else batches:
        factories.append(partial(plain_runner, batch))
    if on_gpu:
        # The same peer with the other attention kernels, at its largest batch: what that one
        # setting is worth apart from the runtime.
        other = next(k for k in ATTENTION_KERNELS if k != DEFAULT_ATTENTION_KERNELS)
        factories.append(lambda: plain_runner(max(batches), other))
    return factories


def _ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _measure(runners: Sequence[_Runner], tokens: Tokens, rounds: int, on_gpu: bool) -> None:
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
    runners: Sequence[_Runner],
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


def _device(on_gpu: bool) -> dict[str, Any]:
    if on_gpu:
        import torch

        major, minor = torch.cuda.get_device_capability()
        return {
            "kind": "cuda",
            "name": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}",
        }
    return {
        "kind": "cpu",
        "name": platform.processor() or platform.machine(),
        "cores": usable_cores(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The results as a fixed-width table."""
    header = (
        f"{'runner':<52} {'data':<5} {'batching':<44} {'sent/s':>10} {'pad':>5} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    lines = [header]
    for row in report["results"]:
        shape = f"{row['batch']}x{row['seq']}" if row["data"] == "fixed" else row["batching"]
        lines.append(
            f"{row['runner'][:52]:<52} {row['data']:<5} {shape[:44]:<44} "
            f"{row['sentences_per_s']:>10,.0f} {row['padding_fraction']:>5.0%} "
            f"{_ms(row['p50_ms']):>8} {_ms(row['p99_ms']):>8}"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_chart(report: dict[str, Any], path: Path) -> Path | None:
    """A bar chart of real-text throughput per runner (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("[bench] no chart: matplotlib is not installed")
        return None
    rows = [r for r in report["results"] if r["data"] == "real" and "tokenizer" not in r["runner"]]
    labels = [f"{r['runner']}\n{r['batching']}" for r in rows]
    figure, axes = plt.subplots(figsize=(10, 0.5 * len(rows) + 1.5))
    axes.barh(range(len(rows)), [r["sentences_per_s"] for r in rows], color="tab:blue")
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("sentences/s")
    device = report["device"]["name"]
    axes.set_title(
        f"{rows[0]['model'] if rows else ''} on {device}: {report['sentences']} sentences"
    )
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png", dpi=110)
    plt.close(figure)
    temporary.replace(path)
    return path


def write_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """bench.json, bench.txt and bench.png (when matplotlib is there) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {"json": folder / RESULTS_FILE, "table": folder / TABLE_FILE}
    atomic_write_text(written["json"], json.dumps(report, indent=2) + "\n")
    atomic_write_text(written["table"], format_table(report) + "\n")
    chart = write_chart(report, folder / CHART_FILE)
    if chart is not None:
        written["chart"] = chart
    return written
