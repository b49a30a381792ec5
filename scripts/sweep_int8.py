#!/usr/bin/env python3
"""The INT8 method table: SmoothQuant alpha x calibration method x MatMuls kept float, with the
selection-split metric (what choices are made on), the dev metric (reported only) and the speed
at batch 32 (--dynamic: which MatMul inputs are quantized per batch at run time),
beside PyTorch fp32 and the ORT dynamic INT8 peers, all in one process.

Ranges are collected once per smoothing variant on the calibration sentences (histograms), then
each method's amax gives one Q/DQ graph and one CPU INT8 engine built with the pipeline's own
stages. Kept-float MatMuls are the most sensitive ones of the fallback's ranking (calibration
sentences, default method, unsmoothed graph). Metrics: STS-B Spearman on --pairs pairs of the
selection split (calibration/data/stsb-selection.tsv) and of STS-B dev, every k-th pair of each
(both files are in genre order). Speed: --rounds timed passes over --sentences selection
sentences in batches of 32, runners interleaved, median; ratio to PyTorch fp32. Granularity is
not swept: weights are per-channel, activations per-tensor in every row.

    .venv/bin/python scripts/sweep_int8.py --out bert-compile-out
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

# The defaults run in a few minutes on 2 cores (4 engines; docs/benchmarks.md has wider grids):
# the chosen recipe against the static engine at the old and the new percentile.
METHODS = "percentile:99.99,percentile:99.999"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a model folder")
    parser.add_argument("--out", type=Path, default=Path("bert-compile-out"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=METHODS, help="comma-separated method[:percentile]")
    parser.add_argument("--kept-float", default="0", help="comma-separated counts")
    parser.add_argument(
        "--dynamic", default="none,all", help="comma-separated: none, ffn-down, all"
    )
    parser.add_argument(
        "--smooth-alpha", default="none", help="comma-separated SmoothQuant alphas, or none"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=1500,
        help="metric pairs per split (500 is too noisy to choose on)",
    )
    parser.add_argument(
        "--selection-data", type=Path, help="STS-B file for the selection column (default: bundled)"
    )
    parser.add_argument("--sentences", type=int, default=256, help="timed sentences per pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="skip the ORT dynamic INT8 rows")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    return parser.parse_args()


def _strided(path: Path, pairs: int, folder: Path) -> Path:
    """Every k-th data row of ``path`` (about ``pairs`` of them), header kept, in ``folder``."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    step = max(1, (len(lines) - 1) // pairs)
    subset = folder / f"{path.stem}-every-{step}.tsv"
    subset.write_text(lines[0] + "".join(lines[1::step][:pairs]), encoding="utf-8")
    return subset


def main() -> None:
    args = _parse()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from bench_cpu import _dynamic_int8, _quiet, _session, _stages

    from bert_compiler.calibration import datasets
    from bert_compiler.calibration.qdq import insert_qdq, quantizable_matmuls
    from bert_compiler.calibration.ranges import (
        collect_channel_amax,
        collect_histograms,
        compute_amax,
    )
    from bert_compiler.calibration.sensitivity import rank_sensitivity
    from bert_compiler.calibration.smooth import apply_smoothing, smoothing_factors
    from bert_compiler.core.onnx_io import load_onnx, save_onnx
    from bert_compiler.engines.backend import BuildSpec
    from bert_compiler.pipeline.build import build
    from bert_compiler.pipeline.calibrate import (
        CalibrationSpec,
        calibration_batches,
        calibration_texts,
    )
    from bert_compiler.pipeline.fallback import FallbackSpec
    from bert_compiler.pipeline.models import load_tokenizer, resolve_model
    from bert_compiler.pipeline.runtime import Encoder
    from bert_compiler.pipeline.text import resolve_max_length, tokenize
    from bert_compiler.pipeline.verify import (
        compute_metric,
        engine_embedder,
        torch_embedder,
        torch_runner,
    )

    torch.set_num_threads(args.threads)
    info = resolve_model(args.model)
    _engines, graphs = _stages(info, args.out, args.threads, int8=False)
    calibration = CalibrationSpec()
    started = time.perf_counter()
    model = load_onnx(graphs["simplify"])
    texts, _ = calibration_texts(calibration)
    batches = calibration_batches(info, texts, calibration)
    activations = sorted({t.activation for t in quantizable_matmuls(model)})
    smoothed_models = {}
    histograms_by = {}
    channel_amax = collect_channel_amax(model, activations, batches)
    for alpha_text in args.smooth_alpha.split(","):
        variant = model
        if alpha_text != "none":
            factors = smoothing_factors(model, channel_amax, alpha=float(alpha_text))
            variant = apply_smoothing(model, factors)
        names = sorted({t.activation for t in quantizable_matmuls(variant)})
        smoothed_models[alpha_text] = variant
        histograms_by[alpha_text] = collect_histograms(
            variant, names, batches, bins=calibration.bins
        )
    histograms = histograms_by.get("none") or collect_histograms(
        model, activations, batches, bins=calibration.bins
    )
    default_amax = compute_amax(histograms, calibration.method, percentile=calibration.percentile)
    kept_counts = [int(k) for k in args.kept_float.split(",")]
    order: list[str] = []
    if max(kept_counts) > 0:
        ranking_rows = FallbackSpec().ranking_sentences // calibration.batch_size or 1
        ranking = rank_sensitivity(
            float_model=model, amax=default_amax, batches=batches[:ranking_rows]
        )
        order = [s.node for s in ranking]
    print(f"ranges and ranking: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    scratch = tempfile.TemporaryDirectory()
    max_length = resolve_max_length(info, None)
    tokenizer = load_tokenizer(info)
    reference = torch_runner(info, pooling_in_graph=True)
    # Every k-th pair: both files are in genre order, so their first N pairs are captions only.
    splits = {
        "selection": _strided(
            args.selection_data or datasets.STSB_SELECTION, args.pairs, Path(scratch.name)
        ),
        "dev": _strided(datasets.STSB_DEV, args.pairs, Path(scratch.name)),
    }
    pairs = datasets.load_stsb(splits["selection"])
    timed = (pairs.sentences1 + pairs.sentences2)[: args.sentences]
    feeds = [
        tokenize(tokenizer, timed[i : i + 32], info, max_length) for i in range(0, len(timed), 32)
    ]

    rows: list[dict] = []
    runners = {}

    def add(label: str, embed, run) -> None:
        row = {"runner": label}
        for split, path in splits.items():
            row[split] = compute_metric(embed, info, None, path).value
        rows.append(row)
        runners[label] = run
        print(f"{label}: {row}", file=sys.stderr)

    add(
        "torch fp32",
        torch_embedder(reference, tokenizer, info, max_length, "torch"),
        lambda f: reference(f),
    )
    if not args.no_peers:
        for label, graph, per_channel in (
            ("ORT dynamic INT8", "export", False),
            ("ORT dynamic INT8, fused, per-channel", "fuse", True),
        ):
            path = _dynamic_int8(graphs[graph], Path(scratch.name) / f"{graph}.onnx", per_channel)
            session = _session(path, args.threads)
            names = [i.name for i in session.get_inputs()]

            def run(f, s=session, n=names):
                return s.run(None, {k: f[k] for k in n})

            def embed(sentences, run=run):
                rows_ = []
                for i in range(0, len(sentences), 32):
                    f = tokenize(tokenizer, sentences[i : i + 32], info, max_length)
                    hidden = run(f)[0]
                    if hidden.ndim == 2:  # the graph pools already
                        rows_.append(hidden)
                        continue
                    mask = f["attention_mask"][..., None].astype(hidden.dtype)
                    rows_.append((hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9))
                return np.concatenate(rows_)

            add(label, embed, run)

    spec = BuildSpec(intra_op_num_threads=args.threads, precision="int8")
    for alpha_text, variant in smoothed_models.items():
        for method_text in args.methods.split(","):
            method, _, percentile = method_text.partition(":")
            amax = compute_amax(
                histograms_by[alpha_text],
                method,
                percentile=float(percentile) if percentile else None,
            )
            for kept, scope in itertools.product(kept_counts, args.dynamic.split(",")):
                label = f"{method_text} smooth {alpha_text} dynamic {scope} kept-float {kept}"
                folder = args.out / "sweep" / label.replace(" ", "-").replace(":", "")
                quantized, _ = insert_qdq(variant, amax, exclude=frozenset(order[:kept]))
                folder.mkdir(parents=True, exist_ok=True)
                save_onnx(quantized, folder / "model.onnx")
                built = build(
                    source=folder / "model.onnx",
                    out_dir=folder / "engine",
                    spec=replace(spec, int8_dynamic=scope),
                )
                engine = _quiet(built.path)
                encoder = Encoder(engine, info, max_length=max_length)
                add(label, engine_embedder(encoder), lambda f, e=engine: e.run(f))

    timings: dict[str, list[float]] = {label: [] for label in runners}
    for run in runners.values():
        run(feeds[0])
    for _ in range(args.rounds):
        for label, run in runners.items():
            begun = time.perf_counter()
            for f in feeds:
                run(f)
            timings[label].append(time.perf_counter() - begun)
    base = statistics.median(timings["torch fp32"])
    print(
        f"{'runner':<60} {'selection':>9} {'sel drop':>8} {'dev':>6} {'dev drop':>8} "
        f"{'vs torch':>8}"
    )
    for row in rows:
        row["vs_torch"] = base / statistics.median(timings[row["runner"]])
        row["selection_drop"] = rows[0]["selection"] - row["selection"]
        row["dev_drop"] = rows[0]["dev"] - row["dev"]
        print(
            f"{row['runner']:<60} {row['selection']:>9.2f} {row['selection_drop']:>8.2f} "
            f"{row['dev']:>6.2f} {row['dev_drop']:>8.2f} {row['vs_torch']:>7.2f}x"
        )
    if args.json:
        print(json.dumps({"pairs": args.pairs, "sentences": args.sentences, "rows": rows}))


if __name__ == "__main__":
    main()
