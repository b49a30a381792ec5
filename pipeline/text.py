"""Text -> token feeds, the one way calibration, verification, packaging and TensorRT profile
derivation tokenize: truncation at a checked length, padding to the longest row, host-side checks
of every feed, and the parity set (real sentences plus edge rows)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.core.errors import InputError
from bert_compiler.pipeline.models import ModelInfo

PARITY_BATCH_SIZES = (1, 2, 7, 16, 32)
# Real sentences in the parity set (edge rows come on top).
PARITY_SENTENCES = 96
# The long edge row of verify has as many words as the model's maximum length, but at most this
# many: so it is truncated at exactly the maximum length for models of up to 512 positions (every
# BERT-family encoder trained here), while a model allowing 65,536 positions gets a row of a few
# hundred to a few thousand tokens instead of a full-length attention matrix (about 12 GB for a
# tiny BERT).
EDGE_ROW_MAX_WORDS = 512


def resolve_max_length(info: ModelInfo, requested: int | None) -> int:
    """The truncation length, refusing one longer than the model's position table numbers
    (``max_position_embeddings`` less the architecture's position offset: 2 for RoBERTa)."""
    positions = info.architecture.max_tokens(info.config)
    length = requested if requested is not None else info.max_length
    if not 2 <= length <= positions:
        raise InputError(
            f"--max-length {length}: must be between 2 and {positions}, the token positions of "
            f"the model's max_position_embeddings ({info.config['max_position_embeddings']}) "
            f"in {info.path / 'config.json'}"
        )
    return length


def check_feeds(feeds: Mapping[str, np.ndarray], info: ModelInfo, max_length: int) -> None:
    """Validate token feeds on the host before any engine sees them."""
    shapes = {name: array.shape for name, array in feeds.items()}
    first = next(iter(feeds.values()))
    for name, array in feeds.items():
        if array.dtype != np.int64 or array.ndim != 2 or array.shape != first.shape:
            raise InputError(f"input {name}: expected int64 [batch, sequence], got {shapes}")
    batch, sequence = first.shape
    if batch == 0 or sequence == 0 or sequence > max_length:
        raise InputError(
            f"inputs of shape {first.shape}: batch >= 1, 1 <= sequence <= {max_length}"
        )
    check_token_values(feeds["input_ids"], feeds.get("token_type_ids"), info)


def check_token_values(ids: np.ndarray, types: np.ndarray | None, info: ModelInfo) -> None:
    """Token ids within the vocabulary and type ids within the type vocabulary."""
    if ids.size and (ids.min() < 0 or ids.max() >= info.config["vocab_size"]):
        raise InputError(f"input_ids outside [0, {info.config['vocab_size']})")
    if (
        types is not None
        and types.size
        and (types.min() < 0 or types.max() >= max(1, info.config["type_vocab_size"]))
    ):
        raise InputError(f"token_type_ids outside [0, {info.config['type_vocab_size']})")


def tokenize(
    tokenizer, texts: list[str], info: ModelInfo, max_length: int
) -> dict[str, np.ndarray]:
    """Tokenize a batch to the graph's int64 inputs, padded to the longest row."""
    encoded = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    feeds = {}
    for name in info.architecture.input_names:
        if name == "token_type_ids" and name not in encoded:
            feeds[name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
        else:
            feeds[name] = np.asarray(encoded[name], dtype=np.int64)
    check_feeds(feeds, info, max_length)
    return feeds


def parity_sentences(path: Path | None = None, count: int = PARITY_SENTENCES) -> list[str]:
    """The first ``count`` sentences of a TSV with a ``sentence`` column (default: SST-2 dev)."""
    rows = datasets.read_tsv(Path(path) if path else datasets.SST2_DEV, ("sentence",))
    return [row["sentence"].strip() for row in rows][:count]


def parity_batches(sentences: list[str], max_length: int) -> list[list[str]]:
    """Real sentences in batches of several sizes, then edge-row batches."""
    batches, start = [], 0
    sizes = iter(PARITY_BATCH_SIZES * (1 + len(sentences) // sum(PARITY_BATCH_SIZES)))
    while start < len(sentences):
        size = next(sizes)
        batches.append(sentences[start : start + size])
        start += size
    # At least one token per word, so at max_length tokens after truncation (EDGE_ROW_MAX_WORDS).
    count = min(max_length, EDGE_ROW_MAX_WORDS)
    words = " ".join(sentences).split() or ["word"]
    long_text = " ".join((words * (1 + count // len(words)))[:count])
    batches.append(["", sentences[0], long_text])
    batches.append(["a"])
    batches.append([long_text])
    return batches
