#!/usr/bin/env python3
"""GPU latency and throughput of this project's ONNX Runtime CUDA fp16 engine vs its peers.

One process, one GPU: for BERT-base (random weights, trained-looking biases, the bert-base-uncased
vocabulary) and for all-MiniLM-L6-v2 it

1. runs the pipeline (export, simplify, fuse, build fp16 for ONNX Runtime CUDA with and without
   CUDA graphs, verify against PyTorch fp32 on the bundled SST-2/STS-B text);
2. times, side by side on the same device tensors: torch eager fp16, torch.compile fp16
   (mode reduce-overhead: CUDA graphs), plain ORT-CUDA fp16 (ORT's transformer optimizer and
   fp16 conversion on the exported graph, default provider options), the same with ORT's CUDA
   graphs, and this project's engines; at batch 1, 32 and 128 with sequence 128, and on the STS-B
   dev sentences (batch 128 in dataset order, padded per batch);
3. writes everything to --results as it goes (a partial file survives a time-out).

Every runner includes mean pooling and L2 normalisation (the engine's graph has them) and returns
on the GPU; timings are wall-clock around synchronised calls, median of --repeats.

    python scripts/bench_gpu.py --out /tmp/bench --results bench-gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

SHAPES = ((1, 128), (32, 128), (128, 128))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline output root")
    parser.add_argument("--results", type=Path, required=True, help="JSON written as it goes")
    parser.add_argument("--models", default="bert-base,default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip compile past this")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    return parser.parse_args()


def make_bert_base(folder: Path, tokenizer_from: Path) -> Path:
    """A BERT-base sentence-embedding folder with random weights (seed 0).

    Biases and LayerNorm weights get trained-looking values: random init leaves biases at zero,
    onnxsim then deletes those Adds and ORT's bias fusions no longer match, unlike any real model.
    """
    import torch
    from transformers import BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
            elif "LayerNorm" in name:
                param.normal_(1.0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    for name in (
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "modules.json",
        "sentence_bert_config.json",
    ):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    pooling = folder / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    shutil.copy(tokenizer_from / "1_Pooling" / "config.json", pooling / "config.json")
    (pooling / "config.json").write_text(
        (pooling / "config.json")
        .read_text()
        .replace('"word_embedding_dimension": 384', '"word_embedding_dimension": 768')
    )
    return folder


def plain_ort_graph(info, exported: Path, destination: Path) -> Path:
    """The peer: ORT's optimizer for GPU plus its own fp16 conversion, nothing else."""
    from onnxruntime.transformers.optimizer import optimize_model

    if destination.is_file():
        return destination
    model = optimize_model(
        str(exported),
        model_type="bert",
        num_heads=info.num_heads,
        hidden_size=info.hidden_size,
        use_gpu=True,
    )
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(destination))
    return destination


def timed(run, feeds, *, iterations: int, repeats: int) -> float:
    """Median seconds per call; each call ends synchronised."""
    import torch

    for _ in range(3):
        run(feeds)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iterations):
            run(feeds)
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - started) / iterations)
    return statistics.median(samples)


def main() -> None:  # noqa: C901 - a linear script: build, then measure each runner
    args = _parse()
    import onnxruntime as ort
    import torch

    ort.preload_dlls()
    from bert_compiler.calibration.datasets import load_stsb
    from bert_compiler.engines.backend import BuildSpec, load_engine
    from bert_compiler.pipeline.export import MODEL_FILE
    from bert_compiler.pipeline.layout import Layout
    from bert_compiler.pipeline.models import (
        build_wrapper,
        load_tokenizer,
        load_torch_model,
        resolve_model,
    )
    from bert_compiler.pipeline.runner import RunSpec, run_pipeline
    from bert_compiler.pipeline.verify import VerifySpec

    started = time.perf_counter()
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
        },
        "models": {},
    }

    def save() -> None:
        args.results.write_text(json.dumps(results, indent=2) + "\n")

    default_info = resolve_model("default")
    stsb = load_stsb()
    real_sentences = stsb.sentences1 + stsb.sentences2
    for model_name in args.models.split(","):
        entry: dict = {"pipeline": None, "latency_ms": {}, "throughput_seq_s": {}, "errors": {}}
        results["models"][model_name] = entry
        if model_name == "bert-base":
            folder = make_bert_base(args.out / "models" / "bert-base", default_info.path)
            info = resolve_model(folder)
            gate = False  # random weights: the metric means nothing, parity still applies
        else:
            info = resolve_model(model_name)
            gate = True
        out = args.out / info.name
        t0 = time.perf_counter()
        builds = (
            BuildSpec(backend="onnxruntime", device="cuda", precision="fp16"),
            BuildSpec(backend="onnxruntime", device="cuda", precision="fp16", cuda_graph=True),
        )
        summary = run_pipeline(
            info=info, out=out, spec=RunSpec(builds=builds, verify=VerifySpec(metric_gate=gate))
        )
        entry["pipeline"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "fused_operators": summary["fused_operators"],
            "pytorch_fp32_metric": summary["pytorch_fp32_metric"],
            "engines": [
                {k: e[k] for k in ("name", "passed", "parity", "metric", "failures")}
                for e in summary["engines"]
            ],
        }
        save()
        print(json.dumps(entry["pipeline"]), flush=True)

        names = list(info.architecture.input_names)
        wrapper = build_wrapper(info, load_torch_model(info, attn_implementation="sdpa"))
        wrapper = wrapper.half().cuda().eval()

        def torch_run(feeds, module=wrapper, names=names):
            with torch.inference_mode():
                return module(*(feeds[n] for n in names))

        runners = {"torch eager fp16": torch_run}
        if not args.no_compile:
            compiled = torch.compile(wrapper, mode="reduce-overhead", dynamic=False)
            runners["torch.compile fp16 (CUDA graphs)"] = lambda feeds, m=compiled: torch_run(
                feeds, m
            )
        from bert_compiler.engines import onnxruntime as ort_engine

        try:
            plain = plain_ort_graph(
                info, Layout(out).export / MODEL_FILE, out / "peer-ort-plain-fp16.onnx"
            )
            for label, graph_mode in (
                ("ORT-CUDA fp16 plain", False),
                ("ORT-CUDA fp16 plain + CUDA graphs", True),
            ):
                engine = ort_engine.load(
                    plain, ort_engine.OrtEngineOptions(device="cuda", cuda_graph=graph_mode)
                )
                runners[label] = lambda feeds, e=engine: e.run_device(feeds)
        except Exception as err:  # the peer is reported broken; the rest still runs
            entry["errors"]["ORT-CUDA fp16 plain (build)"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        for record in summary["engines"]:
            engine, _ = load_engine(Path(record["path"]).parent)
            label = "this project: " + record["name"]
            runners[label] = lambda feeds, e=engine: e.run_device(feeds)

        vocab = int(info.config["vocab_size"])
        generator = torch.Generator(device="cpu").manual_seed(0)
        for batch, seq in SHAPES:
            feeds = {
                "input_ids": torch.randint(1000, vocab, (batch, seq), generator=generator),
                "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
                "token_type_ids": torch.zeros(batch, seq, dtype=torch.int64),
            }
            feeds = {n: feeds[n].cuda() for n in names}
            iterations = 200 if batch == 1 else 50
            key = f"b{batch}xs{seq}"
            reference = None
            for label, run in runners.items():
                if "compile" in label and time.perf_counter() - started > args.budget_s:
                    entry["errors"][f"{label} {key}"] = "skipped: time budget"
                    continue
                try:
                    seconds = timed(run, feeds, iterations=iterations, repeats=args.repeats)
                    output = run(feeds)
                    if isinstance(output, dict):
                        output = next(iter(output.values()))
                    output = output.float()
                    if reference is None:
                        reference = output.clone()
                    cosine = (
                        torch.nn.functional.cosine_similarity(
                            output.reshape(batch, -1), reference.reshape(batch, -1)
                        )
                        .min()
                        .item()
                    )
                except Exception as err:  # a benchmark reports a broken runner and goes on
                    entry["errors"][f"{label} {key}"] = f"{type(err).__name__}: {err}"[:500]
                    traceback.print_exc()
                    continue
                entry["latency_ms"].setdefault(label, {})[key] = round(seconds * 1e3, 4)
                entry["throughput_seq_s"].setdefault(label, {})[key] = round(batch / seconds, 1)
                entry.setdefault("min_cosine_vs_torch_eager", {}).setdefault(label, {})[key] = (
                    round(cosine, 6)
                )
                print(
                    f"{model_name} {key} {label}: {seconds * 1e3:.3f} ms, "
                    f"{batch / seconds:.0f} seq/s, cos {cosine:.5f}",
                    flush=True,
                )
                save()

        # Real sentences: STS-B dev, dataset order, batch 128 padded per batch.
        tokenizer = load_tokenizer(info)
        batches = []
        for start in range(0, len(real_sentences), 128):
            enc = tokenizer(
                real_sentences[start : start + 128],
                padding=True,
                truncation=True,
                max_length=info.max_length,
                return_tensors="pt",
            )
            batches.append({n: enc[n].to(torch.int64).cuda() for n in names})
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        entry["real_sentences"] = {
            "sentences": len(real_sentences),
            "batch": 128,
            "valid_token_fraction": round(tokens / padded, 3),
            "sentences_per_s": {},
        }
        for label, run in runners.items():
            if "compile" in label:
                entry["errors"][f"{label} real"] = "not run: recompiles for every padded length"
                continue
            try:
                for feeds in batches:  # warm-up; CUDA-graph runners capture each shape here
                    run(feeds)
                torch.cuda.synchronize()
                samples = []
                for _ in range(3):
                    t = time.perf_counter()
                    for feeds in batches:
                        run(feeds)
                    torch.cuda.synchronize()
                    samples.append(time.perf_counter() - t)
            except Exception as err:
                entry["errors"][f"{label} real"] = f"{type(err).__name__}: {err}"[:500]
                traceback.print_exc()
                continue
            rate = len(real_sentences) / statistics.median(samples)
            entry["real_sentences"]["sentences_per_s"][label] = round(rate, 1)
            print(f"{model_name} real {label}: {rate:.0f} sentences/s", flush=True)
            save()
        del runners
        torch.cuda.empty_cache()
    results["seconds"] = round(time.perf_counter() - started, 1)
    save()


if __name__ == "__main__":
    main()
