"""The torch engine at run time: a built engine file (safetensors weights; its layout and options
in its metadata, engines/torch_layout.py) run by PyTorch on packed rows, with a Triton kernel for
short rows' attention and CUDA graphs for small GPU batches. engines/torch_encoder.py reads the
fused graph and builds the file; this module only runs it.

It imports torch, numpy, safetensors and torch_layout.py only: `bert-compile package` copies both
beside the Triton text model of a torch engine (triton/torch_text_model.py), which runs where
bert-compiler is not installed. Problems with the file raise ``LayoutError``, which the backend
reports as an artifact error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # inside bert_compiler
    from .torch_layout import (
        EncoderLayout,
        LayoutError,
        TorchEngineOptions,
        read_header,
    )
except ImportError:  # inside Triton: the copy package puts beside this file
    from torch_layout import (  # type: ignore[no-redef]
        EncoderLayout,
        LayoutError,
        TorchEngineOptions,
        read_header,
    )

log = logging.getLogger("bert_compile")

# Rows up to this many tokens go to the short-row kernel (its tile is the longest row rounded up
# to a power of two, all in registers); longer ones to scaled_dot_product_attention.
SHORT_ATTENTION_MAX = 128
# Packed GPU batches of fewer tokens replay a CUDA graph captured on first use for their bucket
# (tokens, rows, attention tile): run eagerly, a small batch's time is the host launching a dozen
# kernels per layer. Larger batches keep the GPU busy longer than their launches take.
GRAPH_MAX_TOKENS = 8192
# At most this many graphs per engine (they share one memory pool); later buckets run eagerly.
GRAPH_LIMIT = 48
# An INT8 engine's integer GEMMs: the projections and the feed-forward (``layers.N.<name>``).
QUANTIZED_LINEARS = ("qkv", "out", "up", "down")
# torch._int_mm on a GPU (cuBLASLt's int8 GEMM) takes more than 16 rows; fewer are padded.
INT_MM_MIN_ROWS = 17


def quantized_linear(name: str) -> bool:
    """Whether ``name`` is the weight of a linear an INT8 engine runs as an integer GEMM."""
    parts = name.split(".")
    return (
        len(parts) == 4
        and parts[0] == "layers"
        and parts[2] in QUANTIZED_LINEARS
        and (parts[3] == "weight")
    )


def compute_dtype(precision: str, device: str) -> Any:
    """The float type an engine computes in: fp16 for an fp16 engine and for an INT8 one on a
    GPU (around its integer GEMMs), fp32 otherwise."""
    import torch

    half = precision == "fp16" or (precision == "int8" and device == "cuda")
    return torch.float16 if half else torch.float32


def quantize_weight(weight: Any) -> tuple[Any, Any]:
    """A float weight [out, in] as int8 with one float32 scale per output channel (its absolute
    maximum over 127, symmetric)."""
    import torch

    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return quantized.contiguous(), scale.contiguous()


def int8_linear(x: Any, weight: Any, scale: Any, bias: Any) -> Any:
    """``x`` [..., in] times an int8 ``weight`` [out, in] of per-channel ``scale``, plus
    ``bias``: each row of ``x`` quantized to int8 by its own absolute maximum (per token, at run
    time), an exact int32 product (torch._int_mm), scaled back to ``x``'s dtype."""
    import torch

    flat = x.reshape(-1, x.shape[-1])
    row_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127
    rows = flat.shape[0]
    quantized = torch.round(flat.float() / row_scale).clamp(-127, 127).to(torch.int8)
    if quantized.is_cuda and rows < INT_MM_MIN_ROWS:
        quantized = torch.nn.functional.pad(quantized, (0, 0, 0, INT_MM_MIN_ROWS - rows))
    product = torch._int_mm(quantized, weight.t())[:rows]
    out = product.float() * row_scale * scale + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def short_attention_kernel():
    """A Triton kernel for attention over short rows: one program per (row, head) holds the
    row's Q, K and V in registers ([BLOCK, head_dim], BLOCK the longest row rounded up to a power
    of two), so a 16-token row costs one small tile instead of a library kernel's 64-128-row
    tiles (imported late: Triton is there where CUDA is, or for TRITON_INTERPRET=1 on a CPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(
        qkv,
        out,
        starts,
        counts,
        scale,
        HIDDEN: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row, head = tl.program_id(0), tl.program_id(1)
        start = tl.load(starts + row)
        count = tl.load(counts + row)
        tokens = tl.arange(0, BLOCK)
        valid = tokens < count
        columns = head * HEAD_DIM + tl.arange(0, HEAD_DIM)
        at = qkv + (start + tokens)[:, None] * (3 * HIDDEN) + columns[None, :]
        q = tl.load(at, mask=valid[:, None], other=0.0)
        k = tl.load(at + HIDDEN, mask=valid[:, None], other=0.0)
        v = tl.load(at + 2 * HIDDEN, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        weights = tl.exp(scores - tl.max(scores, 1)[:, None])
        weights = weights / tl.sum(weights, 1)[:, None]
        result = tl.dot(weights.to(v.dtype), v)
        tl.store(
            out + (start + tokens)[:, None] * HIDDEN + columns[None, :],
            result.to(out.dtype.element_ty),
            mask=valid[:, None],
        )

    return kernel


_SHORT_KERNEL: list = []


def short_attention_available(device: str) -> bool:
    """Whether the short-row kernel runs here: on a GPU with Triton, or on a CPU under Triton's
    interpreter (TRITON_INTERPRET=1, for tests)."""
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_tiles(head_dim: int) -> bool:
    """Whether the short-row kernel takes heads of this size: its tiles are [rows, head_dim]
    (tl.arange and tl.dot), so a power of two, at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def attend_short(qkv: Any, starts: Any, counts: Any, longest: int, heads: int) -> Any:
    """Attention of each row's tokens qkv[starts[r] : starts[r] + counts[r]] among themselves
    (qkv [tokens, 3 * hidden], flat; packed rows: starts are the offsets; padded rows:
    r * width). Positions outside every row stay zero."""
    import torch

    hidden = qkv.shape[-1] // 3
    if not _SHORT_KERNEL:
        _SHORT_KERNEL.append(short_attention_kernel())
    out = torch.zeros(*qkv.shape[:-1], hidden, dtype=qkv.dtype, device=qkv.device)
    block = _attention_tile(longest)
    _SHORT_KERNEL[0][(len(counts), heads)](
        qkv,
        out,
        starts,
        counts,
        (hidden // heads) ** -0.5,
        HIDDEN=hidden,
        HEAD_DIM=hidden // heads,
        BLOCK=block,
        num_warps=4 if block <= 64 else 8,
    )
    return out


def graph_bucket(count: int, smallest: int) -> int:
    """The captured size for ``count`` tokens or rows: the first of smallest x 1, 1.5, 2, 3, 4,
    6, ... that holds ``count``, so a batch of at least ``smallest`` pads by at most half."""
    size = smallest
    while size < count:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def _attention_tile(longest: int) -> int:
    """The short-row kernel's rows per tile for rows of up to ``longest`` tokens."""
    return max(16, 1 << (longest - 1).bit_length())


@dataclass
class _CapturedBatch:
    """A CUDA graph of one packed batch shape, with the tensors it reads and writes."""

    graph: Any
    ids: Any
    type_ids: Any
    lengths: Any
    outputs: dict[str, Any]


# The precisions of a torch engine (int8: int8_linear's integer GEMMs).
PRECISIONS = ("fp32", "fp16", "int8")


def _check_dtypes(read: Mapping[str, Any], names: Any, int8: bool, where: str) -> None:
    """An INT8 engine's quantized weights are int8 with finite positive float scales, and no
    other tensor is integer: a file opened as another precision than it was built for, or one
    written by something else, would otherwise run as silent garbage.

    Raises:
        LayoutError: the first tensor that is not so.
    """
    import torch

    for name in names:
        tensor = read[name]
        quantized = int8 and quantized_linear(name)
        if quantized != (tensor.dtype == torch.int8):
            kind = "int8" if quantized else "float"
            raise LayoutError(
                f"{where}: tensor {name} is {tensor.dtype}, a {'int8' if int8 else 'float'} "
                f"engine's is {kind}; open the engine at the precision it was built for, or "
                "rebuild it"
            )
        if name.endswith(".scale") and not (
            tensor.is_floating_point() and bool(torch.isfinite(tensor).all() and (tensor > 0).all())
        ):
            raise LayoutError(
                f"{where}: tensor {name} holds scales that are not finite and positive; "
                "rebuild the engine"
            )


def _stored_dtype(name: str, dtype: Any, int8: bool) -> Any:
    """How a tensor is kept on the device: an INT8 engine's quantized weights as int8 and their
    scales in float32; the classifier head in float32 (it runs on the float32 pooled rows, a few
    small GEMMs); everything else in the engine's dtype."""
    import torch

    if int8 and quantized_linear(name):
        return torch.int8
    if name.startswith("head.") or name.endswith(".scale"):
        return torch.float32
    return dtype


class TorchEncoder:
    """A built torch engine: ``run`` (numpy, padded), ``run_device`` (torch, padded) and
    ``run_packed`` (torch, packed rows: what the runtime uses)."""

    max_batch = None
    packed_rows = True
    concurrent_runs = False

    def __init__(
        self,
        path: Path,
        layout: EncoderLayout,
        device: str,
        dtype_name: str,
        tensors: Mapping[str, Any] | None = None,
        options: TorchEngineOptions | None = None,
    ):
        """``tensors``: the weights, instead of reading them from ``path``; ``options``: the
        attention kernels and whether small packed batches on a GPU replay CUDA graphs."""
        import torch
        from safetensors.torch import load_file

        self.path = path
        self.layout = layout
        self.device = device
        self.input_names = list(layout.input_names)
        self.output_names = [layout.output]
        # An INT8 engine computes in fp16 on a GPU and fp32 on a CPU, its projections and
        # feed-forward as integer GEMMs (int8_linear).
        if dtype_name not in PRECISIONS:
            raise LayoutError(
                f"{path}: precision {dtype_name!r}; a torch engine is one of "
                f"{', '.join(PRECISIONS)}"
            )
        self.precision = dtype_name
        self.int8 = dtype_name == "int8"
        dtype = compute_dtype(dtype_name, device)
        read = tensors if tensors is not None else load_file(str(path), device="cpu")
        expected = layout.shapes(read)
        if self.int8:
            expected.update(
                {
                    name.removesuffix("weight") + "scale": (shape[0],)
                    for name, shape in list(expected.items())
                    if quantized_linear(name)
                }
            )
        for name, shape in expected.items():
            got = tuple(read[name].shape) if name in read else None
            if (
                got is None
                or len(got) != len(shape)
                or any(e is not None and e != g for e, g in zip(shape, got, strict=True))
            ):
                raise LayoutError(
                    f"{path}: tensor {name} is {got or 'missing'}, the layout needs {shape}; "
                    "rebuild the engine"
                )
        _check_dtypes(read, expected, self.int8, str(path))
        self.weights = {
            name: read[name].to(device=device, dtype=_stored_dtype(name, dtype, self.int8))
            for name in expected
        }
        # fp16 only on a GPU: tl.dot would take fp32 inputs as TF32, which fp32 engines are
        # verified without.
        self.options = options = options or TorchEngineOptions()
        self.short_attention = (
            options.attention == "triton"
            and kernel_tiles(layout.hidden // layout.heads)
            and (device != "cuda" or dtype == torch.float16)
            and short_attention_available(device)
        )
        # Graphs need the short-row kernel: its only shape argument is the tile, where
        # scaled_dot_product_attention's padded rows would need a graph per longest row.
        self.graphs = options.cuda_graphs and device == "cuda" and self.short_attention
        self._captured: dict[tuple[int, int, int], _CapturedBatch] = {}
        self._graph_pool: Any = None
        # A captured batch's spare row may be longer than the position table; its positions are
        # clamped to the last one (the row's outputs are dropped).
        self._last_position = (
            self.weights["embeddings.position"].shape[0] - 1 - layout.position_offset
        )

    # -- the encoder ------------------------------------------------------------------------

    def _norm(self, x, name: str):
        import torch.nn.functional as F

        w = self.weights
        return F.layer_norm(
            x, (self.layout.hidden,), w[name + ".weight"], w[name + ".bias"], self.layout.epsilon
        )

    def _encode(self, ids, type_ids, positions, attend):
        import torch.nn.functional as F

        w, layout = self.weights, self.layout
        x = w["embeddings.word"][ids] + w["embeddings.position"][positions + layout.position_offset]
        if layout.token_types:
            x = x + w["embeddings.token_type"][type_ids]
        if "embeddings.constant" in w:
            x = x + w["embeddings.constant"]
        x = self._norm(x, "embeddings.norm")
        approximate = "tanh" if layout.activation == "gelu_tanh" else "none"
        for index in range(layout.layers):
            p = f"layers.{index}."
            qkv = self._linear(x, p + "qkv")
            x = self._norm(x + self._linear(attend(qkv), p + "out"), p + "norm1")
            up = F.gelu(self._linear(x, p + "up"), approximate=approximate)
            x = self._norm(x + self._linear(up, p + "down"), p + "norm2")
        return x

    def _linear(self, x, name: str):
        import torch.nn.functional as F

        w = self.weights
        if self.int8:
            return int8_linear(x, w[name + ".weight"], w[name + ".scale"], w[name + ".bias"])
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    def _short_rows(self, positions: int, longest: int) -> bool:
        """Whether the short-row kernel attends: rows short enough for its registers, and
        offsets within its int32 arithmetic (positions x 3 x hidden under 2**31)."""
        fits = positions * 3 * self.layout.hidden < 2**31
        return self.short_attention and longest <= SHORT_ATTENTION_MAX and fits

    def _attend_padded(self, qkv, lengths):
        """Attention of padded rows qkv [rows, width, 3 * hidden] of ``lengths`` tokens."""
        import torch
        import torch.nn.functional as F

        rows, width, _ = qkv.shape
        heads, hidden = self.layout.heads, self.layout.hidden
        if self._short_rows(rows * width, width):
            starts = torch.arange(rows, device=qkv.device, dtype=torch.int32) * width
            flat = qkv.reshape(rows * width, 3 * hidden)
            return attend_short(flat, starts, lengths.int(), width, heads).view(rows, width, hidden)
        q, k, v = qkv.view(rows, width, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4).unbind(0)
        keys = torch.arange(width, device=qkv.device)[None, :] < lengths[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        return out.transpose(1, 2).reshape(rows, width, hidden)

    def run_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One padded batch of torch tensors [rows, width] on the engine's device."""
        import torch

        ids = feeds["input_ids"]
        mask = feeds["attention_mask"].to(torch.bool)
        lengths = mask.sum(1)
        rows, width = ids.shape
        positions = torch.arange(width, device=ids.device).expand(rows, width)
        type_ids = feeds.get("token_type_ids", torch.zeros_like(ids))
        with torch.inference_mode():
            x = self._encode(
                ids, type_ids, positions, lambda qkv: self._attend_padded(qkv, lengths)
            )
            if self.layout.pooling == "none":
                return {self.layout.output: x.float()}
            if self.layout.pooling == "mean":
                weights = mask[..., None].float()
                pooled = (x.float() * weights).sum(1) / lengths[:, None].clamp(min=1)
            else:
                pooled = x[:, 0].float()
            return {self.layout.output: self._head_output(pooled)}

    def run_packed(self, ids: Any, type_ids: Any, lengths: Any, longest: int) -> dict[str, Any]:
        """One batch of packed rows: ``ids`` and ``type_ids`` every row's tokens back to back
        (int64 [tokens]), ``lengths`` each row's count (int64 [rows]), ``longest`` the largest
        of them (known to the caller, so nothing here waits for the device; a smaller value
        would cut rows short). Returns float32 tensors: pooled [rows, hidden], or the last
        hidden state padded to [rows, longest, hidden]. On a GPU, pooled batches of fewer than
        GRAPH_MAX_TOKENS tokens replay CUDA graphs (fp16 engines, whose short-row kernel attends
        rows of up to SHORT_ATTENTION_MAX tokens). Graphs keep their inputs and outputs in
        place: call from one thread, on one stream."""
        tokens = ids.shape[0]
        if (
            self.graphs
            and tokens < GRAPH_MAX_TOKENS
            and self.layout.pooling != "none"
            and self._short_rows(tokens, longest)
        ):
            # One row more than the batch's: the bucket's spare tokens go there (dropped).
            key = (graph_bucket(tokens, 16), graph_bucket(lengths.shape[0] + 1, 2))
            captured = self._captured.get((*key, _attention_tile(longest)))
            if captured is None and len(self._captured) < GRAPH_LIMIT:
                captured = self._capture(*key, _attention_tile(longest))
            if captured is not None:
                return self._replay(captured, ids, type_ids, lengths)
        return self._forward_packed(ids, type_ids, lengths, longest)

    def _capture(self, tokens: int, rows: int, tile: int) -> _CapturedBatch | None:
        """A graph of a packed batch of ``tokens`` x ``rows``, rows of up to ``tile`` tokens
        (torch.cuda.graph's recipe: one eager run on a side stream first, so Triton compiles
        and cuBLAS sets up outside the capture). None where capturing fails (out of memory, a
        driver that refuses): the engine then drops its graphs and runs eagerly from here on,
        as verified. (A CUDA error inside a capture can leave torch's own generator state
        unusable for the rest of the process; this engine draws no random numbers.)"""
        import torch

        try:
            return self._try_capture(tokens, rows, tile)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError and capture errors
            self.graphs = False
            self._captured.clear()
            self._graph_pool = None
            cause = err.__context__ or err  # a failed capture reports its cause second
            reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            log.warning("[torch engine] %s: CUDA graphs off (capture: %s)", self.path, reason)
            torch.cuda.empty_cache()
            return None

    def _try_capture(self, tokens: int, rows: int, tile: int) -> _CapturedBatch:
        import torch

        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        type_ids = torch.zeros_like(ids)
        lengths = torch.zeros(rows, dtype=torch.int64, device=self.device)
        lengths[-1] = tokens
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward_packed(ids, type_ids, lengths, tile, spare_row=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            outputs = self._forward_packed(ids, type_ids, lengths, tile, spare_row=True)
        captured = _CapturedBatch(graph, ids, type_ids, lengths, outputs)
        self._captured[(tokens, rows, tile)] = captured
        return captured

    @staticmethod
    def _replay(captured: _CapturedBatch, ids, type_ids, lengths) -> dict[str, Any]:
        """The batch copied into the graph's inputs, its spare tokens made one extra row after
        the batch's (any rows between are empty), the graph replayed, the batch's rows copied
        out (the next replay overwrites the graph's outputs)."""
        tokens, rows = ids.shape[0], lengths.shape[0]
        captured.ids[:tokens].copy_(ids)
        captured.type_ids[:tokens].copy_(type_ids)
        captured.lengths[:rows].copy_(lengths)
        captured.lengths[rows:].zero_()
        captured.lengths[-1:].fill_(captured.ids.shape[0] - tokens)
        captured.graph.replay()
        return {name: value[:rows].clone() for name, value in captured.outputs.items()}

    def _forward_packed(
        self, ids: Any, type_ids: Any, lengths: Any, longest: int, spare_row: bool = False
    ) -> dict[str, Any]:
        """run_packed's work, launched eagerly, or as captured (``spare_row``: the spare row's
        positions clamped to the table, empty rows' first tokens to the last token)."""
        import torch

        tokens, rows = ids.shape[0], lengths.shape[0]
        device = ids.device
        row_of_token = torch.repeat_interleave(
            torch.arange(rows, device=device), lengths, output_size=tokens
        )
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(tokens, device=device) - starts[row_of_token]
        if spare_row:
            positions = positions.clamp(max=self._last_position)

        short = self._short_rows(tokens, longest)
        starts32, lengths32 = (starts.int(), lengths.int()) if short else (None, None)

        def attend(qkv):
            if short:
                return attend_short(qkv, starts32, lengths32, longest, self.layout.heads)
            padded = qkv.new_zeros(rows, longest, qkv.shape[-1])
            padded[row_of_token, positions] = qkv
            return self._attend_padded(padded, lengths)[row_of_token, positions]

        with torch.inference_mode():
            x = self._encode(ids, type_ids, positions, attend)
            if self.layout.pooling == "none":
                padded = x.new_zeros(rows, longest, self.layout.hidden, dtype=torch.float32)
                padded[row_of_token, positions] = x.float()
                return {self.layout.output: padded}
            if self.layout.pooling == "mean":
                sums = torch.zeros(rows, self.layout.hidden, device=device, dtype=torch.float32)
                sums.index_add_(0, row_of_token, x.float())
                pooled = sums / lengths[:, None].clamp(min=1)
            else:
                # A captured batch's empty rows start after its last token when it fills the
                # bucket exactly.
                pooled = x[starts.clamp(max=tokens - 1) if spare_row else starts].float()
            return {self.layout.output: self._head_output(pooled)}

    def _head_output(self, pooled):
        """The head on float32 pooled rows: L2 normalization, or a classifier's dense layers."""
        import torch
        import torch.nn.functional as F

        for index, activation in enumerate(self.layout.head):
            w = self.weights
            pooled = F.linear(pooled, w[f"head.{index}.weight"], w[f"head.{index}.bias"])
            if activation == "tanh":
                pooled = torch.tanh(pooled)
            elif activation == "relu":
                pooled = torch.relu(pooled)
        return F.normalize(pooled, dim=1) if self.layout.normalize else pooled

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One padded batch of int64 numpy feeds -> float32 numpy outputs."""
        import torch

        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise ValueError(f"{self.path}: feeds lack {', '.join(missing)}")
        tensors = {
            name: torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=np.int64)).to(
                self.device
            )
            for name in self.input_names
        }
        outputs = self.run_device(tensors)
        return {name: value.cpu().numpy() for name, value in outputs.items()}


def open_engine(engine_path: Path, device: str, precision: str) -> TorchEncoder:
    """The engine file as a TorchEncoder on ``device`` (``precision``: fp32, fp16 or int8), run
    with the options it was built with.

    Raises:
        LayoutError: as read_header, or a tensor that does not fit the layout.
    """
    layout, options = read_header(engine_path)
    return TorchEncoder(engine_path, layout, device, precision, options=options)
