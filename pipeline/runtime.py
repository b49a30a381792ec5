"""The runtime: an engine and its tokenizer, texts in, outputs back in input order.

Every engine (ONNX Runtime on the CPU or CUDA, TensorRT) is driven the same way: the texts are
tokenized once, rows are sorted by length and grouped under a token budget and a row limit, each
group is padded to a rung of the length ladder (engines/batching.py), and each output row goes
back to its input position. On a GPU the token matrix is copied to the device once (through pinned
host memory) and each batch is gathered there, so an engine call waits for no host work; with a
CUDA-graph engine the shapes are bounded (ladder rungs x power-of-two row counts), so every graph
is captured once and replayed. verify runs engines through this module, so what is verified is
what is served.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.core import progress
from bert_compiler.core.errors import InputError
from bert_compiler.engines.backend import load_engine
from bert_compiler.engines.batching import (
    Batch,
    BatchingSpec,
    derive_ladder,
    plan_batches,
)
from bert_compiler.pipeline.models import ModelInfo, load_tokenizer
from bert_compiler.pipeline.text import check_token_values, resolve_max_length

# Rows per device upload: bounds the device copy of the token matrix (and, for token outputs, the
# host copy of the results) whatever the input size.
CHUNK_ROWS = 65536
# Sentences of the bundled calibration text a derived ladder is fitted to (never the text a
# benchmark or verify reports on).
LADDER_SENTENCES = 4096
# Chosen on the calibration sentences, never on the text benchmarks report (scripts/
# ladder_padding.py: ladder fitted to one half, batches planned on the other): at the GPU batching
# below 32 rungs pad 10.8% of the positions, as exact lengths do, 12 rungs 17.6%, for about as many
# distinct shapes (12 vs 11). The number of CUDA graphs an engine captures is bounded by rungs x
# power-of-two row counts.
LADDER_RUNGS = 32
# Defaults per device. A CPU gains nothing from big batches or a ladder (no graphs: every batch
# padded to its own longest row). A GPU wants full batches with a narrow span of lengths: timed
# on the H100 on the calibration sentences (docs/benchmarks.md), 1024 rows x 32,768 tokens was
# the best of six settings for BERT-base and second for MiniLM (2048 x 32,768 first, 8% more).
CPU_BATCHING = BatchingSpec(max_batch=32, token_budget=4096)
GPU_BATCHING = BatchingSpec(max_batch=1024, token_budget=32768, round_rows=True)


@dataclass(frozen=True)
class Tokens:
    """Token rows, flat: every row's ids (and type ids) concatenated, and each row's length."""

    ids: np.ndarray
    type_ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def select(self, rows: np.ndarray) -> Tokens:
        """The given rows, in that order."""
        starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])[rows]
        lengths = self.lengths[rows]
        index = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        index += np.arange(int(lengths.sum()))
        return Tokens(self.ids[index], self.type_ids[index], lengths)

    def fill_and_values(self, name: str, pad_id: int) -> tuple[int, np.ndarray | int]:
        """What graph input ``name`` holds at padded positions and at real ones."""
        return {
            "input_ids": (pad_id, self.ids),
            "attention_mask": (0, 1),
            "token_type_ids": (0, self.type_ids),
        }[name]

    def matrices(
        self, input_names: Sequence[str], pad_id: int, width: int = 0
    ) -> dict[str, np.ndarray]:
        """int64 [rows, max(width, longest row)] arrays for each graph input, padded on the
        right."""
        longest = max(int(self.lengths.max()) if len(self) else 1, width)
        valid = np.arange(longest)[None, :] < self.lengths[:, None]
        arrays = {}
        for name in input_names:
            fill, values = self.fill_and_values(name, pad_id)
            matrix = np.full(valid.shape, fill, dtype=np.int64)
            matrix[valid] = values
            arrays[name] = matrix
        return arrays

    def device_matrices(
        self, input_names: Sequence[str], pad_id: int, width: int
    ) -> dict[str, Any]:
        """The same as ``matrices``, built on the GPU: only the real tokens cross the bus
        (through pinned memory), the padding is written there."""
        import torch

        def upload(array: np.ndarray):
            return torch.from_numpy(array).pin_memory().to("cuda", non_blocking=True)

        lengths = upload(self.lengths)
        valid = torch.arange(width, device="cuda")[None, :] < lengths[:, None]
        matrices = {}
        for name in input_names:
            fill, values = self.fill_and_values(name, pad_id)
            matrix = torch.full(tuple(valid.shape), fill, dtype=torch.int64, device="cuda")
            matrix[valid] = values if isinstance(values, int) else upload(values)
            matrices[name] = matrix
        return matrices


def tokenize_rows(tokenizer, texts: Sequence[str], info: ModelInfo, max_length: int) -> Tokens:
    """Tokenize without padding; every row truncated at ``max_length``."""
    if not texts:
        raise InputError("no texts to encode")
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    ids = encoded["input_ids"]
    lengths = np.fromiter((len(row) for row in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(lengths.sum()))
    if "token_type_ids" in encoded:
        types = np.fromiter(
            (t for row in encoded["token_type_ids"] for t in row), dtype=np.int64, count=len(flat)
        )
    else:
        types = np.zeros_like(flat)
    check_token_values(flat, types, info)
    return Tokens(flat, types, lengths)


def ladder_from_text(
    tokenizer, info: ModelInfo, max_length: int, text_file: Path, rungs: int = LADDER_RUNGS
) -> tuple:
    """The length ladder of at most ``rungs`` fitted lengths (engines/batching.derive_ladder)
    for the first LADDER_SENTENCES sentences of ``text_file``."""
    texts = list(islice(datasets.iter_texts(text_file), LADDER_SENTENCES))
    lengths = tokenize_rows(tokenizer, texts, info, max_length).lengths
    return derive_ladder(lengths, max_length, rungs)


@dataclass
class RunStats:
    """What the last ``run`` did: rows, batches, distinct shapes, the share of computed positions
    that were padding, and (when the Encoder times batches) each batch's milliseconds."""

    rows: int = 0
    batches: int = 0
    shapes: int = 0
    padding_fraction: float = 0.0
    batch_ms: list[float] = field(default_factory=list)


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
    ):
        self.engine = engine
        # Per-batch wall time, the GPU synchronised after each batch (benchmarks only).
        self.time_batches = time_batches
        self._batch_ms: list[float] = []
        self.info = info
        self.max_length = resolve_max_length(info, max_length)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info)
        self.on_gpu = engine.device == "cuda"
        if batching is None:
            batching = GPU_BATCHING if self.on_gpu else CPU_BATCHING
            if self.on_gpu and not batching.ladder:
                ladder = ladder_from_text(
                    self.tokenizer, info, self.max_length, datasets.CALIBRATION_SENTENCES
                )
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

    @classmethod
    def open(cls, engine_dir: Path, info: ModelInfo, **kwargs: Any) -> Encoder:
        """An Encoder over an engine folder (files checked against its manifest first)."""
        engine, _manifest = load_engine(Path(engine_dir))
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
        )

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        return tokenize_rows(self.tokenizer, texts, self.info, self.max_length)

    def encode(self, texts: Sequence[str], desc: str | None = None) -> dict[str, Any]:
        """Outputs for ``texts`` in their order (``desc``: a progress bar of that name)."""
        return self.run(self.tokenize(texts), desc=desc)

    def plan(self, tokens: Tokens) -> list[Batch]:
        return plan_batches(tokens.lengths, self.batching)

    def run(self, tokens: Tokens, desc: str | None = None) -> dict[str, Any]:
        """Outputs for token rows in their order (``desc``: a progress bar of that name, shown
        where core.progress shows bars)."""
        if not len(tokens):
            raise InputError("no token rows to run")
        chunks: list[dict[str, Any]] = []
        self._batch_ms = []
        batches_run, shapes, computed = 0, set(), 0
        runner = self._run_gpu if self.on_gpu else self._run_cpu
        for start in range(0, len(tokens), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(tokens))
            chunk = tokens if stop - start == len(tokens) else tokens.select(np.arange(start, stop))
            batches = self.plan(chunk)
            chunks.append(runner(chunk, batches, desc))
            batches_run += len(batches)
            shapes.update((b.size, b.length) for b in batches)
            computed += sum(b.size * b.length for b in batches)
        self.stats = RunStats(
            rows=len(tokens),
            batches=batches_run,
            shapes=len(shapes),
            padding_fraction=1.0 - float(tokens.lengths.sum()) / computed if computed else 0.0,
            batch_ms=self._batch_ms,
        )
        return {
            name: np.concatenate([c[name] for c in chunks])
            if isinstance(chunks[0][name], np.ndarray)
            else [row for c in chunks for row in c[name]]
            for name in chunks[0]
        }

    def _feeds(self, matrices: dict, batch: Batch) -> dict[str, np.ndarray]:
        rows = _padded_rows(batch)
        return {name: matrix[rows, : batch.length] for name, matrix in matrices.items()}

    def _run_cpu(
        self, tokens: Tokens, batches: Sequence[Batch], desc: str | None
    ) -> dict[str, Any]:
        matrices = tokens.matrices(self.engine.input_names, self.pad_id, _width(batches))
        collected = _Collector(tokens)
        for batch in _shown(batches, desc):
            started = time.perf_counter()
            collected.add(batch, self.engine.run(self._feeds(matrices, batch)))
            if self.time_batches:
                self._batch_ms.append((time.perf_counter() - started) * 1e3)
        return collected.results()

    def _run_gpu(
        self, tokens: Tokens, batches: Sequence[Batch], desc: str | None
    ) -> dict[str, Any]:
        import torch

        # One upload of the chunk's tokens, then every batch is a gather on the device.
        device = tokens.device_matrices(self.engine.input_names, self.pad_id, _width(batches))
        rows = torch.from_numpy(
            np.concatenate([_padded_rows(b) for b in batches]).astype(np.int64)
        ).to("cuda", non_blocking=True)
        collected = _Collector(tokens)
        rowwise: dict[str, Any] = {}
        offset = 0
        for batch in _shown(batches, desc):
            started = time.perf_counter()
            index = rows[offset : offset + batch.size]
            offset += batch.size
            feeds = {
                name: m[:, : batch.length].index_select(0, index) for name, m in device.items()
            }
            outputs = self.engine.run_device(feeds)
            token_outputs = {}
            for name, value in outputs.items():
                if value.dim() == 3:
                    token_outputs[name] = value[: len(batch.rows)].float().cpu().numpy()
                    continue
                if name not in rowwise:
                    rowwise[name] = torch.empty(
                        (len(tokens), *value.shape[1:]), dtype=torch.float32, device=value.device
                    )
                rowwise[name].index_copy_(
                    0, index[: len(batch.rows)], value[: len(batch.rows)].float()
                )
            if token_outputs:
                collected.add(batch, token_outputs)
            if self.time_batches:
                torch.cuda.synchronize()
                self._batch_ms.append((time.perf_counter() - started) * 1e3)
        results = collected.results()
        for name, value in rowwise.items():
            # Through pinned memory: a pageable copy of 12,000 embeddings costs milliseconds.
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host.copy_(value, non_blocking=True)
            rowwise[name] = host
        torch.cuda.current_stream().synchronize()
        results.update({name: host.numpy() for name, host in rowwise.items()})
        return results


def _shown(batches: Sequence[Batch], desc: str | None):
    return progress.bar(batches, desc=desc, unit="batch") if desc else batches


def _width(batches: list[Batch]) -> int:
    # A ladder rung can be longer than every row of the chunk.
    return max(batch.length for batch in batches)


def _padded_rows(batch: Batch) -> np.ndarray:
    # Filler rows repeat the batch's first row: real tokens, so no kernel sees an empty row.
    filler = np.full(batch.size - len(batch.rows), batch.rows[0], dtype=batch.rows.dtype)
    return np.concatenate([batch.rows, filler])


class _Collector:
    """Outputs of batches put back in input order."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens
        self.rowwise: dict[str, np.ndarray] = {}
        self.token_rows: dict[str, list] = {}

    def add(self, batch: Batch, outputs: dict[str, np.ndarray]) -> None:
        count = len(batch.rows)
        for name, value in outputs.items():
            value = np.asarray(value)[:count]
            if value.ndim == 3:
                rows = self.token_rows.setdefault(name, [None] * len(self.tokens))
                for row, array in zip(batch.rows, value, strict=True):
                    rows[row] = array[: self.tokens.lengths[row]].astype(np.float32)
                continue
            if name not in self.rowwise:
                self.rowwise[name] = np.empty((len(self.tokens), *value.shape[1:]), np.float32)
            self.rowwise[name][batch.rows] = value

    def results(self) -> dict[str, Any]:
        merged: dict[str, Any] = dict(self.rowwise)
        merged.update(self.token_rows)
        return merged


def pool_token_rows(rows: Sequence[np.ndarray], mode: str) -> np.ndarray:
    """Mean (or first-token) pooling of per-row token outputs, L2-normalised: the embedding a
    graph without a pooling head stands for."""
    pooled = np.stack([row[0] if mode == "cls" else row.mean(axis=0) for row in rows])
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
