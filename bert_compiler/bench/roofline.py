"""How far an encoder engine is from what its GPU allows: the roofline of a BERT-family encoder
on packed rows (every position a real token).

Per token and layer, the encoder's GEMMs do 8h² FLOPs (the query, key, value and output
projections: 4h² multiply-adds of two FLOPs each) plus 4·h·f (the feed-forward up and down
projections), and attention 4·s·h more (scores and context over a row of s tokens). The bytes are
the activations each kernel must read and write when every elementwise step (bias, GELU, residual,
LayerNorm) is fused into a GEMM's epilogue: 14·h + 2·f values per token and layer (QKV reads h and
writes 3h, attention reads 3h and writes h, the output projection reads h and the residual h and
writes h, the up projection reads h and writes f, the down projection reads f and the residual h
and writes h), two bytes each in fp16. Weights are read once per batch and left out: at the batch
sizes measured they are a small fraction. An engine's limit is the lower of the GPU's peak FLOP
rate over the FLOPs and its memory bandwidth over the bytes; its fraction of the roofline is its
measured tokens per second over that limit.

It is the fp16 roofline: fp16 tensor-core peaks and two-byte activations, whatever the engine's
precision (an fp32 engine's share is lower than its own limit's, an INT8 one's may exceed 1).

The GPU peaks are dense (no 2:4 sparsity) fp16 tensor-core rates and memory bandwidths from
NVIDIA's datasheets (each entry names its source); a GPU missing from the table has no roofline.
docs/performance.md gives the measured engines' fractions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bert_compiler.core.errors import InputError


@dataclass(frozen=True)
class EncoderShape:
    """The sizes that set an encoder's cost per token."""

    layers: int
    hidden: int
    intermediate: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EncoderShape:
        """From a Hugging Face config.json (BERT's names, or DistilBERT's ``n_layers``, ``dim``
        and ``hidden_dim``).

        Raises:
            InputError: a config without them.
        """
        names = (
            ("num_hidden_layers", "hidden_size", "intermediate_size"),
            ("n_layers", "dim", "hidden_dim"),
        )
        for keys in names:
            values = [config.get(key) for key in keys]
            sizes = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
            if len(sizes) == len(keys):
                return cls(*sizes)
        raise InputError(
            "config.json: no layer count, hidden size and feed-forward size "
            "(num_hidden_layers, hidden_size, intermediate_size) to compute a roofline from"
        )

    def flops_per_token(self, mean_length: float) -> float:
        """FLOPs per token at rows of ``mean_length`` tokens."""
        h, f = self.hidden, self.intermediate
        return 2.0 * self.layers * (4 * h * h + 2 * h * f + 2 * mean_length * h)

    def bytes_per_token(self, activation_bytes: int = 2) -> float:
        """Bytes of activations per token with every elementwise step fused into a GEMM."""
        return float(self.layers * (14 * self.hidden + 2 * self.intermediate) * activation_bytes)


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's dense fp16 tensor-core rate and memory bandwidth, and where they come from."""

    name: str
    fp16_tflops: float
    memory_tb_per_s: float
    source: str


DATASHEET_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (datasheet; dense = sparse / 2)"
DATASHEET_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (datasheet; dense = sparse / 2)"
DATASHEET_A100 = "https://www.nvidia.com/en-us/data-center/a100/ (datasheet)"
DATASHEET_L4 = "https://www.nvidia.com/en-us/data-center/l4/ (datasheet; dense = sparse / 2)"
DATASHEET_L40S = "https://www.nvidia.com/en-us/data-center/l40s/ (datasheet; dense = sparse / 2)"
# (words every one of which the device name torch reports must hold, peak); the first match wins,
# so the more specific names come first.
GPU_PEAKS: tuple[tuple[tuple[str, ...], GpuPeak], ...] = (
    (("H100", "NVL"), GpuPeak("H100 NVL", 835.0, 3.9, DATASHEET_H100)),
    (("H100", "PCIE"), GpuPeak("H100 PCIe", 756.0, 2.0, DATASHEET_H100)),
    (("H100",), GpuPeak("H100 SXM", 989.4, 3.35, DATASHEET_H100)),
    (("H200", "NVL"), GpuPeak("H200 NVL", 835.0, 4.8, DATASHEET_H200)),
    (("H200",), GpuPeak("H200 SXM", 989.4, 4.8, DATASHEET_H200)),
    (("A100", "40GB"), GpuPeak("A100 40GB", 312.0, 1.555, DATASHEET_A100)),
    (("A100", "PCIE"), GpuPeak("A100 80GB PCIe", 312.0, 1.935, DATASHEET_A100)),
    (("A100",), GpuPeak("A100 80GB SXM", 312.0, 2.039, DATASHEET_A100)),
    (("L40S",), GpuPeak("L40S", 362.0, 0.864, DATASHEET_L40S)),
    (("L4",), GpuPeak("L4", 121.0, 0.3, DATASHEET_L4)),
)


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The table's peak for a device name as torch reports it ("NVIDIA H100 80GB HBM3"), or
    None for a GPU the table lacks."""
    words = device_name.upper().replace("-", " ").split()
    for needed, peak in GPU_PEAKS:
        if all(word in words for word in needed):
            return peak
    return None


@dataclass(frozen=True)
class Roofline:
    """One encoder's limit on one GPU at one mean row length."""

    gpu: GpuPeak
    mean_length: float
    flops_per_token: float
    bytes_per_token: float

    @property
    def compute_tokens_per_s(self) -> float:
        return self.gpu.fp16_tflops * 1e12 / self.flops_per_token

    @property
    def memory_tokens_per_s(self) -> float:
        return self.gpu.memory_tb_per_s * 1e12 / self.bytes_per_token

    @property
    def tokens_per_s(self) -> float:
        return min(self.compute_tokens_per_s, self.memory_tokens_per_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_tokens_per_s <= self.memory_tokens_per_s else "memory"

    @property
    def sentences_per_s(self) -> float:
        return self.tokens_per_s / self.mean_length

    def fraction(self, tokens_per_s: float) -> float:
        """A measured rate as a share of the limit."""
        return tokens_per_s / self.tokens_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.name,
            "fp16_tflops": self.gpu.fp16_tflops,
            "memory_tb_per_s": self.gpu.memory_tb_per_s,
            "source": self.gpu.source,
            "mean_length": round(self.mean_length, 2),
            "flops_per_token": round(self.flops_per_token),
            "bytes_per_token": round(self.bytes_per_token),
            "bound": self.bound,
            "tokens_per_s": round(self.tokens_per_s),
            "sentences_per_s": round(self.sentences_per_s),
        }


def roofline(shape: EncoderShape, gpu: GpuPeak, mean_length: float) -> Roofline:
    return Roofline(gpu, mean_length, shape.flops_per_token(mean_length), shape.bytes_per_token())
