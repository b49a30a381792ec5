"""Triton Python-backend model: raw strings in, the engine's int64 token tensors out.

`bert-compile package` copies this file verbatim to ``<model>-tokenizer/1/model.py`` beside the
``tokenizer.json`` it loads. Truncation and the padding values (pad id, pad type id, side) are
stored inside that tokenizer.json (set by the packager to exactly what verify used); how far a
request is padded is the config's ``length_ladder`` parameter: every request is padded to the
shortest rung that holds its longest text, so requests of one rung have one shape and Triton's
dynamic batcher can batch them (an empty ladder: each request padded to its own longest text).
`verify --repository` checks the same file and ladder against the pipeline's tokenizer.

A cross-encoder's tokenizer model takes two string inputs, TEXT and TEXT_PAIR (config.pbtxt names
both; both required, one string each per row): row i is the pair (TEXT[i], TEXT_PAIR[i]), encoded
with tokenizer.json's pair template and truncated longest first, as the pipeline encodes pairs.

All requests of one ``execute`` call are tokenized in one ``encode_batch`` (the tokenizers
library spreads it over threads); each request is then padded on its own, so its shape never
depends on the requests Triton batched with it.

Every text is first cut as the runtime cuts it (token_rows.cut_texts, from token_rows.py copied
beside this file): the Rust tokenizer reads a whole text before truncating it, so one long text
would hold many times its size of the server's memory (docs/benchmarks.md, "Memory of one long
text").

Triton's Python environment needs numpy and ``tokenizers``. This module imports neither Triton's
``triton_python_backend_utils`` nor ``tokenizers`` at import time, so it can be tested anywhere.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside bert_compiler (package, the tests)
    from ..runtime.token_rows import cut_texts
except ImportError:  # inside Triton: the copy package puts beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from token_rows import cut_texts  # type: ignore[no-redef]

TOKENIZER_FILE = "tokenizer.json"
TEXT_INPUT = "TEXT"
# A cross-encoder's second text of each pair.
TEXT_PAIR_INPUT = "TEXT_PAIR"
# The config parameter holding the padded lengths, ascending, comma-separated ("" for none).
LADDER_PARAMETER = "length_ladder"
_ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}


def request_texts(arrays: Sequence[np.ndarray]) -> list[str] | list[tuple[str, str]]:
    """One request's texts from its string inputs: TEXT's strings, or with TEXT_PAIR the pairs
    (TEXT[i], TEXT_PAIR[i]).

    Raises:
        UnicodeDecodeError: an element is not UTF-8.
        ValueError: the two inputs hold different numbers of strings.
    """
    if len(arrays) == 1:
        return decode_texts(arrays[0])
    first, second = (decode_texts(array) for array in arrays)
    if len(first) != len(second):
        raise ValueError(
            f"{TEXT_INPUT} holds {len(first)} strings and {TEXT_PAIR_INPUT} {len(second)}: "
            "one pair a row"
        )
    return list(zip(first, second, strict=True))


def read_requests(
    requests: Sequence[Any], arrays_of: Callable[[Any], list[np.ndarray]], inputs: Sequence[str]
) -> tuple[dict[int, list], dict[int, str]]:
    """Each request's texts (``arrays_of(request)``: its string inputs' arrays, in the order of
    ``inputs``) by position, and, for each request that cannot be read, why: not UTF-8, or TEXT
    and TEXT_PAIR holding different numbers of strings. One bad request fails alone."""
    readable: dict[int, list] = {}
    unreadable: dict[int, str] = {}
    for index, request in enumerate(requests):
        try:
            readable[index] = request_texts(arrays_of(request))
        except UnicodeDecodeError as err:
            unreadable[index] = f"{' and '.join(inputs)} must be UTF-8 text ({err})"
        except ValueError as err:
            unreadable[index] = str(err)
    return readable, unreadable


def respond_all(
    requests: Sequence[Any],
    arrays_of: Callable[[Any], list[np.ndarray]],
    inputs: Sequence[str],
    engine: Any,
    *,
    respond: Callable[[dict[str, np.ndarray]], Any],
    fail: Callable[[str], Any],
) -> list:
    """One response per request: a request whose texts cannot be read fails alone
    (read_requests), the others run together through ``engine.run`` (requests of texts -> per
    request its outputs, or why it failed)."""
    readable, unreadable = read_requests(requests, arrays_of, inputs)
    responses: list = [None] * len(requests)
    for index, message in unreadable.items():
        responses[index] = fail(message)
    results = _run_each_alone_on_failure(engine, list(readable.values()))
    for index, result in zip(readable, results, strict=True):
        responses[index] = fail(result) if isinstance(result, str) else respond(result)
    return responses


def _is_failure(err: BaseException) -> bool:
    """An error of the work itself (not an interrupt): any Exception, or a panic of a Rust
    library (tokenizers), which pyo3 raises as PanicException, a BaseException that ``except
    Exception`` lets through. Its class is made at run time, so it is known by name (as
    core/errors.py is_rust_panic knows it: repeated here, where bert-compiler is not installed)."""
    return isinstance(err, Exception) or type(err).__name__ == "PanicException"


def _run_each_alone_on_failure(engine: Any, batch: list) -> list:
    """``engine.run`` over every request of ``batch`` together; when that fails (a tokenizer or
    engine error), each request alone, so the request that breaks it fails alone rather than
    every request batched with it."""
    try:
        return list(engine.run(batch))
    except BaseException as err:
        if not _is_failure(err):
            raise
        if len(batch) == 1:
            return [f"the text engine failed: {type(err).__name__}: {err}"]
    results: list = []
    for texts in batch:
        results += _run_each_alone_on_failure(engine, [texts])
    return results


def answer_requests(requests: Sequence[Any], inputs: Sequence[str], engine: Any) -> list:
    """A text model's execute: each request's string inputs (``inputs``) read, the readable ones
    run together by ``engine.run`` (requests of texts -> per request its outputs, or why it
    failed), one Triton response per request (respond_all)."""
    import triton_python_backend_utils as pb_utils

    return respond_all(
        requests,
        lambda request: [pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in inputs],
        inputs,
        engine,
        respond=lambda outputs: pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
        ),
        fail=lambda message: pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
    )


def decode_texts(raw: np.ndarray) -> list[str]:
    """The strings of a TYPE_STRING tensor [batch, 1] (bytes from the wire, UTF-8).

    Raises:
        UnicodeDecodeError: an element is not UTF-8.
    """
    return [
        item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in raw.reshape(-1)
    ]


def format_ladder(ladder: Sequence[int]) -> str:
    """The ``length_ladder`` parameter's text of a ladder."""
    return ",".join(str(int(length)) for length in ladder)


def parse_ladder(text: str) -> tuple[int, ...]:
    """A ``length_ladder`` parameter's lengths (empty text: no ladder).

    Raises:
        ValueError: not distinct integers >= 1 in ascending order.
    """
    ladder = tuple(int(item) for item in text.split(",")) if text.strip() else ()
    if list(ladder) != sorted(set(ladder)) or (ladder and ladder[0] < 1):
        raise ValueError(f"length ladder {text!r}: expected ascending distinct lengths >= 1")
    return ladder


def padded_length(ladder: Sequence[int], longest: int) -> int:
    """The shortest rung that holds ``longest`` tokens (``longest`` itself without a ladder).
    The same rule as bert_compiler.engines.batching.rung, repeated because this file runs inside
    Triton, where bert-compiler is not installed.

    Raises:
        ValueError: the row is longer than the top rung.
    """
    if not ladder:
        return longest
    index = bisect.bisect_left(ladder, longest)
    if index == len(ladder):
        raise ValueError(f"a text of {longest} tokens is longer than the top rung {ladder[-1]}")
    return int(ladder[index])


@dataclass(frozen=True)
class ModelArgs:
    """What Triton's ``initialize`` args say of a text model: its config, the config's string
    parameters, its version folder, and its string inputs (TEXT, and a cross-encoder's
    TEXT_PAIR)."""

    config: dict[str, Any]
    parameters: dict[str, str]
    folder: Path
    inputs: list[str]

    @classmethod
    def read(cls, args: dict[str, Any]) -> ModelArgs:
        config = json.loads(args["model_config"])
        return cls(
            config,
            {k: v["string_value"] for k, v in config.get("parameters", {}).items()},
            Path(args["model_repository"]) / args["model_version"],
            [tensor["name"] for tensor in config["input"]],
        )


class TextEncoder:
    """Texts -> int64 token matrices [rows, padded length], as the Triton model sends them.

    Works on a copy of ``tokenizer`` with its own padding switched off (its pad id, pad type id
    and side are kept): each request is padded here, to a ladder rung.
    """

    def __init__(self, tokenizer, output_names: Sequence[str], ladder: Sequence[int] = ()):
        padding = tokenizer.padding or {}
        self.pad_values = {
            "input_ids": int(padding.get("pad_id", 0)),
            "attention_mask": 0,
            "token_type_ids": int(padding.get("pad_type_id", 0)),
        }
        self.left = padding.get("direction", "right") == "left"
        self.tokenizer = type(tokenizer).from_str(tokenizer.to_str())
        self.tokenizer.no_padding()
        self.truncation = tokenizer.truncation  # max_length and direction, or None
        self.output_names = list(output_names)
        self.ladder = tuple(ladder)

    def encode(self, texts: Sequence[str | tuple[str, str]]) -> dict[str, np.ndarray]:
        """Token tensors of one request's texts (or (text, text_pair) pairs)."""
        return self.encode_requests([texts])[0]

    def encode_requests(
        self, requests: Sequence[Sequence[str | tuple[str, str]]]
    ) -> list[dict[str, np.ndarray]]:
        """Token tensors per request, every text tokenized in one batch, each request padded to
        the rung of its own longest text.

        Raises:
            ValueError: a request's longest text is longer than the ladder's top rung.
        """
        return [self.pad(rows) for rows in self.tokenize(requests)]

    def tokenize(self, requests: Sequence[Sequence[str | tuple[str, str]]]) -> list[list]:
        """Every request's encodings (unpadded), all texts tokenized in one batch."""
        texts: Sequence[Any] = [text for request in requests for text in request]
        if self.truncation:
            texts = cut_texts(texts, self.truncation["max_length"], self.truncation["direction"])
        encodings = self.tokenizer.encode_batch(texts) if texts else []
        grouped, start = [], 0
        for request in requests:
            grouped.append(encodings[start : start + len(request)])
            start += len(request)
        return grouped

    def pad(self, rows) -> dict[str, np.ndarray]:
        """One request's encodings as matrices padded to the rung of its longest row.

        Raises:
            ValueError: the longest row is longer than the ladder's top rung.
        """
        lengths = np.fromiter((len(row.ids) for row in rows), dtype=np.int64, count=len(rows))
        width = padded_length(self.ladder, int(lengths.max()) if len(rows) else 1)
        positions = np.arange(width)[None, :]
        if self.left:
            valid = positions >= width - lengths[:, None]
        else:
            valid = positions < lengths[:, None]
        arrays = {}
        for name in self.output_names:
            field = _ENCODING_FIELDS[name]
            matrix = np.full(valid.shape, self.pad_values[name], dtype=np.int64)
            # Row-major order of the valid positions is each row's tokens in order, either side.
            matrix[valid] = np.fromiter(
                (value for row in rows for value in getattr(row, field)),
                dtype=np.int64,
                count=int(lengths.sum()),
            )
            arrays[name] = matrix
        return arrays


def encode(
    tokenizer,
    texts: Sequence[str | tuple[str, str]],
    output_names: list[str],
    ladder: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """Token tensors [batch, padded length] for one request's ``texts``, truncated as
    tokenizer.json says and padded to the ladder rung of the longest (to the longest itself
    without a ladder)."""
    return TextEncoder(tokenizer, output_names, ladder).encode(texts)


class TritonPythonModel:
    """Every request of one execute call is tokenized in one batch and padded on its own."""

    def initialize(self, args):
        from tokenizers import Tokenizer

        model = ModelArgs.read(args)
        self.inputs = model.inputs
        self.encoder = TextEncoder(
            Tokenizer.from_file(str(model.folder / TOKENIZER_FILE)),
            [output["name"] for output in model.config["output"]],
            parse_ladder(model.parameters.get(LADDER_PARAMETER, "")),
        )

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        decoded, unreadable = read_requests(
            requests,
            lambda request: [
                pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
            ],
            self.inputs,
        )
        responses: list = [None] * len(requests)
        for index, message in unreadable.items():
            responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        tokenized = self.encoder.tokenize(list(decoded.values()))
        for index, rows in zip(decoded, tokenized, strict=True):
            try:
                arrays = self.encoder.pad(rows)
            except ValueError as err:  # a tokenizer.json edited to truncate past the top rung
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
                continue
            tensors = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
