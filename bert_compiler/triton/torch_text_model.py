"""Triton Python-backend model: text in, a torch engine's outputs out, on a GPU (or the CPU).

`bert-compile package` copies this file to ``<model>-pt-<device>-<precision>-text/1/model.py``,
and beside it the files it imports, verbatim: token_rows.py (texts -> token rows, bit-identical
to the model's Hugging Face tokenizer), torch_module.py and torch_layout.py (the torch engine at
run time, its file's layout) and tokenizer_model.py (how a request's strings are
read); with them ``tokenizer.json`` (truncation set to what verify used) and the engine file
``encoder.safetensors``.

Every text of one ``execute`` call (all the requests Triton's dynamic batcher joined) is
tokenized in one batch and run packed: rows sorted by length, their real tokens back to back
with no padding anywhere, in engine batches of at most ``max_rows`` rows and ``token_budget``
tokens (the runtime's packed GPU batching). So requests of any lengths share one batch: the
ragged batching Triton's own backends lack. Every request gets its own rows back; token-level
outputs come back padded to the request's longest text, with its ``attention_mask``.

Triton's Python environment needs numpy, ``tokenizers``, ``safetensors`` and torch (with Triton
for the short-row kernel on a GPU). Nothing of them is imported until the model is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # inside bert_compiler (package, the tests)
    from ..engines.torch_layout import ENGINE_FILE
    from ..engines.torch_module import open_engine
    from ..runtime.token_rows import RowTokenizer, TokenRows
    from .tokenizer_model import TOKENIZER_FILE, ModelArgs, answer_requests
except ImportError:  # inside Triton: the copies package puts beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from token_rows import RowTokenizer, TokenRows  # type: ignore[no-redef]
    from tokenizer_model import (  # type: ignore[no-redef]
        TOKENIZER_FILE,
        ModelArgs,
        answer_requests,
    )
    from torch_layout import ENGINE_FILE  # type: ignore[no-redef]
    from torch_module import open_engine  # type: ignore[no-redef]

# Config parameters: the engine's precision, the truncation length, and the packed batches'
# bounds.
PRECISION_PARAMETER = "precision"
MAX_LENGTH_PARAMETER = "max_length"
MAX_ROWS_PARAMETER = "max_rows"
TOKEN_BUDGET_PARAMETER = "token_budget"
MASK_OUTPUT = "attention_mask"


def packed_batches(lengths: np.ndarray, max_rows: int, token_budget: int) -> list[np.ndarray]:
    """Row indices of each engine batch: rows sorted by length (stable), cut greedily where a
    batch would pass ``max_rows`` rows or ``token_budget`` tokens (a row longer than the budget
    runs alone).

    Raises:
        ValueError: ``max_rows`` or ``token_budget`` below 1.
    """
    if max_rows < 1 or token_budget < 1:
        raise ValueError(f"max_rows {max_rows}, token_budget {token_budget}: expected 1 or more")
    order = np.argsort(lengths, kind="stable")
    batches, start, tokens = [], 0, 0
    for position, row in enumerate(order):
        length = int(lengths[row])
        if position > start and (position - start >= max_rows or tokens + length > token_budget):
            batches.append(order[start:position])
            start, tokens = position, 0
        tokens += length
    if start < len(order):
        batches.append(order[start:])
    return batches


class TorchTextEngine:
    """Requests of texts -> the torch engine's outputs per request (see the module docstring).

    Args:
        engine: runs ``run_packed(ids, type_ids, lengths, longest)`` on ``device`` (a
            torch_module.TorchEncoder).
        rows: tokenizes texts (or (text, text_pair) pairs) into flat token rows.
        max_rows, token_budget: the bounds of one engine batch.
        pad_left: token outputs come back padded on the left (the tokenizer's padding side).
    """

    def __init__(
        self,
        engine: Any,
        rows: RowTokenizer,
        *,
        max_rows: int,
        token_budget: int,
        pad_left: bool = False,
    ):
        self.engine = engine
        self.rows = rows
        self.max_rows = max_rows
        self.token_budget = token_budget
        self.pad_left = pad_left
        self.output_names = list(engine.output_names)

    def run(self, requests: Sequence[Sequence[Any]]) -> list[dict[str, np.ndarray] | str]:
        """Per request of texts: its outputs, or why it failed (an empty request)."""
        flat = [text for request in requests for text in request]
        encoded = self.rows.encode(flat)
        values = self._run_rows(encoded) if flat else {}
        results: list[dict[str, np.ndarray] | str] = []
        first = 0
        for request in requests:
            taken = slice(first, first + len(request))
            first += len(request)
            if not request:
                results.append("a request with no texts")
                continue
            outputs: dict[str, np.ndarray] = {}
            lengths = encoded.lengths[taken]
            for name in self.output_names:
                if isinstance(values[name], list):
                    outputs[name], outputs[MASK_OUTPUT] = self._repad(values[name][taken], lengths)
                else:
                    outputs[name] = values[name][taken]
            results.append(outputs)
        return results

    def _run_rows(self, encoded: TokenRows) -> dict[str, Any]:
        """Every row's outputs in input order: an array [rows, ...] per pooled output, a list
        of [length, hidden] arrays per token output."""
        import torch

        device = self.engine.device
        starts = np.concatenate([[0], np.cumsum(encoded.lengths)])
        values: dict[str, Any] = {}
        for rows in packed_batches(encoded.lengths, self.max_rows, self.token_budget):
            index = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
            lengths = encoded.lengths[rows]
            outputs = self.engine.run_packed(
                torch.from_numpy(encoded.ids[index]).to(device),
                torch.from_numpy(encoded.type_ids[index]).to(device),
                torch.from_numpy(lengths).to(device),
                int(lengths.max()),
            )
            for name, value in outputs.items():
                host = value.float().cpu().numpy()
                if host.ndim == 3:  # [rows, longest, hidden]: each row's own tokens
                    kept = values.setdefault(name, [None] * len(encoded))
                    for position, row in enumerate(rows):
                        kept[row] = host[position, : lengths[position]]
                    continue
                if name not in values:
                    values[name] = np.empty((len(encoded), *host.shape[1:]), np.float32)
                values[name][rows] = host
        return values

    def _repad(self, pieces: list[np.ndarray], lengths: np.ndarray) -> tuple[np.ndarray, ...]:
        """Token rows -> one array padded (zeros) to the longest, and the attention mask."""
        width = int(lengths.max())
        out = np.zeros((len(pieces), width, *pieces[0].shape[1:]), dtype=np.float32)
        mask = np.zeros((len(pieces), width), dtype=np.int64)
        for i, (piece, length) in enumerate(zip(pieces, lengths, strict=True)):
            where = slice(width - length, width) if self.pad_left else slice(0, length)
            out[i, where] = piece
            mask[i, where] = 1
        return out, mask


class TritonPythonModel:
    """Every text of one execute call tokenized at once and run packed on the model's GPU."""

    def initialize(self, args):
        import torch
        from tokenizers import Tokenizer

        model = ModelArgs.read(args)
        config, parameters, folder = model.config, model.parameters, model.folder
        self.inputs = model.inputs
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            torch.cuda.set_device(int(args["model_instance_device_id"]))
            device = "cuda"
        else:
            # The model's CPU instances share the cores (each is a process of its own).
            instances = sum(group.get("count", 1) for group in config.get("instance_group", []))
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, instances)))
        engine = open_engine(folder / ENGINE_FILE, device, parameters[PRECISION_PARAMETER])
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        truncation = tokenizer.truncation or {}
        padding = tokenizer.padding or {}
        rows = RowTokenizer(
            tokenizer,
            int(parameters[MAX_LENGTH_PARAMETER]),
            direction=truncation.get("direction", "right"),
            type_ids="token_type_ids" in engine.input_names,
        )
        self.engine = TorchTextEngine(
            engine,
            rows,
            max_rows=int(parameters[MAX_ROWS_PARAMETER]),
            token_budget=int(parameters[TOKEN_BUDGET_PARAMETER]),
            pad_left=padding.get("direction", "right") == "left",
        )

    def execute(self, requests):
        return answer_requests(requests, self.inputs, self.engine)
