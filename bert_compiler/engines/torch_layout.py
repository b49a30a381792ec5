"""The torch engine's file format: the layout of the encoder it holds and the options it runs
with, both in the safetensors metadata of the engine file (ENGINE_FILE).

Like torch_module.py, it imports no bert_compiler module: `bert-compile package` copies both
beside the Triton text model of a torch engine (triton/torch_text_model.py). Problems with the
file raise ``LayoutError``, which the backend reports as an artifact error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENGINE_FILE = "encoder.safetensors"
ACTIVATIONS = {"BiasGelu": "gelu", "FastGelu": "gelu_tanh"}
POOLINGS = ("mean", "cls", "none")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# After a classifier head's dense layers: BERT's pooler (tanh), DistilBERT's pre-classifier (relu).
HEAD_ACTIVATIONS = {"Tanh": "tanh", "Relu": "relu"}
ATTENTION_CHOICES = ("triton", "sdpa")
# The engine file's metadata key of its TorchEngineOptions.
OPTIONS_METADATA = "options"


class LayoutError(ValueError):
    """An engine file or layout this tool did not write, or does not fit its layout."""


@dataclass(frozen=True)
class EncoderLayout:
    """What the weights alone do not say: shapes, the activation, the head."""

    layers: int
    hidden: int
    heads: int
    epsilon: float
    activation: str  # gelu (erf) or gelu_tanh
    pooling: str  # mean, cls or none (the output is the last hidden state)
    normalize: bool
    output: str
    input_names: tuple[str, ...]
    token_types: bool
    # A classifier's dense layers after the pooling (BERT's pooler and classifier: tanh, none),
    # each layer's activation; empty for an embedding model.
    head: tuple[str, ...] = ()
    # Rows of the position table before a row's first token (RoBERTa: the padding index + 1).
    position_offset: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "input_names": list(self.input_names), "head": list(self.head)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> EncoderLayout:
        """The layout a build recorded, checked field by field.

        Raises:
            LayoutError: a field missing, unknown or out of range.
        """
        try:
            layout = cls(
                **{
                    **data,
                    "input_names": tuple(data["input_names"]),
                    "head": tuple(data.get("head", ())),
                }
            )
        except (TypeError, KeyError) as err:
            raise LayoutError(
                f"{where}: the engine's layout is not one this tool wrote ({err})"
            ) from None
        problem = layout._problem()
        if problem:
            raise LayoutError(
                f"{where}: the engine's layout is not one this tool wrote ({problem})"
            )
        return layout

    def _problem(self) -> str:
        counts = (self.layers, self.hidden, self.heads)
        if not all(isinstance(n, int) and n > 0 for n in counts) or self.hidden % self.heads:
            return f"layers {self.layers}, hidden {self.hidden}, heads {self.heads}"
        if self.activation not in ACTIVATIONS.values() or self.pooling not in POOLINGS:
            return f"activation {self.activation!r}, pooling {self.pooling!r}"
        if any(a not in (*HEAD_ACTIVATIONS.values(), "none") for a in self.head):
            return f"head {list(self.head)}"
        if not {"input_ids", "attention_mask"} <= set(self.input_names) <= set(INPUT_NAMES):
            return f"inputs {list(self.input_names)}"
        if not isinstance(self.position_offset, int) or self.position_offset < 0:
            return f"position offset {self.position_offset!r}"
        return ""

    def shapes(self, tensors: Mapping[str, Any]) -> dict[str, tuple[int | None, ...]]:
        """Every tensor the encoder reads and its shape (None: any size), given the tables'
        and the feed-forward's sizes in ``tensors``."""
        h = self.hidden
        ffn = (
            tuple(tensors["layers.0.up.weight"].shape)[0] if "layers.0.up.weight" in tensors else -1
        )
        vector = (h,)
        shapes: dict[str, tuple[int | None, ...]] = {
            "embeddings.word": (None, h),
            "embeddings.position": (None, h),
            "embeddings.norm.weight": vector,
            "embeddings.norm.bias": vector,
        }
        if self.token_types:
            shapes["embeddings.token_type"] = (None, h)
        if "embeddings.constant" in tensors:
            shapes["embeddings.constant"] = vector
        for index in range(self.layers):
            p = f"layers.{index}."
            shapes.update(
                {
                    p + "qkv.weight": (3 * h, h), p + "qkv.bias": (3 * h,),
                    p + "out.weight": (h, h), p + "out.bias": vector,
                    p + "norm1.weight": vector, p + "norm1.bias": vector,
                    p + "up.weight": (ffn, h), p + "up.bias": (ffn,),
                    p + "down.weight": (h, ffn), p + "down.bias": vector,
                    p + "norm2.weight": vector, p + "norm2.bias": vector,
                }
            )  # fmt: skip
        width = h
        for index in range(len(self.head)):
            weight = tensors.get(f"head.{index}.weight")
            rows = tuple(weight.shape)[0] if weight is not None and weight.dim() == 2 else -1
            shapes[f"head.{index}.weight"] = (rows, width)
            shapes[f"head.{index}.bias"] = (rows,)
            width = rows
        return shapes


@dataclass(frozen=True)
class TorchEngineOptions:
    """How a torch engine runs: the torch backend's own build options (BuildSpec.options, its
    flags --torch-attention and --torch-cuda-graphs), stored in the engine file beside its
    layout, so that the runtime and the Triton text model run the engine as verify ran it.

    Attributes:
        attention: ``triton``: rows of up to SHORT_ATTENTION_MAX tokens attend in this module's
            kernel where it runs (a GPU with Triton), longer ones in PyTorch's
            scaled_dot_product_attention; ``sdpa``: every batch in scaled_dot_product_attention
            on padded rows.
        cuda_graphs: on a GPU, small packed batches replay CUDA graphs (they need the ``triton``
            attention); off, every batch launches its kernels and no graph memory is held.
    """

    attention: str = "triton"
    cuda_graphs: bool = True

    def to_metadata(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, recorded: str | None, where: str) -> TorchEngineOptions:
        """The options an engine file records; the defaults for one built before there were
        any (it ran with them).

        Raises:
            LayoutError: options that are not this tool's.
        """
        if recorded is None:
            return cls()
        try:
            data = json.loads(recorded)
            options = cls(**data)
        except (ValueError, TypeError):
            raise LayoutError(
                f"{where}: the engine file's options are not this tool's; rebuild the engine"
            ) from None
        if options.attention not in ATTENTION_CHOICES or not isinstance(options.cuda_graphs, bool):
            raise LayoutError(
                f"{where}: the engine file's options {data} are not this tool's; rebuild the engine"
            )
        return options


def read_layout(engine_path: Path) -> EncoderLayout:
    """The layout stored in an engine file's metadata.

    Raises:
        LayoutError: none there, or not one this tool wrote.
    """
    return _layout_of(_metadata(engine_path), engine_path)


def read_header(engine_path: Path) -> tuple[EncoderLayout, TorchEngineOptions]:
    """The layout and the options stored in an engine file's metadata, read once.

    Raises:
        LayoutError: no layout there, or a layout or options not this tool's.
    """
    metadata = _metadata(engine_path)
    recorded = metadata.get(OPTIONS_METADATA)
    options = TorchEngineOptions.from_metadata(recorded, str(engine_path))
    return _layout_of(metadata, engine_path), options


def _layout_of(metadata: Mapping[str, str], engine_path: Path) -> EncoderLayout:
    recorded = metadata.get("layout", "")
    try:
        data = json.loads(recorded)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise LayoutError(f"{engine_path}: no layout in the engine file; rebuild the engine")
    return EncoderLayout.from_dict(data, str(engine_path))


def _metadata(engine_path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(engine_path), framework="pt") as opened:
        return dict(opened.metadata() or {})
