#!/usr/bin/env python3
"""Where the runtime's time goes on a GPU: one CUDA-graph engine, the STS-B dev sentences four
times, run through the runtime once plainly (wall time), once with each batch timed by CUDA events
(GPU time inside the batches), once under cProfile (host-side work) and once under the torch
profiler (GPU time per kernel, ORT's kernels included: where the batches' time goes).

    python scripts/profile_runtime.py OUT MODEL_FOLDER     # OUT of `run --cuda-graph`

docs/benchmarks.md quotes what it printed on the H100 (MiniLM, random weights).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

from bert_compiler.calibration import datasets
from bert_compiler.models.loading import resolve_model
from bert_compiler.runtime.encoder import Encoder


def main() -> None:
    out, model = Path(sys.argv[1]), sys.argv[2]
    info = resolve_model(model)
    (folder,) = sorted(out.glob("engines/*/*cudagraph"))
    encoder = Encoder.open(folder, info)
    pairs = datasets.load_stsb(datasets.STSB_DEV)
    tokens = encoder.tokenize((pairs.sentences1 + pairs.sentences2) * 4)
    for _ in range(3):  # warm-up: graphs of every shape captured
        encoder.run(tokens)
    torch.cuda.synchronize()
    started = time.perf_counter()
    encoder.run(tokens)
    torch.cuda.synchronize()
    stats = encoder.stats
    print(
        f"run {time.perf_counter() - started:.4f} s for {stats.rows} sentences: "
        f"{stats.batches} batches, {stats.shapes} shapes, padding {stats.padding_fraction:.1%}"
    )
    encoder.time_batches = True
    encoder.run(tokens)
    print(f"GPU time inside the batches {sum(encoder.stats.batch_ms):.1f} ms")
    encoder.time_batches = False
    profile = cProfile.Profile()
    profile.enable()
    encoder.run(tokens)
    torch.cuda.synchronize()
    profile.disable()
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as kernels:
        encoder.run(tokens)
        torch.cuda.synchronize()
    print(
        kernels.key_averages().table(
            sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
        )
    )


if __name__ == "__main__":
    main()
