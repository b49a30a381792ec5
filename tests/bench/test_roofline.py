"""The roofline bench reports beside each GPU row (bench/roofline.py): the FLOPs and bytes per
token from a model's config, the GPU's peak from its table, and each row's share of the limit."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from bert_compiler.bench.measure import with_roofline
from bert_compiler.bench.report import BenchDevice, Measurement
from bert_compiler.bench.roofline import EncoderShape, gpu_peak, roofline
from bert_compiler.core.errors import InputError

H100 = BenchDevice("cuda", "NVIDIA H100 80GB HBM3", compute_capability="9.0")


@pytest.mark.parametrize("length", [1, 7, 40])
def test_flops_per_token_are_what_pytorch_counts_in_the_encoder(length):
    """Against torch's own FLOP counter on a BERT encoder (no pooler): every matmul of the
    projections, the feed-forward and attention, per token of one row of ``length`` tokens."""
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=96, attn_implementation="eager",
    )  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.ones((1, length), dtype=torch.long))
    shape = EncoderShape.from_config(config.to_dict())
    assert shape == EncoderShape(layers=3, hidden=64, intermediate=96)
    assert shape.flops_per_token(length) == counter.get_total_flops() / length


def test_bytes_per_token_are_the_fused_kernels_reads_and_writes():
    """Each kernel with its elementwise steps in its epilogue reads its inputs and writes its
    outputs once: counted here kernel by kernel, in fp16."""
    h, f = 48, 80
    kernels = {  # (values read, values written) per token
        "qkv projection": (h, 3 * h),
        "attention": (3 * h, h),
        "output projection + residual + LayerNorm": (2 * h, h),
        "up projection + GELU": (h, f),
        "down projection + residual + LayerNorm": (f + h, h),
    }
    per_layer = sum(read + written for read, written in kernels.values())
    assert EncoderShape(5, h, f).bytes_per_token() == 5 * per_layer * 2


def test_distilbert_names_and_a_config_without_sizes():
    distil = {"n_layers": 6, "dim": 768, "hidden_dim": 3072}
    assert EncoderShape.from_config(distil) == EncoderShape(6, 768, 3072)
    for bad in ({}, {"num_hidden_layers": 2, "hidden_size": 8}, {**distil, "dim": True}):
        with pytest.raises(InputError, match="config.json: no layer count"):
            EncoderShape.from_config(bad)


def test_device_names_as_torch_reports_them_find_their_peak():
    names = {
        "NVIDIA H100 80GB HBM3": "H100 SXM",
        "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H100 NVL": "H100 NVL",
        "NVIDIA H200": "H200 SXM",
        "NVIDIA H200 NVL": "H200 NVL",
        "NVIDIA A100-SXM4-80GB": "A100 80GB SXM",
        "NVIDIA A100-SXM4-40GB": "A100 40GB",
        "NVIDIA A100 80GB PCIe": "A100 80GB PCIe",
        "NVIDIA L4": "L4",
        "NVIDIA L40S": "L40S",
    }
    assert {name: gpu_peak(name).name for name in names} == names
    assert gpu_peak("Tesla T4") is None and gpu_peak("NVIDIA GeForce RTX 4090") is None


def test_the_limit_is_the_lower_of_compute_and_memory():
    peak = gpu_peak(H100.name)
    deep = roofline(EncoderShape(12, 768, 3072), peak, 16.0)
    assert deep.tokens_per_s == peak.fp16_tflops * 1e12 / deep.flops_per_token
    assert deep.bound == "compute" and deep.tokens_per_s < deep.memory_tokens_per_s
    narrow = roofline(EncoderShape(6, 384, 1536), peak, 16.0)
    assert narrow.tokens_per_s == peak.memory_tb_per_s * 1e12 / narrow.bytes_per_token
    assert narrow.bound == "memory"
    assert narrow.sentences_per_s == narrow.tokens_per_s / 16.0
    assert narrow.fraction(narrow.tokens_per_s / 4) == pytest.approx(0.25)


def _row(runner: str, sentences_per_s: float, length: float, data: str = "real") -> Measurement:
    return Measurement(
        model="m", runner=runner, data=data, batching="b", batch=8, seq=None,
        sentences_per_s=sentences_per_s, tokens_per_s=sentences_per_s * length,
        padding_fraction=0.0, p50_ms=None, p99_ms=None,
    )  # fmt: skip


class _Info:
    config = {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072}


def test_each_gpu_row_gets_its_share_at_its_own_row_length(caplog):
    rows = [
        _row("tokenizer: Hugging Face fast __call__ (lists)", 30000.0, 16.0),
        _row("engine (runtime)", 120000.0, 16.0),
        _row("engine", 2000.0, 128.0, data="fixed"),
    ]
    shape = EncoderShape.from_config(_Info.config)
    peak = gpu_peak(H100.name)
    got, roof = with_roofline(rows, _Info(), H100, 16.0)
    assert got[0].roofline_fraction is None  # the tokenizer alone is not the encoder
    for row, length in ((got[1], 16.0), (got[2], 128.0)):
        limit = roofline(shape, peak, length).tokens_per_s
        assert row.roofline_fraction == round(row.tokens_per_s / limit, 4)
    assert roof == roofline(shape, peak, 16.0)
    cpu = BenchDevice("cpu", "x86_64", cores=2)
    assert with_roofline(rows, _Info(), cpu, 16.0) == (rows, None)
    with caplog.at_level(logging.WARNING, logger="bert_compile"):
        other = BenchDevice("cuda", "Tesla T4", compute_capability="7.5")
        assert with_roofline(rows, _Info(), other, 16.0) == (rows, None)
    assert "Tesla T4 is not in bench/roofline.py's table" in caplog.text


def test_the_script_gives_a_recorded_run_its_shares(tmp_path):
    """scripts/roofline.py on a bench.json recorded before bench reported the roofline (the
    figures docs/performance.md quotes), and a file it cannot read as one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    recorded = root / "docs/gpu-bench/2026-11-24-h100-graphs/bench-minilm.json"
    script = [sys.executable, str(root / "scripts/roofline.py")]
    done = subprocess.run(
        [*script, str(recorded), "--shape", "6,384,1536"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    summary, *lines = done.stdout.splitlines()
    roof = json.loads(summary)
    assert (roof["gpu"], roof["bound"]) == ("H100 SXM", "memory")
    engine = next(
        r
        for r in json.loads(recorded.read_text())["results"]
        if r["runner"] == "pt2.11.0-cuda-fp16 (runtime)"
    )
    shape = EncoderShape(6, 384, 1536)
    length = engine["tokens_per_s"] / engine["sentences_per_s"]
    share = roofline(shape, gpu_peak(H100.name), length).fraction(engine["tokens_per_s"])
    line = next(x for x in lines if x.startswith("pt2.11.0-cuda-fp16 (runtime)"))
    assert line.endswith(f"{round(share, 4):.1%}")  # bench keeps four places
    only_tokenizer = json.loads(recorded.read_text())
    only_tokenizer["results"] = [
        r for r in only_tokenizer["results"] if r["runner"].startswith("tokenizer")
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(only_tokenizer))
    for path, shape in ((tmp_path / "tokenizer.json", "6,384,1536"), (recorded, "0,384,1536")):
        refused = subprocess.run([*script, str(path), "--shape", shape],
                                 capture_output=True, text=True)  # fmt: skip
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    (tmp_path / "bad.json").write_text("{")
    bad = subprocess.run([*script, str(tmp_path / "bad.json"), "--shape", "6,384,1536"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "bad.json" in bad.stderr
