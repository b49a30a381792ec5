"""Where a run's outputs go: put back in input order on the host (Collector), downloaded from the
GPU while later batches run (GpuOutputs, Downloads), each piece's batches timed (BatchTimer), and
the runtime collects them through these."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from bert_compiler.engines.batching import Batch
from bert_compiler.runtime.tokens import PinnedStaging, Tokens


class BatchTimer:
    """Each batch's milliseconds, when asked: on a GPU between events recorded around its work
    (no host wait between batches), on a CPU by the clock."""

    def __init__(self, enabled: bool, on_gpu: bool):
        self.enabled, self.on_gpu = enabled, on_gpu
        self.marks: list[Any] = []

    def _mark(self) -> None:
        if not self.enabled:
            return
        if self.on_gpu:
            import torch

            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    start = stop = _mark

    def add(self, started: float, stopped: float) -> None:
        """A batch timed by its own clock readings (a CPU batch run on another thread)."""
        if self.enabled:
            self.marks += [started, stopped]

    def milliseconds(self) -> list[float]:
        """Each batch's time (on a GPU: call once its work is done)."""
        pairs = zip(self.marks[::2], self.marks[1::2], strict=True)
        if self.on_gpu:
            return [begin.elapsed_time(end) for begin, end in pairs]
        return [(end - begin) * 1e3 for begin, end in pairs]


class GpuOutputs:
    """Where a GPU batch's outputs go: token outputs to the host in input order; outputs with a
    row per input downloaded while later batches run (Downloads) or, with ``device_outputs``,
    gathered in input order on the GPU. ``queued`` after the last batch marks where the piece's
    work ends on the stream: ``results`` waits for that, not for work queued after it."""

    def __init__(self, tokens: Tokens, staging: PinnedStaging, device_outputs: bool):
        self.tokens = tokens
        self.collected = Collector(tokens)
        self.on_device: dict[str, Any] = {}
        self.downloads = None if device_outputs else Downloads(staging, len(tokens))
        self.done: Any = None

    def add(self, batch: Batch, outputs: dict[str, Any], index: Any) -> None:
        """``index``: the input positions of the batch's rows (then any filler), on the GPU."""
        import torch

        real = len(batch.rows)
        token_outputs = {
            name: value[:real].float().cpu().numpy()
            for name, value in outputs.items()
            if value.dim() == 3
        }
        if token_outputs:
            self.collected.add(batch, token_outputs)
        rowwise = {n: v[:real].float() for n, v in outputs.items() if v.dim() != 3}
        if self.downloads is not None:
            self.downloads.add(batch.rows, rowwise)
            return
        for name, value in rowwise.items():
            if name not in self.on_device:
                self.on_device[name] = torch.empty(
                    (len(self.tokens), *value.shape[1:]), dtype=value.dtype, device=value.device
                )
            self.on_device[name].index_copy_(0, index[:real], value)

    def queued(self) -> None:
        import torch

        if self.downloads is not None:
            self.downloads.queued()
        self.done = torch.cuda.Event()
        self.done.record()

    def results(self) -> dict[str, Any]:
        results = self.collected.results()
        if self.downloads is not None:
            results.update(self.downloads.finish())
        else:
            results.update(self.on_device)
        self.done.synchronize()
        return results


class Downloads:
    """Outputs with a row per input, brought back to the host while the GPU runs later batches.

    Each batch's rows are appended on the GPU in batch order; every FLUSH_BYTES of them go to
    pinned memory in one copy, and the host puts the groups that have arrived in input order
    while later copies and batches run, never waiting for one before ``finish``. So the copy
    back overlaps the GPU's work instead of following it (docs/benchmarks.md), and a run of many
    one-row batches pays one copy per group, not per row.
    """

    FLUSH_BYTES = 4 << 20

    def __init__(self, staging: PinnedStaging, total_rows: int):
        self.staging = staging
        self.total_rows = total_rows
        self.staged = 0  # rows appended on the GPU, in batch order
        self.flushed = 0  # of which copied (or being copied) to the host
        self.rows: list[np.ndarray] = []  # input positions of the rows not yet flushed
        self.device: dict[str, Any] = {}
        self.pending: deque = deque()
        self.results: dict[str, np.ndarray] = {}

    def add(self, rows: np.ndarray, outputs: dict[str, Any]) -> None:
        import torch

        for name, value in outputs.items():
            if name not in self.device:
                self.device[name] = torch.empty(
                    (self.total_rows, *value.shape[1:]), dtype=value.dtype, device=value.device
                )
            self.device[name][self.staged : self.staged + len(rows)].copy_(value)
        self.staged += len(rows)
        self.rows.append(rows)
        row_bytes = sum(t[0].numel() * t.element_size() for t in self.device.values())
        if (self.staged - self.flushed) * row_bytes >= self.FLUSH_BYTES:
            self._flush()
        while self.pending and self.pending[0][0].query():
            self._place()

    def queued(self) -> None:
        """The last rows' copy queued (before any work queued after this piece's)."""
        if self.staged > self.flushed:
            self._flush()

    def _flush(self) -> None:
        import torch

        first, last = self.flushed, self.staged
        parts = {}
        for name, tensor in self.device.items():
            width = tensor[0].numel()
            # One region per group in a buffer of every row: nothing is overwritten in flight.
            host = self.staging.host(f"out:{name}", self.total_rows * width, tensor.dtype)
            part = host[first * width : last * width]
            part.copy_(tensor[first:last].reshape(-1), non_blocking=True)
            parts[name] = (part, tuple(tensor.shape[1:]))
        done = torch.cuda.Event()
        done.record()
        self.pending.append((done, np.concatenate(self.rows), parts))
        self.rows, self.flushed = [], last

    def _place(self) -> None:
        done, rows, parts = self.pending.popleft()
        done.synchronize()
        for name, (part, shape) in parts.items():
            if name not in self.results:
                self.results[name] = np.empty((self.total_rows, *shape), np.float32)
            self.results[name][rows] = part.numpy().reshape(len(rows), *shape)

    def finish(self) -> dict[str, np.ndarray]:
        while self.pending:
            self._place()
        return self.results


class Collector:
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
