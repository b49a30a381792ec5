#!/usr/bin/env python3
"""Where `Encoder.encode`'s time goes on a GPU (issue 24): one torch engine, the STS-B dev
sentences eight times (24,000 texts), timed as token rows, as token rows cut into encode's
windows, through the tokenizer pool alone, and end to end with several worker counts (outputs in
host memory and kept on the GPU); then one encode's windows timed one by one (waiting for the pool,
running) and under cProfile (host-side work).

    python scripts/probe_encode.py ENGINE_FOLDER MODEL_FOLDER [WORKERS,...]

Prints one JSON object per line; docs/gpu-bench/ quotes what it printed.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

from bert_compiler.calibration import datasets
from bert_compiler.models.loading import resolve_model
from bert_compiler.runtime import tokenizing
from bert_compiler.runtime.encoder import Encoder
from bert_compiler.runtime.text import text_windows

ROUNDS = 5


def synchronize() -> None:
    if torch.cuda.is_available():
        synchronize()


def timed(call) -> float:
    """The median seconds of ROUNDS calls after one warm-up call, the GPU synchronised."""
    call()
    times = []
    for _ in range(ROUNDS):
        synchronize()
        started = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    engine_dir, model = Path(sys.argv[1]), sys.argv[2]
    workers = [int(w) for w in (sys.argv[3] if len(sys.argv) > 3 else "0,4,8,15").split(",")]
    info = resolve_model(model)
    pairs = datasets.load_stsb(datasets.STSB_DEV)
    texts = ((pairs.sentences1 + pairs.sentences2) * 8)[:24000]
    encoder = Encoder.open(engine_dir, info)
    tokens = encoder.tokenize(texts)
    rate = lambda seconds: round(len(texts) / seconds)  # noqa: E731
    say(what="rows", per_s=rate(timed(lambda: encoder.run(tokens))))
    if encoder.on_gpu:
        say(
            what="rows, outputs on the GPU",
            per_s=rate(timed(lambda: encoder.run(tokens, device_outputs=True))),
        )
    sizes = [len(w) for w in text_windows(texts, tokenizing.window_sizes())]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    import numpy as np

    parts = [tokens.select(np.arange(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]
    say(
        what="rows in encode's windows",
        windows=sizes,
        per_s=rate(timed(lambda: [encoder.run(p) for p in parts])),
    )
    for count in workers:
        encoder.tokenizer_workers = count
        if count:
            pool = tokenizing.tokenizer_pool(encoder.row_tokenizer, count)
            windows = list(enumerate(text_windows(texts, tokenizing.window_sizes())))
            say(
                what="pool alone",
                workers=count,
                per_s=rate(timed(lambda p=pool, w=windows: list(p.map_windows(iter(w))))),
            )
        say(what="encode", workers=count, per_s=rate(timed(lambda: encoder.encode(texts))))
        if encoder.on_gpu:
            say(
                what="encode, outputs on the GPU",
                workers=count,
                per_s=rate(timed(lambda: encoder.encode(texts, device_outputs=True))),
            )
    encoder.tokenizer_workers = max(workers)
    marks = []
    real_run = encoder.run

    def run(window_tokens, **kwargs):
        synchronize()
        marks.append(("got window", time.perf_counter(), len(window_tokens)))
        result = real_run(window_tokens, **kwargs)
        marks.append(("ran", time.perf_counter(), len(window_tokens)))
        return result

    encoder.run = run
    started = time.perf_counter()
    encoder.encode(texts)
    say(
        what="timeline",
        workers=encoder.tokenizer_workers,
        marks=[(name, round((t - started) * 1e3, 2), n) for name, t, n in marks],
        total_ms=round((time.perf_counter() - started) * 1e3, 2),
    )
    encoder.run = real_run
    profile = cProfile.Profile()
    profile.enable()
    encoder.encode(texts)
    synchronize()
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main()
