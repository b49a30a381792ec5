"""Probe where a BERT encoder's GPU time goes on real text, and what three levers buy, in PyTorch.

Issue 13's H100 goals (BERT-base 120,000 and MiniLM-L6 400,000 sentences/s on STS-B dev) are not
reached with ONNX Runtime's kernels (about 95,000 and 300,000 through the runtime), and ORT's
only fp8 GEMM cannot serve (scripts/probe_fp8_gemm.py). Outside any engine, on the same GPU and
sentences, this measures:

- `fp16 padded`: length-sorted batches padded to their longest row, SDPA with a key mask (what a
  careful PyTorch user runs);
- `fp16 packed`: no padding at all: every GEMM on the batch's real tokens, attention by
  FlashAttention's variable-length kernel over cumulative row offsets;
- `fp8 packed`: as `fp16 packed`, the four projections of each layer (QKV, attention output,
  feed-forward up and down) as float8 e4m3 GEMMs (`torch._scaled_mm`, cuBLASLt) at per-tensor
  scales (weights by their max, activations by their max on the calibration sentences);
- `..., short attention`: attention by a Triton kernel for short rows (one program per row and
  head, the whole row in registers) instead of SDPA / FlashAttention, whose 128-row tiles are
  mostly empty for 16-token sentences; on padded batches it reads each row's length from the
  mask on the GPU, so a CUDA graph can hold it.

Random weights (N(0, 0.02), trained-looking biases and LayerNorm), real token ids. Each runner's
batch size is chosen on the calibration sentences and reported on the STS-B dev sentences repeated
to 12,000. Throughput covers the GPU work from token ids already on the GPU to L2-normalized
mean-pooled rows (no tokenization, no copies to the host, no CUDA graphs); `--latency N` times one
sentence per call through CUDA graphs (embedding copied back each call); `--profile` splits the
GPU time by kind of kernel (the Triton kernel counts as `elementwise and other`).

    python3 scripts/probe_gpu_encoder.py --tokenizer MINILM_FOLDER [--model minilm] [--json]
    TRITON_INTERPRET=1 python3 scripts/probe_gpu_encoder.py --tokenizer MINILM_FOLDER \
        --device cpu --tiny    # a check of the arithmetic on a CPU (Triton's interpreter)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bert_compiler.calibration import datasets
from bert_compiler.engines.torch_module import attend_short

FP8_MAX = 448.0
SHAPES = {  # hidden, layers, heads, feed-forward
    "bert-base": (768, 12, 12, 3072),
    "minilm": (384, 6, 12, 1536),
    "tiny": (64, 2, 4, 128),
}
VOCAB, POSITIONS = 30522, 512
RUNNERS = (
    "fp16 padded",
    "fp16 packed",
    "fp8 packed",
    "fp16 padded, short attention",
    "fp16 packed, short attention",
    "fp8 packed, short attention",
)
GEMM_ROWS = 16  # cuBLASLt's fp8 GEMM wants every dimension a multiple of 16


@dataclass
class Batch:
    """One length-sorted batch, in both layouts: padded [rows, longest] and packed [tokens]."""

    rows: int
    tokens: int
    longest: int
    padded_ids: torch.Tensor
    padded_mask: torch.Tensor
    packed_ids: torch.Tensor  # real tokens, then zeros up to a multiple of GEMM_ROWS
    positions: torch.Tensor
    row_of_token: torch.Tensor  # pooling target; the trailing filler goes to row `rows`
    offsets: torch.Tensor  # cumulative sequence lengths, int32 [rows + 1]
    lengths: torch.Tensor


def make_batches(token_ids: list[list[int]], rows: int, device: str) -> list[Batch]:
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    batches = []
    for start in range(0, len(order), rows):
        seqs = [token_ids[i] for i in order[start : start + rows]]
        longest = max(len(s) for s in seqs)
        padded = torch.zeros(len(seqs), longest, dtype=torch.long)
        for row, seq in enumerate(seqs):
            padded[row, : len(seq)] = torch.tensor(seq)
        lengths = torch.tensor([len(s) for s in seqs])
        tokens = int(lengths.sum())
        filler = -tokens % GEMM_ROWS
        flat = [t for s in seqs for t in s] + [0] * filler
        positions = [p for s in seqs for p in range(len(s))] + [0] * filler
        row_of_token = [r for r, s in enumerate(seqs) for _ in s] + [len(seqs)] * filler
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(lengths, 0)
        batches.append(
            Batch(
                rows=len(seqs),
                tokens=tokens,
                longest=longest,
                padded_ids=padded.to(device),
                padded_mask=(padded != 0).to(device),
                packed_ids=torch.tensor(flat, device=device),
                positions=torch.tensor(positions, device=device),
                row_of_token=torch.tensor(row_of_token, device=device),
                offsets=offsets.to(device),
                lengths=lengths.to(device),
            )
        )
    return batches


def random_weights(shape: str, device: str, seed: int = 0) -> dict:
    hidden, layers, heads, ffn = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)

    def normal(*size, mean=0.0):
        return (torch.randn(*size, generator=gen) * 0.02 + mean).to(device, torch.float16)

    weights = {
        "heads": heads,
        "word": normal(VOCAB, hidden),
        "position": normal(POSITIONS, hidden),
        "type": normal(hidden),
        "ln": (normal(hidden, mean=1.0), normal(hidden)),
        "layers": [],
    }
    for _ in range(layers):
        weights["layers"].append(
            {
                "qkv": (normal(3 * hidden, hidden), normal(3 * hidden)),
                "out": (normal(hidden, hidden), normal(hidden)),
                "ln1": (normal(hidden, mean=1.0), normal(hidden)),
                "up": (normal(ffn, hidden), normal(ffn)),
                "down": (normal(hidden, ffn), normal(hidden)),
                "ln2": (normal(hidden, mean=1.0), normal(hidden)),
            }
        )
    return weights


class Fp8Linear:
    """y = x W^T + b with x and W in float8 e4m3 at per-tensor scales, fp16 out (cuBLASLt)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, input_amax: float):
        weight_scale = float(weight.abs().max()) / FP8_MAX
        self.weight = (weight.float() / weight_scale).to(torch.float8_e4m3fn)  # [out, in]
        self.bias = bias
        self.input_scale = max(input_amax, 1e-6) / FP8_MAX
        self.scale_a = torch.tensor(self.input_scale, device=weight.device)
        self.scale_b = torch.tensor(weight_scale, device=weight.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        quantized = (x * (1.0 / self.input_scale)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(
            quantized,
            self.weight.t(),  # a column-major [in, out] view, as cuBLASLt wants the second operand
            scale_a=self.scale_a,
            scale_b=self.scale_b,
            bias=self.bias,
            out_dtype=torch.float16,
        )


def fp16_linear(params):
    weight, bias = params
    return lambda x: F.linear(x, weight, bias)


SHORT_ATTENTION_MAX = 128  # longer rows than this go to FlashAttention


def attend_packed(qkv: torch.Tensor, batch: Batch, heads: int, short: bool = False) -> torch.Tensor:
    if short and batch.longest <= SHORT_ATTENTION_MAX:
        return attend_short(qkv, batch.offsets[:-1], batch.lengths, batch.longest, heads)
    tokens, three_hidden = qkv.shape
    head_dim = three_hidden // (3 * heads)
    q, k, v = qkv.view(tokens, 3, heads, head_dim).unbind(1)
    if qkv.is_cuda:
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, batch.offsets, batch.offsets, batch.longest, batch.longest, 0.0, False, False
        )[0]
    else:  # FlashAttention is CUDA only: one sequence at a time, for the CPU check
        out = torch.zeros_like(q)
        bounds = batch.offsets.tolist()
        for start, end in zip(bounds, bounds[1:], strict=False):
            out[start:end] = F.scaled_dot_product_attention(
                *(t[start:end].transpose(0, 1) for t in (q, k, v))
            ).transpose(0, 1)
    return out.reshape(tokens, three_hidden // 3)


def attend_padded(qkv: torch.Tensor, batch: Batch, heads: int, short: bool = False) -> torch.Tensor:
    rows, longest, three_hidden = qkv.shape
    if short and longest <= SHORT_ATTENTION_MAX:
        # Row lengths from the mask on the device, so nothing waits for the host (a CUDA graph
        # can hold this).
        counts = batch.padded_mask.sum(1, dtype=torch.int32)
        starts = torch.arange(rows, device=qkv.device, dtype=torch.int32) * longest
        return attend_short(qkv, starts, counts, longest, heads)
    head_dim = three_hidden // (3 * heads)
    q, k, v = qkv.view(rows, longest, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.padded_mask[:, None, None, :])
    return out.transpose(1, 2).reshape(rows, longest, three_hidden // 3)


def encode(
    weights: dict,
    batch: Batch,
    packed: bool,
    linears: list[dict] | None = None,
    amax: list[dict] | None = None,
    short: bool = False,
) -> torch.Tensor:
    """L2-normalized mean-pooled rows [batch.rows, hidden]. `linears` replaces the fp16
    projections per layer; `amax` (one dict per layer) records their inputs' max magnitudes;
    `short` sends packed attention to the short-row Triton kernel."""
    hidden = weights["word"].shape[1]
    if packed:
        ids, positions = batch.packed_ids, batch.positions
    else:
        ids = batch.padded_ids
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    x = weights["word"][ids] + weights["position"][positions] + weights["type"]
    x = F.layer_norm(x, (hidden,), *weights["ln"], eps=1e-12)
    for index, layer in enumerate(weights["layers"]):
        project = linears[index] if linears else {n: fp16_linear(layer[n]) for n in layer}

        def run(name, value, index=index, project=project):
            if amax is not None:
                amax[index][name] = max(amax[index].get(name, 0.0), float(value.abs().max()))
            return project[name](value)

        qkv = run("qkv", x)
        attended = (
            attend_packed(qkv, batch, weights["heads"], short)
            if packed
            else attend_padded(qkv, batch, weights["heads"], short)
        )
        x = F.layer_norm(x + run("out", attended), (hidden,), *layer["ln1"], eps=1e-12)
        up = F.gelu(run("up", x))
        x = F.layer_norm(x + run("down", up), (hidden,), *layer["ln2"], eps=1e-12)
    if packed:
        sums = torch.zeros(batch.rows + 1, hidden, device=x.device, dtype=torch.float32)
        sums.index_add_(0, batch.row_of_token, x.float())
        pooled = sums[: batch.rows] / batch.lengths[:, None]
    else:
        mask = batch.padded_mask[..., None].float()
        pooled = (x.float() * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=1)


def fp8_linears(weights: dict, amax: list[dict]) -> list[dict]:
    return [
        {name: Fp8Linear(*layer[name], amax[index][name]) for name in ("qkv", "out", "up", "down")}
        for index, layer in enumerate(weights["layers"])
    ]


def tokenize(tokenizer, texts: list[str], max_length: int = 128) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def time_runner(run, batches: list[Batch], rounds: int, device: str) -> float:
    """Best seconds for one pass over the batches (the first pass warms up, untimed)."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    best = math.inf
    for round_index in range(rounds + 1):
        sync()
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        sync()
        if round_index:
            best = min(best, time.perf_counter() - start)
    return best


def one_row_latency(run, token_ids: list[list[int]], rung: int, device: str) -> dict:
    """p50/p99 milliseconds of one sentence per call, each padded to a multiple of ``rung`` and
    replayed from a CUDA graph captured once per width: ids already on the GPU, the embedding
    brought back to the host in every call."""
    graphs: dict[int, tuple] = {}
    times = []
    for ids in token_ids:
        width = -(-len(ids) // rung) * rung
        row = torch.tensor([ids + [0] * (width - len(ids))], device=device)
        if width not in graphs:
            static = make_batches([[1] * width], 1, device)[0]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    run(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = run(static)
            graphs[width] = (graph, static, output)
        graph, static, output = graphs[width]
        torch.cuda.synchronize()
        start = time.perf_counter()
        static.padded_ids.copy_(row)
        static.padded_mask.copy_(row != 0)
        graph.replay()
        output.cpu()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "p50_ms": round(times[len(times) // 2], 4),
        "p99_ms": round(times[int(len(times) * 0.99)], 4),
        "graphs": len(graphs),
    }


KERNEL_KINDS = (  # first match wins, on the lower-cased kernel name
    ("attention", ("flash", "fmha", "attention")),
    ("gemm", ("gemm", "xmma", "cutlass", "scaled_mm", "matmul", "sm90_")),
    ("layer_norm", ("layer_norm", "layernorm")),
)


def kernel_kinds(run, batches: list[Batch]) -> dict[str, float]:
    """GPU milliseconds of one pass by kind of kernel (everything unmatched is `elementwise and
    other`: bias, GELU, residual adds, fp8 casts, gathers, pooling)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            run(batch)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        kind = next(
            (k for k, needles in KERNEL_KINDS if any(n in name for n in needles)),
            "elementwise and other",
        )
        totals[kind] = totals.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3
    return {kind: round(ms, 3) for kind, ms in sorted(totals.items())}


def probe_model(shape: str, args, data: dict, emit) -> None:
    """Every asked runner on one model shape: agreement, batch choice, speed."""
    calibration, stsb, stsb_once = data["calibration"], data["stsb"], data["stsb_once"]
    candidates = [int(b) for b in args.batches.split(",")]
    weights = random_weights(shape, args.device)
    amax = [{} for _ in weights["layers"]]
    with torch.inference_mode():
        for batch in make_batches(calibration[:2048], 256, args.device):
            encode(weights, batch, packed=True, amax=amax)
        linears = fp8_linears(weights, amax)
        eager = {
            "fp16 padded": lambda b: encode(weights, b, packed=False),
            "fp16 packed": lambda b: encode(weights, b, packed=True),
            "fp8 packed": lambda b: encode(weights, b, packed=True, linears=linears),
            "fp16 padded, short attention": lambda b: encode(weights, b, packed=False, short=True),
            "fp16 packed, short attention": lambda b: encode(weights, b, packed=True, short=True),
            "fp8 packed, short attention": lambda b: encode(
                weights, b, packed=True, linears=linears, short=True
            ),
        }
        runners = {name: eager[name] for name in (args.runner or RUNNERS)}
        if args.compile:
            torch._dynamo.config.cache_size_limit = 256
            compiled = torch.compile(encode, dynamic=True)
            variants = {
                "fp16 padded": {"packed": False},
                "fp16 packed": {"packed": True},
                "fp8 packed": {"packed": True, "linears": linears},
            }
            for name in [n for n in runners if n in variants]:
                runners[f"{name}, compiled"] = lambda b, kw=variants[name]: compiled(
                    weights, b, **kw
                )
        # Agreement on STS-B dev once, against fp16 padded eager (the reference layout).
        check = make_batches(stsb_once[: 512 if args.tiny else None], 256, args.device)
        reference = [encode(weights, b, packed=False) for b in check]
        for name, run in runners.items():
            if name == "fp16 padded":
                continue
            cosines = torch.cat(
                [(run(b) * ref).sum(1) for b, ref in zip(check, reference, strict=True)]
            )
            emit(
                {
                    "model": shape,
                    "runner": name,
                    "vs": "fp16 padded",
                    "min_cosine": round(float(cosines.min()), 6),
                    "mean_cosine": round(float(cosines.mean()), 6),
                }
            )
        for name, run in runners.items():
            speeds = {}
            for rows in candidates:
                seconds = time_runner(
                    run, make_batches(calibration, rows, args.device), 1, args.device
                )
                speeds[rows] = round(len(calibration) / seconds)
            emit(
                {
                    "model": shape,
                    "runner": name,
                    "data": "calibration-sentences",
                    "sentences_per_s_by_batch": speeds,
                }
            )
            chosen = max(speeds, key=speeds.__getitem__)
            batches = make_batches(stsb, chosen, args.device)
            seconds = time_runner(run, batches, args.rounds, args.device)
            tokens = sum(b.tokens for b in batches)
            computed = sum(b.rows * b.longest for b in batches) if "padded" in name else tokens
            emit(
                {
                    "model": shape,
                    "runner": name,
                    "data": "stsb-dev",
                    "sentences": len(stsb),
                    "batch": chosen,
                    "chosen_on": "calibration-sentences",
                    "sentences_per_s": round(len(stsb) / seconds),
                    "tokens_per_s": round(tokens / seconds),
                    "padding_fraction": round(1 - tokens / computed, 4),
                }
            )
            if args.latency and "padded" in name and "compiled" not in name:
                emit(
                    {
                        "model": shape,
                        "runner": name,
                        "data": "stsb-dev",
                        "batch": 1,
                        "sentences": args.latency,
                        "cuda_graphs": True,
                        **one_row_latency(run, stsb_once[: args.latency], 16, args.device),
                    }
                )
            if args.profile:
                emit(
                    {
                        "model": shape,
                        "runner": name,
                        "data": "stsb-dev",
                        "batch": chosen,
                        "gpu_ms_by_kernel_kind": kernel_kinds(run, batches),
                    }
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", type=Path, required=True, help="a folder with tokenizer.json"
    )
    parser.add_argument("--model", action="append", choices=sorted(SHAPES), help="repeatable")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--batches", default="256,512,1024,2048", help="rows per batch to choose from"
    )
    parser.add_argument(
        "--sentences", type=int, default=12_000, help="repeat the data to this many"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tiny", action="store_true", help="a quick check: tiny shapes, few sentences"
    )
    parser.add_argument(
        "--runner", action="append", choices=RUNNERS, help="repeatable (default: all)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also each runner under torch.compile (dynamic shapes; fuses the "
        "elementwise work, fp8 quantization included, into fewer kernels)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also each runner's GPU time by kind of kernel, over one pass at the "
        "chosen batch (torch.profiler)",
    )
    parser.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="N",
        help="also the padded runners one sentence per call (CUDA graphs), over "
        "the first N STS-B dev sentences",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    models = args.model or (["tiny"] if args.tiny else ["minilm", "bert-base"])
    count = 64 if args.tiny else args.sentences

    def sentences(texts: list[str]) -> list[list[int]]:
        ids = tokenize(tokenizer, texts)
        return (ids * -(-count // len(ids)))[:count]

    calibration = sentences(
        list(datasets.iter_texts(datasets.CALIBRATION_SENTENCES, column="sentence"))
    )
    pairs = datasets.load_stsb(datasets.STSB_DEV)
    stsb_once = tokenize(tokenizer, pairs.sentences1 + pairs.sentences2)
    stsb = sentences(pairs.sentences1 + pairs.sentences2)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"

    def emit(record: dict) -> None:
        record = {"device": device_name, **record}
        print(
            json.dumps(record) if args.json else "  ".join(f"{k}={v}" for k, v in record.items()),
            flush=True,
        )

    data = {"calibration": calibration, "stsb": stsb, "stsb_once": stsb_once}
    for shape in models:
        probe_model(shape, args, data, emit)
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
