"""Triton Python-backend model: text in, an ONNX Runtime engine's outputs out, in one process.

`bert-compile package --python-cpu-engine` copies this file to
``<model>-ort-cpu-<precision>-python-text/1/model.py``, and beside it the two files it imports
(tokenizer_model.py and onnxruntime_model.py, verbatim), the ``tokenizer.json`` the tokenizer
model gets and the engine's ``model.onnx``. It replaces the ensemble tokenizer model -> Python
engine model: one process instead of two, and no token tensors through Triton between them.
`--python-gpu-engine` does the same for ONNX Runtime CUDA engines
(``<model>-ort-cuda-<precision>-python-text``, on GPU instances, one engine file per compute
capability: each instance opens its GPU's, on the CUDA provider with the recorded options).

Every text of one ``execute`` call (all the requests Triton batched) is tokenized in one batch,
sorted by length and cut into engine runs by ``plan_runs``: each run is padded to its own longest
row, and a cut is made where the padding it saves costs more than one more run. Every request
gets its own rows back; token-level outputs come back padded to the request's longest text, with
its ``attention_mask``.

Triton's Python environment needs numpy, ``tokenizers`` and ``onnxruntime``. Nothing is imported
from Triton, ONNX Runtime or tokenizers until the model is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # inside bert_compiler (package, the tests)
    from .onnxruntime_model import engine_path, open_session
    from .tokenizer_model import TOKENIZER_FILE, ModelArgs, TextEncoder, answer_requests
except ImportError:  # inside Triton: the copies package puts beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from onnxruntime_model import engine_path, open_session  # type: ignore[no-redef]
    from tokenizer_model import (  # type: ignore[no-redef]
        TOKENIZER_FILE,
        ModelArgs,
        TextEncoder,
        answer_requests,
    )

# The config parameter holding what one more engine run costs, in padded tokens.
RUN_COST_PARAMETER = "run_cost_tokens"
MASK_OUTPUT = "attention_mask"


def plan_runs(lengths: Sequence[int], run_cost: float, max_rows: int) -> list[tuple[int, int]]:
    """Cut rows sorted by length (ascending) into runs [start, stop), each padded to its last
    row's length, at the least total cost: ``run_cost`` per run plus one per padded position
    (an exact dynamic programme; an execute call holds at most max_batch_size rows).

    Raises:
        ValueError: lengths not ascending, or ``max_rows`` below 1.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows {max_rows}: expected 1 or more")
    if any(a > b for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError("plan_runs needs lengths in ascending order")
    count = len(lengths)
    best = [0.0] + [float("inf")] * count
    cut = [0] * (count + 1)
    for stop in range(1, count + 1):
        for start in range(max(0, stop - max_rows), stop):
            cost = best[start] + run_cost + (stop - start) * lengths[stop - 1]
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    runs, stop = [], count
    while stop:
        runs.append((cut[stop], stop))
        stop = cut[stop]
    return runs[::-1]


class TextEngine:
    """Requests of texts -> the engine's outputs per request (see the module docstring).

    Args:
        session: runs ``run(output_names, feeds)`` (an ONNX Runtime session).
        encoder: tokenizes and pads, without a ladder (each run padded to its longest row).
        output_names: the engine outputs to return; an output with a token axis comes back
            padded to each request's longest text, and with ``attention_mask``.
        token_outputs: which of ``output_names`` have a token axis.
    """

    def __init__(
        self,
        session,
        encoder: TextEncoder,
        output_names: Sequence[str],
        *,
        token_outputs: Sequence[str] = (),
        run_cost: float,
        max_rows: int,
    ):
        if encoder.ladder:
            raise ValueError("the text engine pads each run to its own longest row: no ladder")
        self.session = session
        self.encoder = encoder
        self.output_names = list(output_names)
        self.token_outputs = set(token_outputs)
        self.run_cost = run_cost
        self.max_rows = max_rows

    def run(self, requests: Sequence[Sequence[Any]]) -> list[dict[str, np.ndarray] | str]:
        """Per request of texts (or (text, text_pair) pairs): its outputs, or why it failed
        (ONNX Runtime refused a run holding one of its rows)."""
        encodings = self.encoder.tokenize(requests)
        flat = [row for rows in encodings for row in rows]
        owner = np.repeat(np.arange(len(encodings)), [len(rows) for rows in encodings])
        lengths = np.fromiter((len(row.ids) for row in flat), dtype=np.int64, count=len(flat))
        order = np.argsort(lengths, kind="stable")
        values: dict[str, list] = {name: [None] * len(flat) for name in self.output_names}
        failed: dict[int, str] = {}
        for start, stop in plan_runs(lengths[order].tolist(), self.run_cost, self.max_rows):
            run_rows = order[start:stop]
            feeds = self.encoder.pad([flat[k] for k in run_rows])
            try:
                outputs = self.session.run(self.output_names, feeds)
            except Exception as err:  # ONNX Runtime's own error types; only these rows fail
                for k in run_rows:
                    failed.setdefault(int(owner[k]), f"ONNX Runtime refused the batch: {err}")
                continue
            for name, value in zip(self.output_names, outputs, strict=True):
                for position, k in enumerate(run_rows):
                    values[name][k] = value[position]
        results: list[dict[str, np.ndarray] | str] = []
        first = 0
        for index, rows in enumerate(encodings):
            taken = range(first, first + len(rows))
            first += len(rows)
            if index in failed or not rows:
                results.append(failed.get(index, "a request with no texts"))
                continue
            outputs = {}
            for name in self.output_names:
                pieces = [values[name][k] for k in taken]
                if name in self.token_outputs:
                    outputs[name] = self._repad(pieces, lengths[list(taken)])
                else:
                    outputs[name] = np.stack(pieces)
            if self.token_outputs:
                outputs[MASK_OUTPUT] = self.encoder.pad(rows)[MASK_OUTPUT]
            results.append(outputs)
        return results

    def _repad(self, pieces: list[np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """Token rows of runs of various widths -> one array padded (zeros) to the longest
        valid length, on the tokenizer's padding side."""
        width = int(lengths.max())
        out = np.zeros((len(pieces), width, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
        for i, (piece, length) in enumerate(zip(pieces, lengths, strict=True)):
            if self.encoder.left:
                out[i, width - length :] = piece[piece.shape[0] - length :]
            else:
                out[i, :length] = piece[:length]
        return out


class TritonPythonModel:
    """Every text of one execute call tokenized at once and run in as few padded runs as pay."""

    def initialize(self, args):
        from tokenizers import Tokenizer

        model = ModelArgs.read(args)
        config, parameters, folder = model.config, model.parameters, model.folder
        self.inputs = model.inputs
        # Triton names each GPU instance's device; a CPU instance has none.
        device_id = int(args.get("model_instance_device_id") or 0)
        path = engine_path(folder, parameters, device_id)
        session = open_session(path, config, parameters, device_id)
        engine_inputs = [tensor.name for tensor in session.get_inputs()]
        outputs = [o for o in config["output"] if o["name"] != MASK_OUTPUT]
        self.engine = TextEngine(
            session,
            TextEncoder(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), engine_inputs),
            [o["name"] for o in outputs],
            # Token-level outputs have a -1 (sequence) dim, as config.text_outputs reads them.
            token_outputs=[o["name"] for o in outputs if any(int(d) == -1 for d in o["dims"])],
            run_cost=float(parameters[RUN_COST_PARAMETER]),
            max_rows=max(1, int(config.get("max_batch_size", 1))),
        )

    def execute(self, requests):
        return answer_requests(requests, self.inputs, self.engine)
