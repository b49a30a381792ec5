"""Token rows as the runtime holds them (every row's ids back to back, and each row's length),
and the pinned host buffers they reach the GPU through."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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
        values: dict[str, tuple[int, np.ndarray | int]] = {
            "input_ids": (pad_id, self.ids),
            "attention_mask": (0, 1),
            "token_type_ids": (0, self.type_ids),
        }
        return values[name]

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
        self, input_names: Sequence[str], pad_id: int, width: int, staging: PinnedStaging
    ) -> dict[str, Any]:
        """The same as ``matrices``, built on the GPU without a host wait: only the real tokens
        cross the bus (through ``staging``'s pinned memory), the padding is written there."""
        import torch

        rows, total = len(self), int(self.lengths.sum())
        lengths = staging.upload("lengths", self.lengths)
        # Each real token's flat position in a [rows, width] matrix; output_size keeps
        # repeat_interleave from asking the host for the total.
        row_of_token = torch.repeat_interleave(
            torch.arange(rows, device="cuda"), lengths, output_size=total
        )
        starts = torch.cumsum(lengths, 0) - lengths
        flat = row_of_token * width + torch.arange(total, device="cuda") - starts[row_of_token]
        matrices = {}
        for name in input_names:
            fill, values = self.fill_and_values(name, pad_id)
            matrix = torch.full((rows * width,), fill, dtype=torch.int64, device="cuda")
            if isinstance(values, int):
                matrix.index_fill_(0, flat, values)
            else:
                matrix.index_copy_(0, flat, staging.upload(name, values))
            matrices[name] = matrix.view(rows, width)
        return matrices


class PinnedStaging:
    """Page-locked host buffers reused across calls, one per name, grown as needed: allocating
    pinned memory costs milliseconds per call, copying into a kept buffer microseconds (the
    profile in docs/benchmarks.md, "GPU real text through the runtime, 2026-11-24")."""

    def __init__(self) -> None:
        self._buffers: dict[str, Any] = {}

    def host(self, name: str, count: int, dtype: Any) -> Any:
        """A pinned 1-D torch tensor of ``count`` elements (contents undefined)."""
        import torch

        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            buffer = torch.empty(max(count, 1024), dtype=dtype, pin_memory=True)
            self._buffers[name] = buffer
        return buffer[:count]

    def upload(self, name: str, array: np.ndarray) -> Any:
        """``array`` on the GPU, copied asynchronously from the pinned buffer ``name``.

        The buffer is rewritten by the next upload of that name: callers synchronise (the
        runtime does, when it collects results) before uploading under the same name again."""
        import torch

        host = self.host(name, array.size, torch.from_numpy(array[:0]).dtype)
        host.numpy()[:] = array.reshape(-1)
        return host.to("cuda", non_blocking=True).view(array.shape)
