#!/usr/bin/env python3
"""Padding of the runtime's GPU batching for ladders of several rung counts, chosen on the
calibration sentences only: the ladder is fitted to the first half, batches are planned on the
second half (tiled to --rows rows), and the padding fraction and distinct shapes are printed. This
is what runtime/encoder.py's LADDER_RUNGS comment quotes; no benchmark text is read.

    .venv/bin/python scripts/ladder_padding.py
"""

from __future__ import annotations

import argparse

import numpy as np

from bert_compiler.calibration import datasets
from bert_compiler.engines.batching import (
    BatchingSpec,
    derive_ladder,
    padding_fraction,
    plan_batches,
)
from bert_compiler.models.loading import load_tokenizer, resolve_model
from bert_compiler.runtime.tokenizing import tokenize_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=12000)
    parser.add_argument("--max-batch", type=int, default=2048)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--rungs", default="12,16,24,32")
    args = parser.parse_args()
    info = resolve_model(args.model)
    texts = list(datasets.iter_texts(datasets.CALIBRATION_SENTENCES))
    lengths = tokenize_rows(load_tokenizer(info), texts, info, args.max_length).lengths
    fit, held = lengths[: len(lengths) // 2], lengths[len(lengths) // 2 :]
    held = np.tile(held, max(1, args.rows // len(held)))
    print(
        f"{len(texts)} calibration sentences; batches of <= {args.max_batch} rows and "
        f"<= {args.token_budget} tokens on {len(held)} rows"
    )
    for rungs in (int(r) for r in args.rungs.split(",")):
        ladder = derive_ladder(fit, args.max_length, rungs)
        spec = BatchingSpec(args.max_batch, args.token_budget, ladder, round_rows=True)
        batches = plan_batches(held, spec)
        shapes = len({(b.size, b.length) for b in batches})
        print(
            f"{rungs:>3} rungs ({len(ladder)} with the top): padding "
            f"{padding_fraction(batches, held):.1%}, {shapes} shapes"
        )
    batches = plan_batches(held, BatchingSpec(args.max_batch, args.token_budget))
    print(f"exact lengths: padding {padding_fraction(batches, held):.1%}")


if __name__ == "__main__":
    main()
