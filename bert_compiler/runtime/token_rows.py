"""Texts -> flat token rows (every row's ids back to back, and each row's length), bit-identical
to the model's Hugging Face tokenizer with truncation, and fast enough to keep up with a GPU
engine.

The Rust tokenizer itself costs tens of microseconds a sentence, and building a Python list per
row doubles that. For a WordPiece tokenizer with BERT's normalizer and pre-tokenizer (BERT,
DistilBERT, ELECTRA, MPNet) the tokens of a text are the tokens of its space-separated pieces
one after another: each normalizer step maps characters one by one, and U+0020 is always a word
boundary. So ``RowTokenizer`` keeps a bounded cache of piece -> ids, tokenizes the pieces it has
not seen in one Rust batch, and builds each row by joining cached tuples; special tokens and
truncation are added as the tokenizer's post-processor and truncation would. Every other
tokenizer (byte-level BPE, SentencePiece, pairs, added tokens that span or strip spaces) takes
the Rust tokenizer's batch API with its truncation, converted to arrays. docs/tokenization.md
says how this was chosen and measured.

``TokenizerPool`` runs RowTokenizers in worker processes (the cache loop holds the GIL), so a
window of texts is tokenized on several cores while the engine runs the previous one.

Imports numpy and ``tokenizers`` only: `bert-compile package` copies this file beside the Triton
text models' model.py, which run where bert-compiler is not installed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import deque
from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

# Pieces cached per tokenizer before the cache is emptied and refilled: a piece and its ids take
# about 150 bytes, so the cache stays under about 40 MB whatever is tokenized.
CACHE_PIECES = 1 << 18
# Longer pieces are tokenized but not cached (a URL, a run of symbols, a hostile 10 MB "word").
CACHE_PIECE_CHARS = 64
# Characters of a text read per token of max_length: a text is cut at max_length x this many
# before it is tokenized, from its end where truncation keeps the last tokens. The Rust tokenizer
# tokenizes a whole text before truncating it, in memory many times the text's size (figures:
# docs/benchmarks.md, "Memory of one long text"); a WordPiece token spans at most 100 characters
# of its word, and real text about 5, so the first max_length tokens change only for a text whose
# tokens are spread over more than this many characters each (runs of thousands of spaces or
# control characters).
TEXT_CHARS_PER_TOKEN = 128
_SPACE = " "
# Normalizers and pre-tokenizers whose steps map characters one at a time and split at U+0020,
# so a text's tokens are its space-separated pieces' tokens in order (the word cache is exact).
_PIECEWISE_NORMALIZERS = {None, "BertNormalizer"}
_PIECEWISE_PRE_TOKENIZERS = {"BertPreTokenizer"}
_PIECEWISE_MODELS = {"WordPiece"}


def cut_texts(texts: Sequence[Any], max_length: int, direction: str) -> Sequence[Any]:
    """``texts`` (single texts or pairs, each side cut alone) with every text longer than
    max_length x TEXT_CHARS_PER_TOKEN characters cut to that many: its first ones, or with
    ``direction`` "left" its last. Anything but a str is left for the tokenizer to refuse."""
    limit = max_length * TEXT_CHARS_PER_TOKEN

    def cut(text: Any) -> Any:
        if isinstance(text, str):
            if len(text) <= limit:
                return text
            return text[:limit] if direction == "right" else text[-limit:]
        if isinstance(text, tuple) and len(text) == 2:
            return (cut(text[0]), cut(text[1]))
        return text

    if all(isinstance(text, str) and len(text) <= limit for text in texts):
        return texts
    return [cut(text) for text in texts]


@dataclass(frozen=True)
class TokenRows:
    """Token rows, flat: ids and type ids of every row back to back (int64), each row's
    length."""

    ids: np.ndarray
    type_ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def concat_rows(parts: Sequence[TokenRows]) -> TokenRows:
    """Several TokenRows as one, in order."""
    if len(parts) == 1:
        return parts[0]
    return TokenRows(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.type_ids for p in parts]),
        np.concatenate([p.lengths for p in parts]),
    )


def piecewise(tokenizer_json: str) -> bool:
    """Whether a tokenizer's texts tokenize piece by piece at U+0020 (see the module
    docstring): BERT's normalizer (or none), BERT's pre-tokenizer, WordPiece, and no added token
    that holds a space or strips the spaces beside it."""
    spec = json.loads(tokenizer_json)
    normalizer = (spec.get("normalizer") or {}).get("type")
    pre_tokenizer = (spec.get("pre_tokenizer") or {}).get("type")
    model = (spec.get("model") or {}).get("type")
    added = spec.get("added_tokens") or []
    return (
        normalizer in _PIECEWISE_NORMALIZERS
        and pre_tokenizer in _PIECEWISE_PRE_TOKENIZERS
        and model in _PIECEWISE_MODELS
        and not any(
            token.get("lstrip")
            or token.get("rstrip")
            or any(c.isspace() for c in token.get("content", ""))
            for token in added
        )
    )


class RowTokenizer:
    """Texts (or (text, text_pair) pairs) -> TokenRows, equal to the Hugging Face tokenizer's
    ``tokenizer(texts, truncation="longest_first", max_length=max_length)``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (the model's; its own truncation and padding are
            ignored: copies are made with the settings here).
        max_length: the truncation length, special tokens included.
        direction: "right" keeps a row's first tokens, "left" its last (the Hugging Face
            tokenizer's ``truncation_side``).
        word_cache: use the piece cache where the tokenizer allows it (off: always the Rust
            batch API).
        type_ids: the tokenizer's type ids; off, every type id is 0 (what the Hugging Face
            tokenizer of a model without token types, DistilBERT's, gives the runtime).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        *,
        direction: str = "right",
        word_cache: bool = True,
        type_ids: bool = True,
    ):
        if max_length < 2:
            raise ValueError(f"max_length {max_length}: expected 2 or more")
        if direction not in ("right", "left"):
            raise ValueError(f"truncation direction {direction!r}: expected right or left")
        serialized = tokenizer.to_str()
        self.max_length = max_length
        self.direction = direction
        self.type_ids = type_ids
        self.truncating = type(tokenizer).from_str(serialized)
        self.truncating.no_padding()
        self.truncating.enable_truncation(max_length, strategy="longest_first", direction=direction)
        self._pieces = type(tokenizer).from_str(serialized)
        self._pieces.no_padding()
        self._pieces.no_truncation()
        self._cache: dict[str, tuple[int, ...]] = {}
        self._frame = self._special_frame() if word_cache and piecewise(serialized) else None

    def settings(self) -> tuple[str, int, str, bool, bool]:
        """What makes a twin of this RowTokenizer in another process (_start_worker): the
        tokenizer's JSON, max_length, direction, word_cache and type_ids."""
        return (
            self._pieces.to_str(),
            self.max_length,
            self.direction,
            self._frame is not None,
            self.type_ids,
        )

    @property
    def cached(self) -> bool:
        """Whether single texts take the piece cache."""
        return self._frame is not None

    def _special_frame(self) -> tuple[list[int], list[int], list[int], list[int], int] | None:
        """The post-processor's special tokens around a single text (ids and type ids before
        and after it) and its content type id, read off a probe encoding; None when no probe
        word gives a row of special tokens around content."""
        for probe in ("a", "the", "x", "1", "."):
            encoding = self._pieces.encode(probe)
            special = encoding.special_tokens_mask
            content = [i for i, s in enumerate(special) if not s]
            if not content or content != list(range(content[0], content[-1] + 1)):
                continue
            first, last = content[0], content[-1] + 1
            ids, types = encoding.ids, encoding.type_ids
            if len(set(types[first:last])) != 1:
                continue
            frame = (ids[:first], types[:first], ids[last:], types[last:], types[first])
            if len(frame[0]) + len(frame[2]) >= self.max_length:
                return None
            return frame
        return None

    def encode(self, texts: Sequence[Any]) -> TokenRows:
        """The token rows of ``texts``, in order.

        Raises:
            TypeError: a text is not a str (or a pair of str), or not encodable as UTF-8 (the
                Rust tokenizer's own error).
        """
        if not len(texts):
            empty = np.zeros(0, np.int64)
            return TokenRows(empty, empty, empty)
        texts = cut_texts(texts, self.max_length, self.direction)
        if self._frame is not None and isinstance(texts[0], str):
            rows = self._encode_cached(texts)
        else:
            rows = self._encode_batch(texts)
        if not self.type_ids:
            rows = TokenRows(rows.ids, np.zeros_like(rows.ids), rows.lengths)
        return rows

    def _encode_batch(self, texts: Sequence[Any]) -> TokenRows:
        encodings = self.truncating.encode_batch_fast(list(texts))
        lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
        total = int(lengths.sum())
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, total)
        types = np.fromiter(chain.from_iterable(e.type_ids for e in encodings), np.int64, total)
        return TokenRows(ids, types, lengths)

    def _learn(self, texts: Sequence[str]) -> None:
        """Cache the ids of every short piece of ``texts`` not cached yet (one Rust batch)."""
        cache = self._cache
        pieces = set(_SPACE.join(texts).split(_SPACE)).difference(cache)
        unseen = [piece for piece in pieces if len(piece) <= CACHE_PIECE_CHARS]
        if not unseen:
            return
        if len(cache) + len(unseen) > CACHE_PIECES:
            cache.clear()
        encodings = self._pieces.encode_batch_fast(unseen, add_special_tokens=False)
        cache.update(zip(unseen, (tuple(e.ids) for e in encodings), strict=True))

    def _encode_cached(self, texts: Sequence[Any]) -> TokenRows:
        assert self._frame is not None  # encode takes this path only with a frame
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"expected str texts, got {type(text).__name__}")
        self._learn(texts)
        before_ids, before_types, after_ids, after_types, content_type = self._frame
        before, after = tuple(before_ids), tuple(after_ids)
        limit = self.max_length - len(before) - len(after)
        right = self.direction == "right"
        get = self._cache.__getitem__
        rows: list[tuple[int, ...]] = []
        uncached: list[int] = []
        for index, text in enumerate(texts):
            try:
                content = tuple(chain.from_iterable(map(get, text.split(_SPACE))))
            except KeyError:  # a piece too long to cache, or the cache was emptied meanwhile
                uncached.append(index)
                rows.append(())
                continue
            if len(content) > limit:
                content = content[:limit] if right else content[len(content) - limit :]
            rows.append(before + content + after)
        if uncached:
            # The same post-processor frames these rows: only their ids come from the batch.
            encodings = self.truncating.encode_batch_fast([texts[i] for i in uncached])
            for index, encoding in zip(uncached, encodings, strict=True):
                rows[index] = tuple(encoding.ids)
        lengths = np.fromiter(map(len, rows), np.int64, len(rows))
        ids = np.fromiter(chain.from_iterable(rows), np.int64, int(lengths.sum()))
        content_lengths = lengths - len(before) - len(after)
        types = _frame_types(content_lengths, before_types, after_types, content_type)
        return TokenRows(ids, types, lengths)


def _starts(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def _frame_types(
    content_lengths: np.ndarray, before: list[int], after: list[int], content_type: int
) -> np.ndarray:
    """Type ids of framed rows: ``before`` then the content's type then ``after``, per row."""
    lengths = content_lengths + len(before) + len(after)
    types = np.full(int(lengths.sum()), content_type, np.int64)
    starts = _starts(lengths)
    for offset, value in enumerate(before):
        types[starts + offset] = value
    ends = starts + lengths
    for offset, value in enumerate(after):
        types[ends - len(after) + offset] = value
    return types


# -- worker processes --------------------------------------------------------------------------

_WORKER: RowTokenizer | None = None


def _start_worker(
    tokenizer_json: str, max_length: int, direction: str, word_cache: bool, type_ids: bool
) -> None:
    global _WORKER
    from tokenizers import Tokenizer

    # One core a worker: the pool is the parallelism (the Rust batch's own threads would
    # oversubscribe the cores).
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER = RowTokenizer(
        Tokenizer.from_str(tokenizer_json),
        max_length,
        direction=direction,
        word_cache=word_cache,
        type_ids=type_ids,
    )


def _worker_encode(texts: list[Any]) -> TokenRows:
    assert _WORKER is not None, "tokenizer worker not started"
    return _WORKER.encode(texts)


class TokenizerPool:
    """RowTokenizers in ``workers`` processes: windows of texts in, TokenRows out in order,
    tokenized ahead while the caller works on earlier windows.

    Workers are started (spawned: nothing of the caller's state, CUDA included, is inherited)
    on first use and stopped by ``close``.
    """

    # Texts a worker gets at once: enough to amortise the pickling, few enough to spread a
    # window over every worker.
    PIECE_ROWS = 1024

    def __init__(self, row_tokenizer: RowTokenizer, workers: int):
        if workers < 1:
            raise ValueError(f"tokenizer workers {workers}: expected 1 or more")
        self.workers = workers
        self._args = row_tokenizer.settings()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=self._args,
            )
        return self._executor

    def map_windows(
        self, windows: Iterable[tuple[Any, list[Any]]], ahead: int = 2
    ) -> Generator[tuple[Any, list[Any], TokenRows | TypeError], None, None]:
        """For each (tag, window), in order: (tag, window, its TokenRows), or with the TypeError
        its tokenization raised (a text UTF-8 cannot encode); up to ``ahead`` windows are
        tokenized ahead of the one being consumed."""
        pool = self._pool()
        pending: deque[tuple[Any, list[Any], list[Future]]] = deque()

        def submit(tag: Any, window: list[Any]) -> None:
            step = max(1, min(self.PIECE_ROWS, -(-len(window) // self.workers)))
            pieces = range(0, len(window), step)
            futures = [pool.submit(_worker_encode, window[i : i + step]) for i in pieces]
            pending.append((tag, window, futures))

        def collect() -> tuple[Any, list[Any], TokenRows | TypeError]:
            tag, window, futures = pending.popleft()
            try:
                return tag, window, concat_rows([future.result() for future in futures])
            except TypeError as err:
                return tag, window, err

        try:
            for tag, window in windows:
                submit(tag, window)
                if len(pending) > ahead:
                    yield collect()
            while pending:
                yield collect()
        finally:
            for _tag, _window, futures in pending:
                for future in futures:
                    future.cancel()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
