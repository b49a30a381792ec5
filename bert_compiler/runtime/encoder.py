"""The runtime: an engine and its tokenizer, texts in, outputs back in input order.

Every engine (ONNX Runtime on the CPU or CUDA, TensorRT) is driven the same way: the texts are
tokenized once, rows are sorted by length and grouped under a token budget and a row limit, each
group is padded to a rung of the length ladder (engines/batching.py), and each output row goes
back to its input position. On a GPU the token matrix is copied to the device once (through pinned
host memory) and each batch is gathered there, so an engine call waits for no host work; with a
CUDA-graph engine the shapes are bounded (ladder rungs x power-of-two row counts), so every graph
is captured once and replayed. A packed-attention engine (engines/packed_attention.py) takes the
same padded batches and runs without CUDA graphs; its ORT run waits once for the GPU inside
(RemovePadding sizes its output by the batch's valid tokens), so its batches are not queued ahead.
On a CPU, batches run two at a time on one session of the engine (CPU_CONCURRENT_BATCHES), where
there are two cores or more and the engine's build left its thread count to ONNX Runtime.
verify runs engines through this module, so what is verified is what is served.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.core import progress
from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.engines.backend import Engine, load_engine
from bert_compiler.engines.batching import (
    Batch,
    BatchingSpec,
    plan_batches,
)
from bert_compiler.models.loading import ModelInfo, load_tokenizer, output_name
from bert_compiler.runtime.outputs import BatchTimer, Collector, GpuOutputs
from bert_compiler.runtime.text import (
    Text,
    resolve_max_length,
    text_list,
    text_windows,
)
from bert_compiler.runtime.tokenizing import (
    check_rows,
    checked_window,
    checked_windows,
    ladder_from_text,
    row_tokenizer,
    tokenize_checked,
    tokenize_on_a_thread,
    tokenizer_pool,
    window_sizes,
)
from bert_compiler.runtime.tokens import PinnedStaging, Tokens

log = logging.getLogger("bert_compile")

# Rows per device upload: bounds the device copy of the token matrix (and, for token outputs, the
# host copy of the results) whatever the input size.
CHUNK_ROWS = 65536
# Defaults per device. A CPU gains nothing from big batches or a ladder (no graphs: every batch
# padded to its own longest row). A GPU wants full batches with a narrow span of lengths; its
# default was chosen on the calibration sentences (docs/benchmarks.md).
CPU_BATCHING = BatchingSpec(max_batch=32, token_budget=4096)
# A CPU engine whose thread count its build left to ONNX Runtime runs this many batches at once,
# on one session of its own (``with_threads``): short rows leave a run's helper threads waiting
# at every sync point. Chosen on the calibration sentences (docs/benchmarks.md,
# docs/cpu-bench/2026-11-24-xeon-16/).
CPU_CONCURRENT_BATCHES = 2
GPU_BATCHING = BatchingSpec(max_batch=1024, token_budget=32768, round_rows=True)
# A packed-row engine on a GPU (the torch backend) launches its large batches eagerly (its CUDA
# graphs are for small ones), so fewer, larger batches pay for its kernel launches. Chosen on
# the calibration sentences (docs/gpu-bench/2026-11-24-h100-torch/).
PACKED_GPU_BATCHING = BatchingSpec(max_batch=4096, token_budget=131072)


def _merged_stats(parts: Sequence[RunStats]) -> RunStats:
    """The stats of several runs as of one."""
    return RunStats(
        rows=sum(p.rows for p in parts),
        batches=sum(p.batches for p in parts),
        batch_ms=[ms for p in parts for ms in p.batch_ms],
        shape_set=frozenset().union(*(p.shape_set for p in parts)),
        tokens=sum(p.tokens for p in parts),
        computed=sum(p.computed for p in parts),
    )


def load_model_engine(engine_dir: Path, info: ModelInfo) -> tuple[Any, dict[str, Any]]:
    """(engine, manifest) of an engine folder built from ``info``'s model (by the hash of
    the model's files, wherever they lie; an engine built from a graph given by path records
    no model, and its outputs are checked when an Encoder takes it).

    Raises:
        InputError: the engine records another model.
        ArtifactError, EnvironmentProblem: as load_engine.
    """
    engine, manifest = load_engine(engine_dir)
    built_from = manifest.get("inputs", {}).get("model")
    if isinstance(built_from, dict) and built_from.get("sha256") != info.fingerprint()["sha256"]:
        raise InputError(
            f"{engine_dir}: built from the model in {built_from.get('path')}, not from "
            f"{info.path}; give that model (--model {built_from.get('path')}) or build an "
            "engine of this one"
        )
    return engine, manifest


def _check_outputs(engine: Engine, info: ModelInfo) -> None:
    """An engine of ``info``'s kind: one of its outputs is the model's (an engine of another
    model's kind would be fed texts it does not read, and its outputs taken for the model's).

    Raises:
        InputError: none of the engine's outputs is one the model's export writes.
    """
    expected = {output_name(info, pooling_in_graph=pooled) for pooled in (True, False)}
    names = list(engine.output_names)
    if not expected & set(names):
        raise InputError(
            f"{engine.path}: outputs {names}, and {info.name} ({info.task}) exports "
            f"{' or '.join(sorted(expected))}: an engine of another model; pass the --model it "
            "was built from"
        )


# encode tokenizes in worker processes (token_rows.TokenizerPool) on a GPU engine's host with at
# least this many usable cores, for inputs of at least POOL_MIN_TEXTS texts (or of unknown
# length), in at most TOKENIZER_WORKERS_MAX processes; smaller inputs never wait for a pool.
POOL_MIN_CORES = 4
POOL_MIN_TEXTS = 8192
TOKENIZER_WORKERS_MAX = 8


@dataclass
class RunStats:
    """What the last ``run`` did: rows, batches, distinct shapes, the share of computed positions
    that were padding, and (when the Encoder times batches) each batch's milliseconds."""

    rows: int = 0
    batches: int = 0
    batch_ms: list[float] = field(default_factory=list)
    # The distinct (rows, length) shapes run, the real tokens, and the positions computed.
    shape_set: frozenset = frozenset()
    tokens: int = 0
    computed: int = 0

    @property
    def shapes(self) -> int:
        return len(self.shape_set)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.computed if self.computed else 0.0


class Encoder:
    """Runs an engine on texts or token rows, batched by length, results in input order.

    Outputs with a row per input (pooled embeddings, logits) come back as one array [rows, ...];
    token outputs (``last_hidden_state``) as a list with one [length, hidden] array per row.
    """

    def __init__(
        self,
        engine,
        info: ModelInfo,
        *,
        max_length: int | None = None,
        batching: BatchingSpec | None = None,
        tokenizer=None,
        time_batches: bool = False,
        concurrent_batches: int | None = None,
        tokenizer_workers: int | None = None,
    ):
        """``tokenizer_workers``: processes ``encode`` tokenizes large inputs in (default: on
        a GPU engine's host of POOL_MIN_CORES cores or more, one per core but one, at most
        TOKENIZER_WORKERS_MAX; 0 elsewhere: a thread). ``concurrent_batches``: batches a CPU
        engine runs at once (default
        CPU_CONCURRENT_BATCHES, at most the usable cores; 1 where the engine cannot run in a
        session of other threads, or its build recorded a thread count; 1 from the first run
        that finds the engine file changed since it was loaded: that session is made from the
        file)."""
        _check_outputs(engine, info)
        self.engine = engine
        # Per-batch time, by CUDA events or the clock (benchmarks only).
        self.time_batches = time_batches
        self.info = info
        self.max_length = resolve_max_length(info, max_length)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info)
        self.row_tokenizer = row_tokenizer(self.tokenizer, self.max_length)
        self.on_gpu = engine.device == "cuda"
        # An engine that runs packed rows (engines/torch_encoder.py) is given each batch's real
        # tokens back to back: no padding, so no ladder either.
        self.packed = engine.packed_rows
        if batching is None and self.packed:
            batching = PACKED_GPU_BATCHING if self.on_gpu else CPU_BATCHING
        elif batching is None:
            batching = GPU_BATCHING if self.on_gpu else CPU_BATCHING
            if self.on_gpu and not batching.ladder:
                ladder = ladder_from_text(self.tokenizer, info, self.max_length)
                batching = replace(batching, ladder=ladder)
        if engine.max_batch is not None and batching.max_batch > engine.max_batch:
            batching = replace(batching, max_batch=engine.max_batch)
        batching.validate()
        if batching.ladder and batching.ladder[-1] < self.max_length:
            raise InputError(
                f"length ladder {list(batching.ladder)}: its top rung must reach the maximum "
                f"length {self.max_length}, or longer rows could not run"
            )
        self.batching = batching
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.stats = RunStats()
        # Two pieces are in flight at once (_pipelined), each staged through its own buffers.
        self._stagings = (PinnedStaging(), PinnedStaging())
        if concurrent_batches is not None and concurrent_batches < 1:
            raise InputError(f"concurrent batches {concurrent_batches}: give 1 or more")
        asked = CPU_CONCURRENT_BATCHES if concurrent_batches is None else concurrent_batches
        self.concurrent_batches = (
            min(asked, usable_cores())
            if engine.concurrent_runs and not self.on_gpu and not self.packed
            else 1
        )
        if tokenizer_workers is not None and tokenizer_workers < 0:
            raise InputError(f"tokenizer workers {tokenizer_workers}: give 0 or more")
        cores = usable_cores()
        self.tokenizer_workers = (
            tokenizer_workers
            if tokenizer_workers is not None
            else min(TOKENIZER_WORKERS_MAX, cores - 1)
            if self.on_gpu and cores >= POOL_MIN_CORES
            else 0
        )

    @classmethod
    def open(cls, engine_dir: Path, info: ModelInfo, **kwargs: Any) -> Encoder:
        """An Encoder over an engine folder (files checked against its manifest first, and
        the model it was built from against ``info``: load_model_engine)."""
        engine, _manifest = load_model_engine(Path(engine_dir), info)
        return cls(engine, info, **kwargs)

    def with_batching(self, batching: BatchingSpec) -> Encoder:
        """The same engine and tokenizer with other batching."""
        return Encoder(
            self.engine,
            self.info,
            max_length=self.max_length,
            batching=batching,
            tokenizer=self.tokenizer,
            time_batches=self.time_batches,
            concurrent_batches=self.concurrent_batches,
            tokenizer_workers=self.tokenizer_workers,
        )

    def tokenize(self, texts: Sequence[Text]) -> Tokens:
        return tokenize_checked(self.row_tokenizer, text_list(texts), self.info)

    def encode(
        self, texts: Iterable[Text], desc: str | None = None, *, device_outputs: bool = False
    ) -> dict[str, Any]:
        """Outputs for ``texts`` in their order (``desc``: a progress bar of that name;
        ``device_outputs``: see ``run``); a cross-encoder's texts are (text, text_pair) pairs,
        its output one score per pair. Tokenized in windows ahead of the engine (``stream``);
        ``stats`` covers every window."""
        parts, stats = [], []
        for outputs in self.stream(texts, desc=desc, device_outputs=device_outputs):
            parts.append(outputs)
            stats.append(self.stats)
        if not parts:
            raise InputError("no texts to encode")
        self.stats = _merged_stats(stats)
        return {name: _joined([part[name] for part in parts]) for name in parts[0]}

    def stream(
        self, texts: Iterable[Text], desc: str | None = None, *, device_outputs: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Outputs window by window, in input order, for ``texts`` of any length (a list or
        an iterator): each window (WINDOW_FIRST texts, doubling up to WINDOW_ROWS) is tokenized
        while the engine runs the one before it, in ``tokenizer_workers`` processes where the
        input is large enough to pay for them, else on a thread; sorted by length within the
        window. Memory holds a few windows, whatever the input's length.

        Raises:
            InputError: as ``tokenize`` and ``run``, naming a text by its index in ``texts``.
        """
        windows = checked_windows(text_windows(texts, window_sizes()), self.info)
        # A list's length (for the progress bar and the pool's threshold); an iterator has none.
        total = (
            len(texts)
            if isinstance(texts, Sequence) and not isinstance(texts, (str, bytes))
            else None
        )
        use_pool = self.tokenizer_workers > 0 and (total is None or total >= POOL_MIN_TEXTS)
        tokenized = (
            tokenizer_pool(self.row_tokenizer, self.tokenizer_workers).map_windows(windows)
            if use_pool
            else tokenize_on_a_thread(self.row_tokenizer, windows)
        )
        shown = progress.bar(desc=desc, total=total, unit="text") if desc else None

        def pieces() -> Iterator[Tokens]:
            for start, window, encoded in tokenized:
                yield checked_window(encoded, window, self.info, start)

        try:
            for outputs, stats in self._pipelined(pieces(), None, device_outputs):
                self.stats = stats
                yield outputs
                if shown is not None:
                    shown.update(stats.rows)
        finally:
            if shown is not None:
                shown.close()
            tokenized.close()

    def plan(self, tokens: Tokens) -> list[Batch]:
        return plan_batches(tokens.lengths, self.batching)

    def run(
        self, tokens: Tokens, desc: str | None = None, *, device_outputs: bool = False
    ) -> dict[str, Any]:
        """Outputs for token rows in their order (``desc``: a progress bar of that name, shown
        where core.progress shows bars). With ``device_outputs`` (a CUDA engine only) the
        outputs with a row per input stay on the GPU as torch tensors, for a caller that goes
        on there (a similarity search, a reranker)."""
        if not len(tokens):
            raise InputError("no token rows to run")
        check_rows(tokens, self.info, self.max_length)
        chunks = (
            tokens
            if len(tokens) <= CHUNK_ROWS
            else tokens.select(np.arange(start, min(start + CHUNK_ROWS, len(tokens))))
            for start in range(0, len(tokens), CHUNK_ROWS)
        )
        parts = list(self._pipelined(chunks, desc, device_outputs))
        self.stats = _merged_stats([stats for _outputs, stats in parts])
        return {name: _joined([outputs[name] for outputs, _ in parts]) for name in parts[0][0]}

    def _pipelined(
        self, pieces: Iterable[Tokens], desc: str | None, device_outputs: bool
    ) -> Iterator[tuple[dict[str, Any], RunStats]]:
        """(outputs, stats) of each piece of at most CHUNK_ROWS rows, in order. On a GPU the
        next piece's batches are queued before the last one's outputs are collected, so the
        GPU runs while the host puts outputs in order and prepares the piece after: the two
        pieces in flight stage through alternate pinned buffers."""
        if device_outputs and not self.on_gpu:
            raise InputError("outputs on the GPU need a CUDA engine; this one runs on the CPU")
        pending: Launched | None = None
        for index, piece in enumerate(pieces):
            launched = self._launch(piece, desc, device_outputs, self._stagings[index % 2])
            if pending is not None:
                yield pending.collect()
            pending = launched
        if pending is not None:
            yield pending.collect()

    def _launch(
        self, tokens: Tokens, desc: str | None, device_outputs: bool, staging: PinnedStaging
    ) -> Launched:
        """The batches of at most CHUNK_ROWS rows queued on the engine (on a CPU: run)."""
        batches = self.plan(tokens)
        real = int(tokens.lengths.sum())
        stats = RunStats(
            rows=len(tokens),
            batches=len(batches),
            shape_set=frozenset((b.size, b.length) for b in batches),
            tokens=real,
            computed=real if self.packed else sum(b.size * b.length for b in batches),
        )
        timer = BatchTimer(self.time_batches, on_gpu=self.on_gpu)
        if self.packed:
            sink = self._launch_packed(tokens, batches, desc, device_outputs, staging, timer)
        elif self.on_gpu:
            sink = self._launch_gpu(tokens, batches, desc, device_outputs, staging, timer)
        else:
            sink = self._run_cpu(tokens, batches, desc, timer)
        return Launched(sink, timer, stats)

    def _feeds(self, matrices: dict, batch: Batch) -> dict[str, np.ndarray]:
        rows = _padded_rows(batch)
        return {name: matrix[rows, : batch.length] for name, matrix in matrices.items()}

    def _run_cpu(
        self, tokens: Tokens, batches: Sequence[Batch], desc: str | None, timer: BatchTimer
    ) -> Collector:
        matrices = tokens.matrices(self.engine.input_names, self.pad_id, _width(batches))
        collected = Collector(tokens)
        if self.concurrent_batches > 1:
            # The session's thread pool has cores - runs helper threads: each run's own thread
            # works too, so all runs together use every core (on 2 cores: two 1-thread runs).
            threads = max(1, usable_cores() - self.concurrent_batches + 1)
            try:
                engine = self.engine.with_threads(threads)
            except ArtifactError as err:
                # The file changed on disk since it was loaded and checked: the engine as loaded
                # (the verified bytes, in memory) keeps serving, one batch at a time.
                log.warning("%s; running one batch at a time on the engine as loaded", err)
                self.concurrent_batches = 1
            else:
                self._run_concurrently(engine, matrices, batches, desc, collected, timer)
                return collected
        for batch in _shown(batches, desc):
            timer.start()
            collected.add(batch, self.engine.run(self._feeds(matrices, batch)))
            timer.stop()
        return collected

    def _run_concurrently(
        self,
        engine,
        matrices: dict,
        batches: Sequence[Batch],
        desc: str | None,
        collected: Collector,
        timer: BatchTimer,
    ) -> None:
        """Batches run ``concurrent_batches`` at a time on ``engine``'s one session (ONNX
        Runtime sessions take concurrent runs), collected in order; at most two batches per run
        are in flight, so memory stays that of a few batches. A batch's time is its own run's,
        overlapping others'."""

        def run(batch: Batch) -> tuple[dict[str, Any], float, float]:
            started = time.perf_counter()
            outputs = engine.run(self._feeds(matrices, batch))
            return outputs, started, time.perf_counter()

        def collect(done: tuple[Batch, Future]) -> None:
            outputs, started, stopped = done[1].result()
            collected.add(done[0], outputs)
            timer.add(started, stopped)

        pool = ThreadPoolExecutor(self.concurrent_batches, thread_name_prefix="bert-compiler-run")
        running: deque[tuple[Batch, Future]] = deque()
        try:
            for batch in _shown(batches, desc):
                running.append((batch, pool.submit(run, batch)))
                if len(running) >= 2 * self.concurrent_batches:
                    collect(running.popleft())
            while running:
                collect(running.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _launch_gpu(
        self,
        tokens: Tokens,
        batches: Sequence[Batch],
        desc: str | None,
        device_outputs: bool,
        staging: PinnedStaging,
        timer: BatchTimer,
    ) -> GpuOutputs:
        # One upload of the chunk's tokens, then every batch is a gather on the device. Nothing
        # below waits for the GPU: the engine orders its runs with this stream, so batches are
        # queued while earlier ones run.
        device = tokens.device_matrices(
            self.engine.input_names, self.pad_id, _width(batches), staging
        )
        rows = staging.upload(
            "rows", np.concatenate([_padded_rows(b) for b in batches]).astype(np.int64)
        )
        sink = GpuOutputs(tokens, staging, device_outputs)
        offset = 0
        for batch in _shown(batches, desc):
            timer.start()
            index = rows[offset : offset + batch.size]
            offset += batch.size
            feeds = {
                name: m[:, : batch.length].index_select(0, index) for name, m in device.items()
            }
            sink.add(batch, self.engine.run_device(feeds), index)
            timer.stop()
        sink.queued()
        return sink

    def _launch_packed(
        self,
        tokens: Tokens,
        batches: Sequence[Batch],
        desc: str | None,
        device_outputs: bool,
        staging: PinnedStaging,
        timer: BatchTimer,
    ) -> GpuOutputs | Collector:
        """Each batch as its rows' real tokens back to back: the chunk's tokens are put in
        batch order on the host and uploaded once, so each batch is a slice, and each batch's
        longest row is known here without asking the device."""
        import torch

        order = np.concatenate([b.rows for b in batches])
        ordered = tokens.select(order)
        arrays = {"ids": ordered.ids, "type_ids": ordered.type_ids, "lengths": ordered.lengths}
        if self.on_gpu:
            on = {name: staging.upload(name, a) for name, a in arrays.items()}
            rows = staging.upload("rows", order.astype(np.int64))
            sink: GpuOutputs | Collector = GpuOutputs(tokens, staging, device_outputs)
        else:
            on = {name: torch.from_numpy(a) for name, a in arrays.items()}
            sink = Collector(tokens)
        starts = np.concatenate([[0], np.cumsum(ordered.lengths)])
        first = 0
        for batch in _shown(batches, desc):
            timer.start()
            last = first + len(batch.rows)
            tokens_from, tokens_to = int(starts[first]), int(starts[last])
            outputs = self.engine.run_packed(
                on["ids"][tokens_from:tokens_to],
                on["type_ids"][tokens_from:tokens_to],
                on["lengths"][first:last],
                int(ordered.lengths[first:last].max()),
            )
            if isinstance(sink, GpuOutputs):
                sink.add(batch, outputs, rows[first:last])
            else:
                sink.add(batch, {name: value.numpy() for name, value in outputs.items()})
            first = last
            timer.stop()
        if isinstance(sink, GpuOutputs):
            sink.queued()
        return sink


class Launched:
    """A piece's batches, queued: ``collect`` waits for their outputs (in input order) and
    the stats of their run."""

    def __init__(self, sink: GpuOutputs | Collector, timer: BatchTimer, stats: RunStats):
        self.sink, self.timer, self.stats = sink, timer, stats

    def collect(self) -> tuple[dict[str, Any], RunStats]:
        results = self.sink.results()
        return results, replace(self.stats, batch_ms=self.timer.milliseconds())


def _joined(parts: list) -> Any:
    """One chunk's or several chunks' outputs of a name as one array, tensor or row list."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    if isinstance(parts[0], list):
        return [row for part in parts for row in part]
    import torch

    return torch.cat(parts)


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers narrow). Logical
    CPUs: on a host with two threads per core that is twice ONNX Runtime's own default (one
    thread per physical core); measured only on hosts with one thread per core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


def _shown(batches: Sequence[Batch], desc: str | None):
    return progress.bar(batches, desc=desc, unit="batch") if desc else batches


def _width(batches: Sequence[Batch]) -> int:
    # A ladder rung can be longer than every row of the chunk.
    return max(batch.length for batch in batches)


def _padded_rows(batch: Batch) -> np.ndarray:
    # Filler rows repeat the batch's first row: real tokens, so no kernel sees an empty row.
    filler = np.full(batch.size - len(batch.rows), batch.rows[0], dtype=batch.rows.dtype)
    return np.concatenate([batch.rows, filler])


def pool_token_rows(rows: Sequence[np.ndarray], mode: str) -> np.ndarray:
    """Mean (or first-token) pooling of per-row token outputs, L2-normalised: the embedding a
    graph without a pooling head stands for."""
    pooled = np.stack([row[0] if mode == "cls" else row.mean(axis=0) for row in rows])
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
