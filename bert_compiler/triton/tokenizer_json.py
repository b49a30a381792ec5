"""The tokenizer.json package writes (the model's tokenizer with the truncation and padding verify
used), and the gate's check that it tokenizes as the pipeline does."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import InputError
from bert_compiler.engines.batching import rung
from bert_compiler.models.loading import ModelInfo, load_tokenizer
from bert_compiler.runtime.text import (
    parity_batches,
    parity_texts,
    tokenize,
)
from bert_compiler.triton.tokenizer_model import (
    TextEncoder,
)

log = logging.getLogger("bert_compile")


def tokenizer_json(info: ModelInfo, max_length: int) -> str:
    """The model's fast tokenizer as tokenizer.json, with verify's truncation and padding set in
    it (padding to the longest row, truncation at ``max_length``).

    Raises:
        InputError: the model folder has only a slow (Python) tokenizer.
    """
    from tokenizers import Tokenizer

    hf = load_tokenizer(info)
    if not getattr(hf, "is_fast", False):
        raise InputError(f"{info.path}: only a slow tokenizer; the Triton model needs a fast one")
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length, direction=hf.truncation_side)
    tokenizer.enable_padding(
        direction=hf.padding_side,
        pad_id=hf.pad_token_id,
        pad_type_id=hf.pad_token_type_id,
        pad_token=hf.pad_token,
    )
    return tokenizer.to_str()


def tokenizer_mismatches(
    info: ModelInfo, tokenizer_file: Path, max_length: int, ladder: Sequence[int] = ()
) -> dict[str, Any]:
    """Compare a tokenizer.json, run as the Triton tokenizer model runs it (every batch as one
    request, padded to the ``ladder`` rung of its longest text; and all batches in one execute
    call, which must not change any of them), with the pipeline's tokenization padded to the
    same rung, on verify's parity batches (real sentences plus edge rows).

    Returns:
        ``{"batches": N, "mismatches": [...]}``; empty mismatches means identical tensors.
    """
    import numpy as np
    from tokenizers import Tokenizer

    try:
        repository_tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises its own Exception subclass for a bad file
        raise InputError(f"{tokenizer_file}: not a tokenizer.json ({err})") from err
    hf = load_tokenizer(info)
    names = list(info.architecture.input_names)
    batches = parity_batches(parity_texts(info), max_length)
    encoder = TextEncoder(repository_tokenizer, names, ladder)
    together = encoder.encode_requests(batches)
    pad_values = {
        "input_ids": hf.pad_token_id or 0,
        "attention_mask": 0,
        "token_type_ids": hf.pad_token_type_id,
    }
    mismatches = []
    for index, texts in enumerate(batches):
        expected = tokenize(hf, texts, info, max_length)
        width = rung(ladder, expected["input_ids"].shape[1])
        alone = encoder.encode(texts)
        for name in names:
            extra = width - expected[name].shape[1]
            side = (extra, 0) if hf.padding_side == "left" else (0, extra)
            wanted = np.pad(expected[name], ((0, 0), side), constant_values=pad_values[name])
            for how, actual in (("alone", alone), ("batched", together[index])):
                got = actual[name]
                if got.shape != wanted.shape or (got != wanted).any():
                    mismatches.append(
                        f"batch {index} ({len(texts)} texts, {how}): {name} {got.shape} differs "
                        f"from the pipeline's {wanted.shape}"
                    )
    return {"batches": len(batches), "mismatches": mismatches}
