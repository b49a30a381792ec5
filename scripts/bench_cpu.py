#!/usr/bin/env python3
"""CPU throughput (and STS-B dev Spearman) of this project's engines vs PyTorch and ORT peers.

Every runner sees the same pre-tokenized STS-B dev sentences (3000, original order, padded per
batch); tokenization is outside the timed region. Runners alternate round by round so drift on a
shared machine hits all of them; the median round is reported with its ratio to PyTorch fp32.
Idle threads do not spin (ORT allow_spinning=0, OMP_WAIT_POLICY=PASSIVE): with several runners in
one process, a spinning pool steals the cores from whichever runner goes next (seen once: one
runner dropped by almost 30%).

    .venv/bin/python scripts/bench_cpu.py --threads 2 --batch-sizes 1,32          # fp32
    .venv/bin/python scripts/bench_cpu.py --threads 2 --batch-sizes 32 --int8     # + INT8

Engines are built (or reused) under --out with the pipeline's own stages. --int8 adds ORT dynamic
INT8 (the usual Optimum path: per-tensor weights on the exported graph), the same on the fused graph
with per-channel weights (the strongest dynamic peer), and this project's INT8 engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a model folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-cpu-out"),
        # Not run's bert-compile-out: --threads is a build setting, so sharing it would make
        # the next `run` rebuild and re-verify its engines.
        help="output folder of the engines (default: bench-cpu-out)",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runner")
    parser.add_argument("--batch-sizes", default="32", help="comma-separated, e.g. 1,32")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed passes per runner, interleaved; the median is reported",
    )
    parser.add_argument(
        "--sentences", type=int, default=3000, help="STS-B dev sentences per timed pass"
    )
    parser.add_argument("--int8", action="store_true", help="add the INT8 runners")
    parser.add_argument("--no-metric", action="store_true", help="skip the Spearman column")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    return parser.parse_args()


def _stages(info, out: Path, threads: int, int8: bool):
    """Build (or reuse) the fp32 and INT8 engines; return them and the graphs peers start from."""
    from bert_compiler.engines.backend import BuildSpec
    from bert_compiler.engines.onnxruntime import OnnxRuntimeBuildOptions
    from bert_compiler.stages.build import build, engine_folder_name
    from bert_compiler.stages.calibrate import calibrate
    from bert_compiler.stages.export import export
    from bert_compiler.stages.fuse import fuse
    from bert_compiler.stages.layout import Layout
    from bert_compiler.stages.simplify import simplify
    from bert_compiler.stages.sweep import quiet_engine

    layout = Layout(out)
    exported = export(info=info, out_dir=layout.export)
    simplified = simplify(source=exported.output("model.onnx"), out_dir=layout.simplify)
    fused = fuse(info=info, source=simplified.output("model.onnx"), out_dir=layout.fuse)
    graphs = {
        "export": exported.output("model.onnx"),
        "simplify": simplified.output("model.onnx"),
        "fuse": fused.output("model.onnx"),
    }
    threads_only = OnnxRuntimeBuildOptions(intra_op_num_threads=threads)
    fp32 = BuildSpec(options=threads_only)
    built_fp32 = build(
        source=graphs["fuse"], out_dir=layout.engine(info.name, engine_folder_name(fp32)), spec=fp32
    )
    engines = {"fp32": quiet_engine(built_fp32.path)}
    if int8:
        calibrated = calibrate(info=info, source=graphs["simplify"], out_dir=layout.calibrate)
        spec = BuildSpec(precision="int8", options=threads_only)
        built = build(
            source=calibrated.output("model.onnx"),
            out_dir=layout.engine(info.name, engine_folder_name(spec)),
            spec=spec,
        )
        engines["int8"] = quiet_engine(built.path)
    return engines, graphs


def main() -> None:
    args = _parse()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP pool
    import onnxruntime as ort
    import torch

    from bert_compiler.calibration.datasets import STSB_DEV, load_stsb
    from bert_compiler.models.loading import (
        build_wrapper,
        load_tokenizer,
        load_torch_model,
        resolve_model,
    )
    from bert_compiler.stages.sweep import ort_dynamic_int8, peer_session
    from bert_compiler.stages.verify import compute_metric, torch_embedder

    torch.set_num_threads(args.threads)
    info = resolve_model(args.model)
    engines, graphs = _stages(info, args.out, args.threads, args.int8)
    wrapper = build_wrapper(info, load_torch_model(info, attn_implementation="sdpa"))
    tokenizer = load_tokenizer(info)
    pairs = load_stsb()
    sentences = (pairs.sentences1 + pairs.sentences2)[: args.sentences]
    names = list(info.architecture.input_names)
    output = engines["fp32"].output_names[0]

    def session(path: Path):
        return peer_session(path, args.threads)

    def torch_run(feeds):
        with torch.inference_mode():
            return wrapper(*(torch.from_numpy(feeds[n]) for n in names)).numpy()

    runners = {"torch fp32 (sdpa)": torch_run}
    scratch = tempfile.TemporaryDirectory()
    if args.int8:
        runners["ORT fp32 engine (this project)"] = lambda f: engines["fp32"].run(f)[output]
        for label, graph, per_channel in (
            ("ORT dynamic INT8, exported graph", "export", False),
            ("ORT dynamic INT8, fused, per-channel", "fuse", True),
        ):
            dynamic = session(
                ort_dynamic_int8(graphs[graph], Path(scratch.name) / f"{graph}.onnx", per_channel)
            )
            runners[label] = lambda f, s=dynamic: s.run(None, f)[0]
        runners["INT8 engine (this project)"] = lambda f: engines["int8"].run(f)[output]
    else:
        unfused = session(graphs["simplify"])
        runners["ORT unfused (simplified graph)"] = lambda f: unfused.run(None, f)[0]
        runners["bert-compiler ORT engine"] = lambda f: engines["fp32"].run(f)[output]

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
    metrics = {}
    if not args.no_metric:
        for name, run in runners.items():
            embed = torch_embedder(
                lambda f, r=run: {output: r(f)}, tokenizer, info, info.max_length, name
            )
            metric = compute_metric(embed, info, None, STSB_DEV)
            metrics[name] = round(metric.value, 3)
    for row in results:
        row["stsb_spearman"] = metrics.get(row["runner"])
    print(
        f"model {info.name}; {len(sentences)} STS-B dev sentences; threads {args.threads}; "
        f"{args.rounds} rounds (median); {platform.machine()}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}",
        file=sys.stderr,
    )
    print(
        f"{'runner':38} {'batch':>5} {'sent/s':>8} {'vs torch':>9} {'Spearman':>9}", file=sys.stderr
    )
    for row in results:
        spearman = "" if row["stsb_spearman"] is None else f"{row['stsb_spearman']:.2f}"
        print(
            f"{row['runner']:38} {row['batch']:>5} {row['sentences_per_s']:>8.1f} "
            f"{row['vs_torch']:>8.2f}x {spearman:>9}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
