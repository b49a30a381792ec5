"""Length-aware batching (engines/batching.py): every row once, limits kept, the ladder optimal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bert_compiler.core.errors import InputError
from bert_compiler.engines.batching import (
    BatchingSpec,
    derive_ladder,
    padding_fraction,
    plan_batches,
    row_sizes,
    rung,
)


def _padding(lengths, ladder):
    return sum(rung(ladder, n) - n for n in lengths)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 64), min_size=1, max_size=300),
    max_batch=st.integers(1, 40),
    budget=st.integers(1, 800),
    round_rows=st.booleans(),
    sort=st.booleans(),
)
def test_every_row_once_within_the_limits(lengths, max_batch, budget, round_rows, sort):
    ladder = derive_ladder(lengths, 64, rungs=4)
    spec = BatchingSpec(max_batch, budget, ladder, round_rows, sort)
    batches = plan_batches(lengths, spec)
    rows = np.concatenate([b.rows for b in batches])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    if not sort:
        assert rows.tolist() == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch.rows)
        assert batch.length == rung(ladder, longest) and batch.length in ladder
        assert len(batch.rows) <= batch.size <= max_batch
        # Over budget only as a batch of one row.
        assert batch.size * batch.length <= budget or batch.size == 1
        if round_rows:
            # The least allowed size that holds the batch: filler only up to the next size.
            sizes = row_sizes(max_batch).tolist()
            assert batch.size == min(s for s in sizes if s >= len(batch.rows))
        else:
            assert batch.size == len(batch.rows)


def test_row_sizes_are_few_and_fine_grained_where_batches_are_big():
    sizes = row_sizes(1024).tolist()
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert row_sizes(12).tolist() == list(range(1, 13))
    assert row_sizes(1).tolist() == [1]
    # 520 rows need 640, not the next power of two.
    batches = plan_batches([10] * 520, BatchingSpec(1024, 10**6, round_rows=True))
    assert [(len(b.rows), b.size) for b in batches] == [(520, 640)]


def test_sorting_cuts_padding_on_uneven_rows():
    lengths = np.random.default_rng(0).integers(4, 60, size=512)
    in_order = plan_batches(lengths, BatchingSpec(32, 10**6, sort=False))
    by_length = plan_batches(lengths, BatchingSpec(32, 10**6))
    assert padding_fraction(by_length, lengths) < 0.1 < padding_fraction(in_order, lengths)


def test_the_ladder_is_the_least_padding_one():
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 20, size=200).tolist()
    ladder = derive_ladder(lengths, 24, rungs=3)
    assert ladder[-1] == 24 and len(ladder) <= 4
    # Brute force over every choice of 3 rungs from the lengths seen (the top one is the
    # longest row, so that every row fits below the max_length rung).
    seen = sorted(set(lengths))
    best = min(
        _padding(lengths, (*low, seen[-1], 24)) for low in itertools.combinations(seen[:-1], 2)
    )
    assert _padding(lengths, ladder) == best


def test_a_ladder_needs_lengths_and_a_row_above_the_top_rung_is_refused():
    with pytest.raises(InputError, match="no rows"):
        derive_ladder([], 128)
    with pytest.raises(InputError, match=r"\[1, 16\]"):
        derive_ladder([3, 17], 16)
    with pytest.raises(InputError, match="top rung 16"):
        rung((8, 16), 17)
    with pytest.raises(InputError, match="ascending"):
        plan_batches([3], BatchingSpec(ladder=(16, 8)))
    with pytest.raises(InputError, match="must be >= 1"):
        plan_batches([3], BatchingSpec(max_batch=0))
