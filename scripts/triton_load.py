#!/usr/bin/env python3
"""Closed-loop load on a bert-compile Triton text model (an ensemble, or the one-model Python
text engine): sentences/s and latency per concurrency.

Sends STS-B dev sentences (sentence1 and sentence2 of each pair, in file order; to a
cross-encoder's text model, whose inputs are TEXT and TEXT_PAIR, the pairs; or the texts of
--data), one per gRPC request,
from N concurrent clients that each send the next sentence as soon as their previous answer
arrives; a fixed number of requests per measurement, cut off at a deadline. Reports
sentences/s, p50/p99 latency and how many requests the engine model ran per execute call (from
Triton's statistics), as a table and, with --json, one JSON object on the last stdout line.

Against a running server::

    python scripts/triton_load.py --url localhost:8001 --model M-ort-cpu-fp32-python-text

Before/after on one machine in one run: one tritonserver per repository (the local CPU server of
`bert-compile serve` and the tests, triton/server.py), all running at once, measured in
turn at each concurrency::

    python scripts/triton_load.py --model M-ort-cpu-fp32-python-text \\
        --repository request=/tmp/repo-request --repository ladder=/tmp/repo-ladder

The first target is the baseline of the "vs" column. Exit status: 0, every request answered;
1, a request failed or a server did not start; 2, bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Measurement:
    target: str
    concurrency: int
    requests: int
    completed: int
    errors: int
    deadline_hit: bool
    seconds: float
    sentences_per_s: float
    p50_ms: float
    p99_ms: float
    engine_batch: float
    tokenizer_batch: float
    first_error: str = ""
    texts_per_request: int = 1
    processes: int = 1


def request_texts(data: Path | None, pairs: bool = False) -> list[tuple[str, ...]]:
    """The texts to send, in file order. Default: the STS-B dev sentences, both of each pair,
    one a text, or (``pairs``) each pair as one text of two strings. ``data``: the ``sentence``
    column of a .tsv/.jsonl (or each line of a .txt), or its sentence1/sentence2 pairs."""
    from bert_compiler.calibration.datasets import PAIR_COLUMNS, iter_pairs, load_stsb, load_texts

    if data is not None:
        return (
            list(iter_pairs(data, columns=PAIR_COLUMNS))
            if pairs
            else [(text,) for text in load_texts(data)]
        )
    stsb = load_stsb()
    both = list(zip(stsb.sentences1, stsb.sentences2, strict=True))
    return both if pairs else [(s,) for pair in both for s in pair]


class Target:
    """One text model on one server, with the models whose statistics are read (the one-model
    text engine is both its tokenizer and its engine)."""

    def __init__(self, label: str, url: str, model: str, data: Path | None = None):
        self.label, self.url, self.model, self.data = label, url, model, data

    async def open(self) -> None:
        import tritonclient.grpc.aio as grpc_aio

        from bert_compiler.triton.text_engine_model import RUN_COST_PARAMETER
        from bert_compiler.triton.torch_text_model import PRECISION_PARAMETER

        self.client = grpc_aio.InferenceServerClient(self.url)
        config = (await self.client.get_model_config(self.model, as_json=True))["config"]
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        text_model = {RUN_COST_PARAMETER, PRECISION_PARAMETER} & set(config.get("parameters", {}))
        if not steps and text_model:
            # A one-model text engine (package --python-text model, a torch engine's text
            # model): it tokenizes too.
            self.tokenizer = self.engine = self.model
        elif len(steps) == 2:
            self.tokenizer, self.engine = (step["model_name"] for step in steps)
        else:
            raise ValueError(
                f"{self.model} is neither a tokenizer -> engine ensemble nor a Python text model"
            )
        metadata = await self.client.get_model_metadata(self.model, as_json=True)
        self.output = metadata["outputs"][0]["name"]
        # TEXT, and a cross-encoder's TEXT_PAIR.
        self.inputs = [tensor["name"] for tensor in metadata["inputs"]]
        self.texts = request_texts(self.data, pairs=len(self.inputs) == 2)

    async def counts(self, model: str) -> tuple[int, int]:
        """(requests inferred, execute calls) of a model so far."""
        stats = await self.client.get_inference_statistics(model, as_json=True)
        entry = stats["model_stats"][0]
        return int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0))

    async def close(self) -> None:
        await self.client.close()


async def measure(
    target: Target,
    concurrency: int,
    requests: int,
    deadline_s: float,
    per_request: int = 1,
    processes: int = 1,
) -> Measurement:
    """Send ``requests`` requests of ``per_request`` of the target's texts (sentences, or pairs)
    from ``concurrency`` closed-loop clients spread over ``processes`` client processes (none
    sent after ``deadline_s``); each answer must hold one row per text."""
    before = {m: await target.counts(m) for m in (target.tokenizer, target.engine)}
    shares = [
        (concurrency // processes + (i < concurrency % processes),
         requests // processes + (i < requests % processes))
        for i in range(processes)
    ]  # fmt: skip
    load = (target.url, target.model, target.inputs, target.output, target.texts)
    if processes == 1:
        parts = [await _clients(*load, concurrency, requests, deadline_s, per_request)]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            futures = [
                pool.submit(_clients_in_process, *load, c, n, deadline_s, per_request)
                for c, n in shares
                if c and n
            ]
            parts = [f.result() for f in futures]
    # From the first client's start to the last one's end (a process's start-up is not load).
    seconds = max(part[4] for part in parts) - min(part[3] for part in parts)
    latencies = [ms for part in parts for ms in part[0]]
    errors = [e for part in parts for e in part[1]]
    issued = sum(part[2] for part in parts)
    # Triton counts a request just after it answers it: wait (briefly) for the last ones.
    settle = time.perf_counter() + 5
    while True:
        after = {m: await target.counts(m) for m in before}
        counted = after[target.engine][0] - before[target.engine][0]
        if counted >= len(latencies) * per_request or time.perf_counter() > settle:
            break
        await asyncio.sleep(0.02)

    def per_execute(model: str) -> float:
        inferred = after[model][0] - before[model][0]
        executed = after[model][1] - before[model][1]
        return round(inferred / executed, 2) if executed else 0.0

    done = np.asarray(latencies) if latencies else np.zeros(1)
    return Measurement(
        target=target.label,
        concurrency=concurrency,
        requests=requests,
        completed=len(latencies),
        errors=len(errors),
        deadline_hit=issued < requests,
        seconds=round(seconds, 3),
        sentences_per_s=round(len(latencies) * per_request / seconds, 2),
        p50_ms=round(float(np.percentile(done, 50)), 2),
        p99_ms=round(float(np.percentile(done, 99)), 2),
        engine_batch=per_execute(target.engine),
        tokenizer_batch=per_execute(target.tokenizer),
        first_error=errors[0][:300] if errors else "",
        texts_per_request=per_request,
        processes=processes,
    )


def _clients_in_process(*args) -> tuple[list[float], list[str], int, float, float]:
    return asyncio.run(_clients(*args))


async def _clients(
    url: str,
    model: str,
    inputs: list[str],
    output: str,
    texts: list[tuple[str, ...]],
    concurrency: int,
    requests: int,
    deadline_s: float,
    per_request: int,
) -> tuple[list[float], list[str], int, float, float]:
    """(latencies in ms, errors, requests issued, start, end) of ``concurrency`` closed-loop
    clients on one connection, sending ``requests`` requests of ``per_request`` texts in all
    (start and end by time.perf_counter, one clock for every process on Linux)."""
    import tritonclient.grpc.aio as grpc_aio
    from tritonclient.utils import InferenceServerException

    client = grpc_aio.InferenceServerClient(url)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    await client.is_server_ready()  # connected before the clock starts
    deadline = time.perf_counter() + deadline_s
    requested = [grpc_aio.InferRequestedOutput(output)]

    async def one_client() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            first = issued * per_request
            rows = [texts[(first + i) % len(texts)] for i in range(per_request)]
            issued += 1
            tensors = []
            for column, name in enumerate(inputs):
                tensor = grpc_aio.InferInput(name, [per_request, 1], "BYTES")
                values = [[row[column].encode("utf-8")] for row in rows]
                tensor.set_data_from_numpy(np.array(values, dtype=object))
                tensors.append(tensor)
            sent = time.perf_counter()
            try:
                result = await client.infer(
                    model, tensors, outputs=requested, client_timeout=deadline_s
                )
                answered = result.as_numpy(output).shape[0]
                if answered != per_request:
                    raise InferenceServerException(f"{answered} rows for {per_request} texts")
            except InferenceServerException as err:
                errors.append(str(err))
                continue
            latencies.append((time.perf_counter() - sent) * 1e3)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    finally:
        ended = time.perf_counter()
        await client.close()
    return latencies, errors, issued, began, ended


async def run(targets: list[Target], args: argparse.Namespace) -> list[Measurement]:
    """Every concurrency on every target, in turn (targets alternate, so drift on a shared
    machine hits them alike); with several rounds, the median round by sentences/s."""
    for target in targets:
        await target.open()
        if args.warmup:
            await measure(target, min(8, args.warmup), args.warmup, args.deadline_s)
    rounds: dict[tuple[str, int, int], list[Measurement]] = {}
    settings = [(k, c) for k in args.texts_per_request for c in args.concurrency]
    for _ in range(args.rounds):
        for per_request, concurrency in settings:
            for target in targets:
                result = await measure(
                    target,
                    concurrency,
                    args.requests,
                    args.deadline_s,
                    per_request,
                    min(args.processes, concurrency),
                )
                rounds.setdefault((target.label, per_request, concurrency), []).append(result)
    for target in targets:
        await target.close()
    results = []
    for per_request, concurrency in settings:
        for target in targets:
            runs = rounds[(target.label, per_request, concurrency)]
            runs = sorted(runs, key=lambda m: m.sentences_per_s)
            results.append(runs[len(runs) // 2])
    return results


def table(results: list[Measurement]) -> str:
    baseline = {
        (m.texts_per_request, m.concurrency): m for m in results if m.target == results[0].target
    }
    lines = [
        f"{'target':<12} {'texts':>5} {'conc':>4} {'done':>9} {'sent/s':>9} {'vs':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'engine batch':>12} {'tok batch':>9}"
    ]
    for m in results:
        base = baseline[(m.texts_per_request, m.concurrency)].sentences_per_s
        ratio = f"{m.sentences_per_s / base:.2f}x" if base else "-"
        done = f"{m.completed}/{m.requests}" + ("*" if m.deadline_hit else "")
        lines.append(
            f"{m.target:<12} {m.texts_per_request:>5} {m.concurrency:>4} {done:>9} "
            f"{m.sentences_per_s:>9.1f} {ratio:>6} {m.p50_ms:>8.2f} {m.p99_ms:>8.2f} "
            f"{m.engine_batch:>12.2f} {m.tokenizer_batch:>9.2f}"
        )
    if any(m.deadline_hit for m in results):
        lines.append("* stopped at the deadline: fewer requests than asked")
    return "\n".join(lines)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1, e.g. 1,8,32")
    return values


def _repository(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=FOLDER of a repository")
    return label, Path(path)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the text model, e.g. M-ort-cpu-fp32-text")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="gRPC host:port of a running server")
    where.add_argument(
        "--repository",
        type=_repository,
        action="append",
        metavar="LABEL=FOLDER",
        help="start a server on this repository (repeat to compare; the first is the baseline)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="texts to send instead of STS-B dev (.tsv/.jsonl `sentence` column or .txt lines; "
        "sentence1/sentence2 for a cross-encoder), e.g. calibration/data/"
        "calibration-sentences.tsv to choose settings apart from the text that reports them",
    )
    parser.add_argument("--concurrency", type=_positive_ints, default=[1, 8, 32])
    parser.add_argument(
        "--texts-per-request",
        type=_positive_ints,
        default=[1],
        help="texts in each request (comma-separated: each is measured), e.g. 1,64",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes the concurrent clients are spread over (at most the concurrency)",
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement")
    parser.add_argument(
        "--deadline-s", type=float, default=300.0, help="no request sent after this long"
    )
    parser.add_argument("--warmup", type=int, default=64, help="requests per target first")
    parser.add_argument("--rounds", type=int, default=1, help="median of this many, alternated")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.warmup < 0 or args.deadline_s <= 0:
        parser.error("--requests and --rounds must be >= 1, --warmup >= 0, --deadline-s > 0")
    if args.processes < 1:
        parser.error("--processes must be >= 1")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.repository and len({label for label, _ in args.repository}) != len(args.repository):
        parser.error("--repository labels must differ")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from tritonclient.utils import InferenceServerException

    from bert_compiler.core.errors import BertCompileError

    with contextlib.ExitStack() as stack:
        if args.url:
            targets = [Target("server", args.url, args.model, args.data)]
        else:
            from bert_compiler.triton.server import (
                find_server,
                plan_serving,
                triton_server,
            )

            targets = []
            try:
                files = find_server()
            except BertCompileError as err:
                print(f"triton_load: cannot start tritonserver: {err}", file=sys.stderr)
                return 1
            for label, repository in args.repository:
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                try:
                    plan = plan_serving(repository, models=[args.model])
                    server = stack.enter_context(triton_server(files, plan, workdir))
                except BertCompileError as err:
                    print(f"triton_load: {label} ({repository}): {err}", file=sys.stderr)
                    return 1
                targets.append(Target(label, server.grpc, args.model, args.data))
        try:
            results = asyncio.run(run(targets, args))
        except (InferenceServerException, BertCompileError, ValueError, OSError) as err:
            print(f"triton_load: {args.model}: {err}", file=sys.stderr)
            return 1
    print(table(results))
    failed = [m for m in results if m.errors]
    for m in failed:
        print(
            f"triton_load: {m.target} at concurrency {m.concurrency}: {m.errors} failed "
            f"requests ({m.first_error})",
            file=sys.stderr,
        )
    if args.json:
        from bert_compiler.runtime.encoder import usable_cores

        summary = {
            "model": args.model,
            "device": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": usable_cores(),
            "requests": args.requests,
            "rounds": args.rounds,
            "results": [asdict(m) for m in results],
        }
        print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
