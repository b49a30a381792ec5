"""How variable-length rows become engine batches: sort by length, fill each batch up to a token
budget and a row limit, pad it to a rung of a length ladder.

Real text is short and uneven (STS-B dev: median 14 tokens, p99 38). Padding each batch of rows in
dataset order to its longest row spends about half the positions on padding; sorting first makes
every batch nearly uniform, so most of the compute goes to real tokens. A ladder of padded lengths
bounds the number of distinct shapes an engine sees (one CUDA graph or TensorRT tuning per shape)
and lets Triton batch requests of one rung together. The same module plans batches for the runtime
(runtime/encoder.py) and the ladder for the Triton tokenizer model, so both serve one set of
shapes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bert_compiler.core.errors import InputError

# Shortest row any BERT-family tokenizer produces: [CLS] [SEP].
MIN_ROW_TOKENS = 2
# With round_rows, batch row counts are powers of two up to max_batch / ROW_STEPS, then multiples
# of that step: 16 sizes for 1024 rows. Powers of two alone pad a batch of 520 rows to 1024 (the
# last batch of every rung, and every batch a token budget caps between two powers).
ROW_STEPS = 8


@dataclass(frozen=True)
class BatchingSpec:
    """How rows are grouped into engine calls.

    Attributes:
        max_batch: most rows in one call.
        token_budget: most padded positions (rows x padded length) in one call; a single row
            longer than the budget still forms a batch of its own.
        ladder: padded lengths, ascending; a batch is padded to the shortest rung that holds its
            longest row. Empty: each batch is padded to its longest row.
        round_rows: pad a batch's row count up to one of ``row_sizes(max_batch)`` with copies
            of its first row, so a CUDA-graph engine captures a bounded set of shapes.
        sort: order rows by length before batching (off: dataset order, the baseline).
    """

    max_batch: int = 64
    token_budget: int = 8192
    ladder: tuple[int, ...] = ()
    round_rows: bool = False
    sort: bool = True

    def validate(self) -> None:
        if self.max_batch < 1 or self.token_budget < 1:
            raise InputError(
                f"batching: max batch {self.max_batch} and token budget {self.token_budget} "
                "must be >= 1"
            )
        if list(self.ladder) != sorted(set(self.ladder)) or (
            self.ladder and self.ladder[0] < MIN_ROW_TOKENS
        ):
            raise InputError(
                f"length ladder {list(self.ladder)}: expected distinct lengths >= "
                f"{MIN_ROW_TOKENS} in ascending order"
            )


@dataclass(frozen=True)
class Batch:
    """One engine call: ``rows`` (indices into the input) padded to ``length`` tokens, with
    ``size - len(rows)`` filler rows appended."""

    rows: np.ndarray
    length: int
    size: int


def rung(ladder: Sequence[int], length: int) -> int:
    """The shortest ladder length that holds ``length`` tokens (``length`` itself without a
    ladder).

    Raises:
        InputError: the row is longer than the ladder's top rung.
    """
    if not ladder:
        return length
    index = bisect.bisect_left(ladder, length)
    if index == len(ladder):
        raise InputError(
            f"a row of {length} tokens is longer than the length ladder's top rung {ladder[-1]}"
        )
    return int(ladder[index])


def derive_ladder(
    lengths: Sequence[int] | np.ndarray, max_length: int, rungs: int = 8
) -> tuple[int, ...]:
    """The ladder of at most ``rungs`` lengths that pads a sample of real rows least (an exact
    1-D partition of the length histogram by dynamic programming), then rungs 1.5x apart up to
    ``max_length``.

    Raises:
        InputError: no lengths, fewer than one rung, or a length outside [1, max_length].
    """
    if not len(lengths):
        raise InputError("cannot derive a length ladder from no rows")
    if rungs < 1 or max_length < MIN_ROW_TOKENS:
        raise InputError(
            f"a length ladder needs >= 1 rung and a maximum length >= {MIN_ROW_TOKENS}"
        )
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    if values[0] < 1 or values[-1] > max_length:
        raise InputError(f"row lengths must lie in [1, {max_length}]")
    distinct = len(values)
    # cost(i, j): padding when rows of the distinct lengths i..j all pad to values[j].
    prefix_rows = np.concatenate([[0], np.cumsum(counts)])
    prefix_tokens = np.concatenate([[0], np.cumsum(counts * values)])

    def cost(first: np.ndarray | int, last: int) -> np.ndarray:
        # Padding when the rows of distinct lengths first..last all pad to values[last].
        rows = prefix_rows[last + 1] - prefix_rows[first]
        return values[last] * rows - (prefix_tokens[last + 1] - prefix_tokens[first])

    steps = min(rungs, distinct)
    inf = np.iinfo(np.int64).max // 4
    # best[k, j]: least padding covering distinct lengths 0..j with k+1 rungs, the last at j.
    best = np.full((steps, distinct), inf, dtype=np.int64)
    choice = np.zeros((steps, distinct), dtype=np.int64)
    best[0] = [cost(0, j) for j in range(distinct)]
    for k in range(1, steps):
        for j in range(k, distinct):
            previous = np.arange(k - 1, j)  # the rung below: last length of the previous group
            totals = best[k - 1, previous] + cost(previous + 1, j)
            pick = int(np.argmin(totals))
            best[k, j], choice[k, j] = totals[pick], previous[pick]
    k = int(np.argmin(best[:, distinct - 1]))
    ladder, j = [], distinct - 1
    while True:
        ladder.append(int(values[j]))
        if k == 0:
            break
        j, k = int(choice[k][j]), k - 1
    # Above the longest row of the sample, rungs 1.5x apart up to max_length: unseen text has
    # longer rows, and one rung at max_length would pad each of them to the full length.
    top = ladder[0]
    while top * 3 // 2 < max_length:
        top = top * 3 // 2
        ladder.append(top)
    ladder.append(max_length)
    return tuple(sorted({max(MIN_ROW_TOKENS, length) for length in ladder}))


def _rungs(ladder: Sequence[int], lengths: np.ndarray) -> np.ndarray:
    """``rung`` of every length at once."""
    if not ladder:
        return lengths
    index = np.searchsorted(np.asarray(ladder), lengths, side="left")
    if len(index) and index.max() == len(ladder):
        rung(ladder, int(lengths.max()))  # raises, naming the row
    return np.asarray(ladder, dtype=np.int64)[index]


def row_sizes(max_batch: int) -> np.ndarray:
    """The row counts a ``round_rows`` batch may have, ascending: powers of two below
    ``max_batch // ROW_STEPS``, then its multiples, and ``max_batch`` itself."""
    step = max(1, max_batch // ROW_STEPS)
    powers = [1 << k for k in range(step.bit_length()) if 1 << k < step]
    return np.unique(np.array([*powers, *range(step, max_batch + 1, step), max_batch]))


def _row_caps(spec: BatchingSpec, rungs: np.ndarray) -> np.ndarray:
    """Most rows of one batch padded to each rung: with ``round_rows`` the largest allowed row
    count, so that full batches need no filler rows."""
    caps = np.maximum(1, np.minimum(spec.max_batch, spec.token_budget // rungs))
    if spec.round_rows:
        sizes = row_sizes(spec.max_batch)
        caps = sizes[np.searchsorted(sizes, caps, side="right") - 1]
    return caps


def plan_batches(lengths: Sequence[int] | np.ndarray, spec: BatchingSpec) -> list[Batch]:
    """Group rows of the given token lengths into batches (every row exactly once).

    Sorted rows are taken shortest first; a batch grows while it stays within ``max_batch`` rows
    and ``token_budget`` padded positions at the rung of its longest row. With ``round_rows`` a
    batch holds one of ``row_sizes(max_batch)`` rows, the last one of a length topped up with
    filler rows to the next size. Vectorised per batch: a runtime plans every call.
    """
    spec.validate()
    allowed = row_sizes(spec.max_batch)
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(sizes, kind="stable") if spec.sort else np.arange(len(sizes))
    rungs = _rungs(spec.ladder, sizes[order])
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        window = min(spec.max_batch, len(order) - start)
        # The rung of a batch of k rows is the largest rung among them; the k rows fit while
        # k <= that rung's cap, which only shrinks as k grows.
        longest = np.maximum.accumulate(rungs[start : start + window])
        fits = np.arange(1, window + 1) <= _row_caps(spec, longest)
        count = window if fits.all() else max(1, int(np.argmin(fits)))
        size = int(allowed[np.searchsorted(allowed, count)]) if spec.round_rows else count
        batches.append(Batch(order[start : start + count], int(longest[count - 1]), size))
        start += count
    return batches


def padding_fraction(batches: Sequence[Batch], lengths: Sequence[int] | np.ndarray) -> float:
    """Share of the computed positions (filler rows included) that are padding."""
    computed = sum(batch.size * batch.length for batch in batches)
    real = int(np.sum(np.asarray(lengths, dtype=np.int64)))
    return 1.0 - real / computed if computed else 0.0
