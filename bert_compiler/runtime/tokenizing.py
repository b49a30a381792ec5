"""Texts to checked token rows, as the runtime feeds engines: the row tokenizer of a Hugging Face
fast tokenizer (ids bit for bit, runtime/token_rows.py), the checks on texts and rows, encode's
windows tokenized on a thread or in worker processes, and the length ladder fitted to text."""

from __future__ import annotations

import weakref
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any

import numpy as np

from bert_compiler.core.errors import InputError
from bert_compiler.engines.batching import derive_ladder
from bert_compiler.models.loading import ModelInfo
from bert_compiler.runtime.text import (
    Text,
    check_texts,
    check_token_values,
    default_text_source,
    iter_file_texts,
    raise_unencodable,
    text_list,
    truncation_side,
)
from bert_compiler.runtime.token_rows import RowTokenizer, TokenizerPool, TokenRows
from bert_compiler.runtime.tokens import Tokens

# Sentences of the bundled calibration text a derived ladder is fitted to (never the text a
# benchmark or verify reports on).
LADDER_SENTENCES = 4096
# Rungs of a GPU engine's length ladder: chosen on the calibration sentences, never on reported
# text (scripts/ladder_padding.py; docs/benchmarks.md); a CUDA-graph engine captures at most
# rungs x power-of-two row counts graphs.
LADDER_RUNGS = 32
# encode's windows: the first is small, so the engine starts soon; each next one doubles up to
# WINDOW_ROWS, which bounds memory and still holds several full GPU batches to sort by length.
# A window is one piece of the runtime's pipeline (Encoder._pipelined), so at most CHUNK_ROWS.
WINDOW_FIRST = 4096
WINDOW_ROWS = 32768


def row_tokenizer(tokenizer, max_length: int) -> RowTokenizer:
    """The RowTokenizer (runtime/token_rows.py) of a Hugging Face fast tokenizer at
    ``max_length``, made once per tokenizer, length and truncation side (its piece cache is
    kept with it)."""
    made = _ROW_TOKENIZERS.setdefault(tokenizer, {})
    key = (max_length, truncation_side(tokenizer))
    if key not in made:
        made[key] = new_row_tokenizer(tokenizer, max_length)
    return made[key]


def new_row_tokenizer(tokenizer, max_length: int) -> RowTokenizer:
    """A new RowTokenizer (an empty piece cache) of a Hugging Face fast tokenizer: its
    truncation side, and type ids only where the tokenizer gives the model some."""
    return RowTokenizer(
        tokenizer.backend_tokenizer,
        max_length,
        direction=truncation_side(tokenizer),
        type_ids="token_type_ids" in tokenizer.model_input_names,
    )


_ROW_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenize_rows(tokenizer, texts: Sequence[Text], info: ModelInfo, max_length: int) -> Tokens:
    """Tokenize without padding; every row (a cross-encoder's: every pair) truncated at
    ``max_length``: the Hugging Face tokenizer's ids and type ids, bit for bit
    (runtime/token_rows.py)."""
    texts = text_list(texts)
    if not texts:
        raise InputError("no texts to encode")
    return tokenize_checked(row_tokenizer(tokenizer, max_length), texts, info)


def tokenize_checked(rows: RowTokenizer, texts: list[Text], info: ModelInfo) -> Tokens:
    check_texts(texts, info)
    try:
        encoded = rows.encode(texts)
    except TypeError as err:
        raise_unencodable(texts, err)
        raise
    return checked_tokens(encoded, info)


def checked_tokens(encoded: TokenRows, info: ModelInfo) -> Tokens:
    check_token_values(encoded.ids, encoded.type_ids, info)
    return Tokens(encoded.ids, encoded.type_ids, encoded.lengths)


def check_rows(tokens: Tokens, info: ModelInfo, max_length: int) -> None:
    """Token rows given to ``run`` as the engine's contract has them, checked on the host: flat
    integer ids and type ids of one length, each row 1 to ``max_length`` tokens that add up to
    them, every id inside the model's vocabularies (past it, an engine gathers outside its
    embedding table: an error deep in the backend, or another row's numbers).

    Raises:
        InputError: the first thing out of contract, in one line.
    """
    ids, types, lengths = (np.asarray(a) for a in (tokens.ids, tokens.type_ids, tokens.lengths))
    if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in (ids, types, lengths)):
        raise InputError(
            "token rows: ids, type ids and lengths must be flat integer arrays, got "
            f"{[f'{a.dtype}{list(a.shape)}' for a in (ids, types, lengths)]}"
        )
    if len(types) != len(ids) or int(lengths.sum()) != len(ids):
        raise InputError(
            f"token rows: {len(ids)} ids, {len(types)} type ids and lengths adding up to "
            f"{int(lengths.sum())}: they must agree"
        )
    if lengths.min() < 1 or lengths.max() > max_length:
        raise InputError(
            f"token rows: lengths from {lengths.min()} to {lengths.max()}; each row holds 1 to "
            f"{max_length} tokens"
        )
    check_token_values(ids, types, info)


def checked_window(encoded: Any, window: list[Text], info: ModelInfo, start: int) -> Tokens:
    """A window's Tokens, or its tokenization's TypeError as one line naming the text."""
    if isinstance(encoded, TypeError):
        raise_unencodable(window, encoded, start)
        raise encoded
    return checked_tokens(encoded, info)


def window_sizes() -> Iterator[int]:
    size = WINDOW_FIRST
    while True:
        yield size
        size = min(2 * size, WINDOW_ROWS)


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_pool(rows: RowTokenizer, workers: int) -> TokenizerPool:
    """The worker pool of ``rows`` (one per RowTokenizer and worker count, kept while it
    lives; its processes are stopped when it is collected, or at exit)."""
    pools = _POOLS.setdefault(rows, {})
    if workers not in pools:
        pool = TokenizerPool(rows, workers)
        weakref.finalize(rows, pool.close)
        pools[workers] = pool
    return pools[workers]


def tokenize_on_a_thread(
    rows: RowTokenizer, windows: Iterator[tuple[int, list[Text]]]
) -> Generator[tuple[int, list[Text], Any], None, None]:
    """(start, window, TokenRows or the TypeError its tokenization raised), the next
    window tokenized on a thread while the caller runs this one (the Rust tokenizer
    releases the GIL; the piece cache's loop holds it, briefly)."""

    def tokenize(window: list[Text]) -> Any:
        try:
            return rows.encode(window)
        except TypeError as err:
            return err

    pool = ThreadPoolExecutor(1, thread_name_prefix="bert-compiler-tokenize")
    try:
        pending = None
        for start, window in windows:
            submitted = (start, window, pool.submit(tokenize, window))
            if pending is not None:
                yield pending[0], pending[1], pending[2].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1], pending[2].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def checked_windows(
    windows: Iterator[list[Text]], info: ModelInfo
) -> Iterator[tuple[int, list[Text]]]:
    """(index of its first text in the input, window), each window's texts checked
    (check_texts) as it is read."""
    start = 0
    for window in windows:
        check_texts(window, info, start)
        yield start, window
        start += len(window)


def ladder_from_text(
    tokenizer, info: ModelInfo, max_length: int, rungs: int = LADDER_RUNGS
) -> tuple:
    """The length ladder of at most ``rungs`` fitted lengths (engines/batching.derive_ladder)
    for the first LADDER_SENTENCES texts of the bundled calibration text of the model's kind
    (sentences, or pairs for a cross-encoder: text.default_text_source)."""
    path, column, pair_column = default_text_source(info)
    texts = iter_file_texts(info, path, column=column, pair_column=pair_column)
    tokens = tokenize_rows(tokenizer, list(islice(texts, LADDER_SENTENCES)), info, max_length)
    return derive_ladder(tokens.lengths, max_length, rungs)
