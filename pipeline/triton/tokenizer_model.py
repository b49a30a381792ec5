"""Triton Python-backend model: raw strings in, the engine's int64 token tensors out.

`bert-compile package` copies this file verbatim to ``<model>-tokenizer/1/model.py`` beside the
``tokenizer.json`` it loads. Truncation and padding are stored inside that tokenizer.json (set by
the packager to exactly what verify used), so this file has no tokenization settings of its own,
and `verify --repository` checks the same file against the pipeline's tokenizer.

Triton's Python environment needs numpy and ``tokenizers``. This module imports neither Triton's
``triton_python_backend_utils`` nor ``tokenizers`` at import time, so it can be tested anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
TEXT_INPUT = "TEXT"
_ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}


def decode_texts(raw: np.ndarray) -> list[str]:
    """The strings of a TYPE_STRING tensor [batch, 1] (bytes from the wire, UTF-8).

    Raises:
        UnicodeDecodeError: an element is not UTF-8.
    """
    return [
        item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in raw.reshape(-1)
    ]


def encode(tokenizer, texts: list[str], output_names: list[str]) -> dict[str, np.ndarray]:
    """Token tensors [batch, longest] for ``texts``, padded and truncated as tokenizer.json says."""
    encodings = tokenizer.encode_batch(texts)
    return {
        name: np.array([getattr(e, _ENCODING_FIELDS[name]) for e in encodings], dtype=np.int64)
        for name in output_names
    }


class TritonPythonModel:
    """Each request is tokenized on its own, so its padded length never depends on the other
    requests Triton batched with it."""

    def initialize(self, args):
        from tokenizers import Tokenizer

        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.output_names = [output["name"] for output in config["output"]]

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT).as_numpy()
            try:
                texts = decode_texts(raw)
            except UnicodeDecodeError as err:
                error = pb_utils.TritonError(f"{TEXT_INPUT} must be UTF-8 text ({err})")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            arrays = encode(self.tokenizer, texts, self.output_names)
            tensors = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
