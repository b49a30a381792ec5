#!/usr/bin/env python3
"""Throughput of the compiled ORT engine vs PyTorch fp32, side by side in one run, on CPU.

Same pre-tokenized STS-B dev sentences (3000, original order, padded per batch) for every runner;
tokenization is outside the timed region. Runners alternate round by round so drift on a shared
machine hits all of them; the median round is reported with its ratio to PyTorch.

    .venv/bin/python scripts/bench_cpu.py --threads 2 --batch-sizes 1,32

Builds (or reuses) the engine under --out with the pipeline's own stages.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=Path("bert-compile-out"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sentences", type=int, default=3000)
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    return parser.parse_args()


def _engines(info, out: Path, threads: int):
    from pipeline.build import BuildSpec, build, load_engine
    from pipeline.export import export
    from pipeline.fuse import fuse
    from pipeline.runner import Layout
    from pipeline.simplify import simplify

    layout = Layout(out)
    exported = export(info=info, out_dir=layout.export)
    simplified = simplify(source=exported.output("model.onnx"), out_dir=layout.simplify)
    fused = fuse(info=info, source=simplified.output("model.onnx"), out_dir=layout.fuse)
    spec = BuildSpec(intra_op_num_threads=threads)
    built = build(source=fused.output("model.onnx"), out_dir=layout.engine(spec), spec=spec)
    engine, _ = load_engine(built.path)
    return engine, simplified.output("model.onnx")


def main() -> None:
    args = _parse()
    import onnxruntime as ort
    import torch

    from calibration.datasets import load_stsb
    from pipeline.export import build_wrapper
    from pipeline.models import load_tokenizer, load_torch_model, resolve_model

    torch.set_num_threads(args.threads)
    info = resolve_model(args.model)
    engine, unfused_path = _engines(info, args.out, args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    unfused = ort.InferenceSession(str(unfused_path), options, providers=["CPUExecutionProvider"])
    wrapper = build_wrapper(info, load_torch_model(info, attn_implementation="sdpa"))
    tokenizer = load_tokenizer(info)
    pairs = load_stsb()
    sentences = (pairs.sentences1 + pairs.sentences2)[: args.sentences]
    names = list(info.architecture.input_names)

    def torch_run(feeds):
        with torch.inference_mode():
            return wrapper(*(torch.from_numpy(feeds[n]) for n in names)).numpy()

    runners = {
        "torch fp32 (sdpa)": torch_run,
        "ORT unfused (simplified graph)": lambda feeds: unfused.run(None, feeds)[0],
        "bert-compiler ORT engine": lambda feeds: engine.run(feeds)[engine.output_names[0]],
    }
    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batches = []
        for start in range(0, len(sentences), batch_size):
            enc = tokenizer(
                sentences[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=info.max_length,
                return_tensors="np",
            )
            batches.append({n: np.asarray(enc[n], dtype=np.int64) for n in names})
        count = sum(len(b["input_ids"]) for b in batches)
        timings: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():
            run(batches[0])  # warm-up: session and allocator set-up stay out of the numbers
        for _ in range(args.rounds):
            for name, run in runners.items():
                started = time.perf_counter()
                for feeds in batches:
                    run(feeds)
                timings[name].append(time.perf_counter() - started)
        base = count / statistics.median(timings["torch fp32 (sdpa)"])
        for name, seconds in timings.items():
            rate = count / statistics.median(seconds)
            results.append(
                {
                    "runner": name,
                    "batch": batch_size,
                    "sentences_per_s": round(rate, 1),
                    "vs_torch": round(rate / base, 3),
                }
            )
    print(
        f"model {info.name}; {len(sentences)} STS-B dev sentences; threads {args.threads}; "
        f"{args.rounds} rounds (median); {platform.processor() or platform.machine()}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}",
        file=sys.stderr,
    )
    print(f"{'runner':34} {'batch':>5} {'sent/s':>9} {'vs torch':>9}", file=sys.stderr)
    for row in results:
        print(
            f"{row['runner']:34} {row['batch']:>5} {row['sentences_per_s']:>9.1f} "
            f"{row['vs_torch']:>8.2f}x",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
