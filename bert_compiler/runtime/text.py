"""Text -> token feeds, the one way calibration, verification, packaging and TensorRT profile
derivation tokenize: truncation at a checked length, padding to the longest row, host-side checks
of every feed, and the parity set (real sentences plus edge rows).

A cross-encoder (``ModelInfo.pairs``) reads (text, text_pair) pairs everywhere another model reads
one text: through the tokenizer's own pair template, truncated longest first, as the Hugging Face
tokenizer (and sentence-transformers' CrossEncoder) does."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.core.errors import InputError
from bert_compiler.models.loading import ModelInfo
from bert_compiler.runtime.token_rows import cut_texts

# One text a model reads: a string, or a cross-encoder's (text, text_pair).
Text = str | tuple[str, str]
PARITY_BATCH_SIZES = (1, 2, 7, 16, 32)
# Real sentences in the parity set (edge rows come on top).
PARITY_SENTENCES = 96
# The long edge row of verify has as many words as the model's maximum length, but at most this
# many: so it is truncated at exactly the maximum length for models of up to 512 positions (every
# BERT-family encoder trained here), while a model allowing 65,536 positions gets a row of a few
# hundred to a few thousand tokens instead of a full-length attention matrix (gigabytes even for
# a tiny BERT: docs/benchmarks.md, "Memory of one long text").
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


def text_list(texts: Any) -> list[Any]:
    """``texts`` (a list, tuple, array or any ordered iterable of texts) as a list, in order.

    Raises:
        InputError: one bare string or bytes (iterating it would encode each character as a
            text), a set (no order: outputs come back in input order), a mapping, or something
            that is not iterable.
    """
    if isinstance(texts, (str, bytes, bytearray)):
        raise InputError(
            f"texts: got one {type(texts).__name__} ({len(texts)} long), expected a list of texts; "
            "wrap a single text in a list"
        )
    if isinstance(texts, (set, frozenset)):
        raise InputError(
            f"texts: a {type(texts).__name__} has no order and outputs come back in input order; "
            "pass a list"
        )
    if isinstance(texts, Mapping):
        raise InputError(
            f"texts: a {type(texts).__name__} (its keys would be encoded); pass a list of texts"
        )
    try:
        return list(texts)
    except TypeError as err:
        raise InputError(f"texts: {type(texts).__name__} is not a list of texts") from err


def text_windows(texts: Any, sizes: Iterator[int]) -> Iterator[list[Any]]:
    """``texts`` (as ``text_list`` takes them, or an iterator of any length) in consecutive
    lists of the lengths ``sizes`` gives, read as they are needed: memory holds one window.

    Raises:
        InputError: as text_list, at once (not at the first window).
    """
    if isinstance(texts, (str, bytes, bytearray, set, frozenset, Mapping)):
        text_list(texts)  # raises its one line
    try:
        iterator = iter(texts)
    except TypeError as err:
        raise InputError(f"texts: {type(texts).__name__} is not a list of texts") from err

    def windows() -> Iterator[list[Any]]:
        for size in sizes:
            window = list(islice(iterator, size))
            if not window:
                return
            yield window

    return windows()


def check_texts(texts: Sequence[Any], info: ModelInfo, start: int = 0) -> None:
    """Pairs for a cross-encoder, single strings for every other model (``start``: the index
    of ``texts[0]`` in what the caller was given, for the message).

    Raises:
        InputError: the first text of the wrong kind, in one line.
    """
    for index, text in enumerate(texts, start):
        pair = isinstance(text, tuple) and len(text) == 2 and all(isinstance(t, str) for t in text)
        if info.pairs and not pair:
            raise InputError(
                f"text {index}: {info.name} is a cross-encoder (one score per text pair); give "
                f"(text, text_pair) pairs, not {type(text).__name__}"
            )
        if not info.pairs and not isinstance(text, str):
            raise InputError(f"text {index}: {info.name} reads single texts, not {_kind(text)}")


def _kind(text: Any) -> str:
    if isinstance(text, tuple):
        return "pairs (text pairs are for cross-encoders: one-label sequence classifiers)"
    return type(text).__name__


def truncation_side(tokenizer: Any) -> str:
    """Which end of a text a Hugging Face tokenizer keeps when it truncates: "right" keeps the
    first tokens (its default), "left" the last."""
    return str(getattr(tokenizer, "truncation_side", "right"))


def encode_texts(
    tokenizer, texts: Sequence[Text], info: ModelInfo, max_length: int | None, **kwargs: Any
):
    """The Hugging Face tokenizer's encoding of ``texts`` (no truncation where ``max_length`` is
    None): pairs through the model's pair template (BERT: [CLS] a [SEP] b [SEP], type ids 0 then
    1; RoBERTa and XLM-R: <s> a </s></s> b </s>), truncated longest first, each text first cut
    as the runtime cuts it (token_rows.cut_texts), so a reference and an engine read the same
    characters.

    Raises:
        InputError: pairs given to a single-text model, or single texts to a cross-encoder.
    """
    check_texts(texts, info)
    if max_length is not None:
        texts = cut_texts(texts, max_length, truncation_side(tokenizer))
    truncation: dict[str, Any] = (
        {"truncation": "longest_first", "max_length": max_length}
        if max_length is not None
        else {"truncation": False}
    )
    try:
        if info.pairs:
            firsts = [text[0] for text in texts]
            seconds = [text[1] for text in texts]
            return tokenizer(firsts, seconds, **truncation, **kwargs)
        return tokenizer(list(texts), **truncation, **kwargs)
    except TypeError as err:
        raise_unencodable(texts, err)
        raise


def raise_unencodable(texts: Sequence[Text], err: TypeError, start: int = 0) -> None:
    """Raise InputError naming the first text UTF-8 cannot encode, if there is one: the
    tokenizer takes only what UTF-8 encodes, and a lone surrogate ("\\ud800") is a str Python
    holds and the tokenizer refuses (with a TypeError)."""
    for index, text in enumerate(texts, start):
        for part in (text,) if isinstance(text, str) else text:
            try:
                part.encode("utf-8")
            except UnicodeEncodeError as bad:
                raise InputError(
                    f"text {index}: not encodable as UTF-8 at character {bad.start} "
                    f"({bad.reason}); pass valid Unicode text"
                ) from err


def iter_file_texts(
    info: ModelInfo,
    path: Path,
    *,
    column: str,
    pair_column: str | None,
    flags: tuple[str, str] = ("--text-column", "--pair-column"),
) -> Iterator[Text]:
    """The texts of a data file as ``info`` reads them (check_pair_column, then read_texts).

    Raises:
        InputError: as check_pair_column and the file readers.
    """
    check_pair_column(info, path, pair_column, column=column, flags=flags)
    return read_texts(path, column=column, pair_column=pair_column)


def check_pair_column(
    info: ModelInfo,
    path: Path | str,
    pair_column: str | None,
    *,
    column: str | None = None,
    flags: tuple[str, str] = ("--text-column", "--pair-column"),
) -> None:
    """A pair column for a cross-encoder's data file, none for any other model's, and not the
    text ``column`` itself.

    Args:
        flags: the command's options for the text column and the pair column, named in the
            error (bench's are --data-column and --data-pair-column).

    Raises:
        InputError: a cross-encoder without a pair column, a single-text model with one, or a
            pair column that is the text column.
    """
    text_flag, pair_flag = flags
    if info.pairs and pair_column is None:
        raise InputError(
            f"{path}: {info.name} is a cross-encoder (one score per text pair): name the file's "
            f"second text column with {pair_flag} (the first is {text_flag})"
        )
    if not info.pairs and pair_column is not None:
        raise InputError(
            f"{pair_flag} {pair_column!r}: {info.name} reads single texts; text pairs are for "
            "cross-encoders (sequence classifiers with num_labels 1)"
        )
    if pair_column is not None and pair_column == column:
        raise InputError(
            f"{pair_flag} {pair_column!r} is also {text_flag}: each pair would be one text "
            f"twice; name the column of each pair's second text in {path}"
        )


def read_texts(
    path: Path,
    *,
    column: str,
    pair_column: str | None,
    skipped: datasets.Skipped | None = None,
) -> Iterator[Text]:
    """``column``'s texts of a data file, or (``column``, ``pair_column``) pairs
    (datasets.iter_texts / iter_pairs; rows with an empty text counted in ``skipped``)."""
    if pair_column is None:
        return datasets.iter_texts(path, column=column, skipped=skipped)
    return datasets.iter_pairs(path, columns=(column, pair_column), skipped=skipped)


def default_text_source(info: ModelInfo) -> tuple[Path, str, str | None]:
    """The bundled calibration text of ``info``'s kind, its column and pair column: sentences,
    or STS-B train pairs for a cross-encoder (never the dev sets metrics are reported on)."""
    if info.pairs:
        return datasets.CALIBRATION_PAIRS, *datasets.PAIR_COLUMNS
    return datasets.CALIBRATION_SENTENCES, datasets.TEXT_COLUMN, None


def tokenize(
    tokenizer, texts: Sequence[Text], info: ModelInfo, max_length: int
) -> dict[str, np.ndarray]:
    """Tokenize a batch to the graph's int64 inputs, padded to the longest row."""
    encoded = encode_texts(tokenizer, texts, info, max_length, padding=True, return_tensors="np")
    feeds = {}
    for name in info.architecture.input_names:
        if name == "token_type_ids" and name not in encoded:
            feeds[name] = np.zeros_like(encoded["input_ids"], dtype=np.int64)
        else:
            feeds[name] = np.asarray(encoded[name], dtype=np.int64)
    check_feeds(feeds, info, max_length)
    return feeds


def default_parity_file(info: ModelInfo) -> Path:
    """SST-2 dev sentences, or STS-B dev pairs for a cross-encoder."""
    return datasets.STSB_DEV if info.pairs else datasets.SST2_DEV


def parity_texts(
    info: ModelInfo, path: Path | None = None, count: int = PARITY_SENTENCES
) -> list[Text]:
    """The first ``count`` texts of a TSV with a ``sentence`` column, or for a cross-encoder
    the pairs of its ``sentence1`` and ``sentence2`` columns (default_parity_file)."""
    path = Path(path) if path else default_parity_file(info)
    if info.pairs:
        first, second = datasets.PAIR_COLUMNS
        rows = datasets.read_tsv(path, datasets.PAIR_COLUMNS)
        pairs: list[Text] = [(row[first].strip(), row[second].strip()) for row in rows]
        return pairs[:count]
    rows = datasets.read_tsv(path, (datasets.TEXT_COLUMN,))
    texts: list[Text] = [row[datasets.TEXT_COLUMN].strip() for row in rows]
    return texts[:count]


def parity_batches(texts: list[Text], max_length: int) -> list[list[Text]]:
    """Real texts in batches of several sizes, then edge-row batches (pairs of edge texts, and
    a pair truncated on one side only, for a cross-encoder)."""
    batches, start = [], 0
    sizes = iter(PARITY_BATCH_SIZES * (1 + len(texts) // sum(PARITY_BATCH_SIZES)))
    while start < len(texts):
        size = next(sizes)
        batches.append(texts[start : start + size])
        start += size
    # At least one token per word, so at max_length tokens after truncation (EDGE_ROW_MAX_WORDS).
    count = min(max_length, EDGE_ROW_MAX_WORDS)
    parts = [part for text in texts for part in ((text,) if isinstance(text, str) else text)]
    words = " ".join(parts).split() or ["word"]
    long_text = " ".join((words * (1 + count // len(words)))[:count])
    if texts and isinstance(texts[0], tuple):
        batches.append([("", ""), texts[0], (long_text, long_text)])
        batches.append([("a", "b")])
        batches.append([(long_text, "a")])
        return batches
    batches.append(["", texts[0], long_text])
    batches.append(["a"])
    batches.append([long_text])
    return batches
