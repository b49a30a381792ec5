"""Explicit quantization: Q/DQ pairs on MatMul inputs, symmetric, per-channel weights, in INT8 or
float8 e4m3fn (QUANTIZED_FORMATS).

This is the form TensorRT 10/11 builds INT8 and FP8 from (explicit quantization: precision lives
in the graph) and ONNX Runtime runs too: the INT8 graph as a CPU engine, the fp8 graph only as
written (float math on exactly rounded float8 values; ORT has no fast fp8 path:
docs/guides/int8.md).

Only MatMuls with a constant 2-D weight (the projections and the FFN) are quantized; LayerNorm,
Softmax, GELU, residual adds and the attention score products stay in float. Activations get one
Q/DQ pair per tensor, shared by all its consumers (the Q, K and V projections read one): TensorRT
fuses it that way, and the ONNX Runtime INT8 engine lowers it to one QuantizeLinear per tensor
(engines/ort_int8.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from bert_compiler.calibration.ranges import INT8_LEVELS
from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import splice_nodes

# Operators whose float inputs stay float unless the user names them (--quantize-op): LayerNorm,
# Softmax and GELU are numerically fragile, and residual adds carry the unnormalised signal.
# Weight scales: one per output channel (the default), or one per weight tensor.
WEIGHT_GRANULARITIES = ("channel", "tensor")


@dataclass(frozen=True)
class QuantizedFormat:
    """An element type Q/DQ pairs quantize to.

    Attributes:
        name: the name in CalibrationSpec.format, the CLI and the manifest; also the engine
            precision built from it.
        largest: the largest magnitude the type holds: an amax maps to it (scale = amax / largest).
        onnx_type: the TensorProto type name of quantized values and zero points.
        min_opset: the lowest ai.onnx opset whose QuantizeLinear/DequantizeLinear take the type.
    """

    name: str
    largest: float
    onnx_type: str
    min_opset: int


INT8 = QuantizedFormat("int8", float(INT8_LEVELS), "INT8", 13)
# e4m3fn: 4 exponent bits, 3 mantissa bits, no infinities; 448 is its largest finite value, and
# the float8 types entered QuantizeLinear/DequantizeLinear in opset 19.
FP8 = QuantizedFormat("fp8", 448.0, "FLOAT8E4M3FN", 19)
FORMATS = {f.name: f for f in (INT8, FP8)}
QUANTIZED_FORMATS = tuple(FORMATS)
OPTIONAL_QUANTIZED_OPS = frozenset({"Add", "LayerNormalization", "Softmax", "Erf", "Gelu"})


@dataclass(frozen=True)
class QuantizableMatMul:
    """One MatMul or Gemm whose second input is a constant 2-D weight.

    Attributes:
        weight_axis: the weight's output-channel axis (1 for MatMul [in, out]; 0 for a Gemm with
            transB=1, whose weight is [out, in]).
    """

    node_name: str
    activation: str
    weight: str
    weight_axis: int = 1


def quantizable_matmuls(model) -> list[QuantizableMatMul]:
    """MatMuls and plain Gemms (alpha 1, A not transposed) in graph order whose weight is a 2-D
    float initializer."""
    from onnx import TensorProto, helper

    weights = {
        init.name: init
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2
    }
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if node.input[1] not in weights or node.input[0] in weights:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0):
            continue
        if not node.name:
            raise InputError(f"calibration: a {node.op_type} without a node name cannot be tracked")
        axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1
        found.append(QuantizableMatMul(node.name, node.input[0], node.input[1], axis))
    return found


def format_type(fmt: QuantizedFormat) -> int:
    """The TensorProto element type of ``fmt``'s quantized values."""
    from onnx import TensorProto

    return int(getattr(TensorProto, fmt.onnx_type))


def format_of(name: str) -> QuantizedFormat:
    """The QuantizedFormat called ``name``.

    Raises:
        InputError: no such format.
    """
    if name not in FORMATS:
        raise InputError(
            f"quantized format {name!r}: expected one of {', '.join(QUANTIZED_FORMATS)}"
        )
    return FORMATS[name]


def float_matmuls(model) -> dict[str, Any] | None:
    """Of a Q/DQ graph's MatMuls and Gemms with a 2-D weight, those running in float.

    Returns:
        ``{"float": k, "total": n, "float_nodes": [...]}``, where ``total`` counts the quantized
        ones (weight from a DequantizeLinear of INT8 or float8 values) and the float ones that
        could have been (constant float weight, quantizable_matmuls); None for a graph with no
        quantized MatMul.
    """
    quantized_types = {format_type(f) for f in FORMATS.values()}
    quantized_weights = {
        init.name
        for init in model.graph.initializer
        if init.data_type in quantized_types and len(init.dims) == 2
    }
    dequantized = {
        node.output[0]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in quantized_weights
    }
    quantized = [
        node.name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and len(node.input) > 1
        and node.input[1] in dequantized
    ]
    if not quantized:
        return None
    floating = [m.node_name for m in quantizable_matmuls(model)]
    return {
        "float": len(floating),
        "total": len(floating) + len(quantized),
        "float_nodes": floating,
    }


def optional_inputs(model, op_types) -> list[tuple[str, int, str]]:
    """(node name, input index, tensor) of every non-constant float input of ``op_types`` nodes.

    Raises:
        InputError: an op type outside OPTIONAL_QUANTIZED_OPS.
    """
    import onnx
    from onnx import TensorProto

    unknown = set(op_types) - OPTIONAL_QUANTIZED_OPS
    if unknown:
        raise InputError(
            f"--quantize-op {sorted(unknown)}: expected some of {sorted(OPTIONAL_QUANTIZED_OPS)}"
        )
    if not op_types:
        return []
    inferred = onnx.shape_inference.infer_shapes(model)
    float_tensors = {
        v.name
        for v in list(inferred.graph.value_info) + list(inferred.graph.input)
        if v.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    constants = {init.name for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type in op_types:
            for index, tensor in enumerate(node.input):
                if tensor in float_tensors and tensor not in constants:
                    found.append((node.name, index, tensor))
    return found


def weight_scales(weight: np.ndarray, axis: int = 1, fmt: QuantizedFormat = INT8) -> np.ndarray:
    """Symmetric per-output-channel scales of a 2-D weight whose output channels lie on ``axis``."""
    amax = np.abs(weight).max(axis=1 - axis)
    return np.where(amax > 0, amax / fmt.largest, 1.0).astype(np.float32)


def tensor_weight_scale(weight: np.ndarray, fmt: QuantizedFormat = INT8) -> np.ndarray:
    """The symmetric per-tensor scale of a weight, as a scalar array (DequantizeLinear's form)."""
    return np.array(activation_scale(float(np.abs(weight).max()), fmt), dtype=np.float32)


def activation_scale(amax: float, fmt: QuantizedFormat = INT8) -> float:
    """Symmetric per-tensor scale; an all-zero tensor gets scale 1 (any scale is exact)."""
    return float(amax / fmt.largest) if amax > 0 else 1.0


def quantize_values(values: np.ndarray, fmt: QuantizedFormat) -> np.ndarray:
    """``values`` (already divided by their scale) in ``fmt``, as QuantizeLinear rounds them:
    INT8 to the nearest integer (ties to even), float8 to the nearest e4m3fn value (ties to
    even), both saturating at the format's largest magnitude."""
    from onnx import helper

    clipped = np.clip(values, -fmt.largest, fmt.largest)
    if fmt is INT8:
        return np.round(clipped).astype(np.int8)
    # ml_dtypes' float8_e4m3fn (onnx's own numpy type for FLOAT8E4M3FN) rounds to nearest even;
    # the clip first matters: e4m3fn has no infinity, so an overflow would become NaN.
    return clipped.astype(helper.tensor_dtype_to_np_dtype(format_type(fmt)))


def zero_points(shape: tuple[int, ...], fmt: QuantizedFormat) -> np.ndarray:
    """Zero points (symmetric quantization: all zero) of ``fmt``'s type."""
    return quantize_values(np.zeros(shape, dtype=np.float32), fmt)


def raise_opset(model, opset: int):
    """``model`` at ai.onnx ``opset`` or above, through ONNX's version converter (which rewrites
    the ops whose signature changed on the way, e.g. ReduceL2's axes moving to an input in 18).

    Raises:
        InputError: the converter cannot bring the graph to ``opset``.
    """
    import onnx
    from onnx import version_converter

    current = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if current >= opset:
        return model
    try:
        converted = version_converter.convert_version(model, opset)
        onnx.checker.check_model(converted)
    # Adapters that are missing raise ConvertError; some raise RuntimeError from C++.
    except (version_converter.ConvertError, onnx.checker.ValidationError, RuntimeError) as err:
        raise InputError(
            f"calibration: the graph (opset {current}) cannot be raised to opset {opset}, which "
            f"its float8 Q/DQ nodes need ({str(err).splitlines()[0]}); export with --opset "
            f"{opset}"
        ) from err
    return converted


def insert_qdq(
    model,
    amax: Mapping[str, float],
    *,
    exclude: frozenset[str] = frozenset(),
    quantize_ops: tuple[str, ...] = (),
    weight_granularity: str = "channel",
    format: str = INT8.name,
) -> tuple[Any, dict[str, dict]]:
    """Return a copy of ``model`` with Q/DQ on the inputs of every quantizable MatMul.

    Args:
        model: a float ONNX graph.
        amax: calibrated magnitude per activation tensor name.
        exclude: MatMul node names to keep in float.
        quantize_ops: op types of OPTIONAL_QUANTIZED_OPS whose float inputs get Q/DQ too.
        weight_granularity: ``channel`` (one scale per output channel) or ``tensor`` (one per
            weight) of WEIGHT_GRANULARITIES.
        format: the quantized type, of QUANTIZED_FORMATS: ``int8``, or ``fp8`` (float8 e4m3fn;
            the graph's opset is raised to 19 if lower, raise_opset).

    Returns:
        The quantized graph and a record of every quantized tensor: its kind, scale(s) and amax.

    Raises:
        InputError: an activation to quantize has no calibrated amax, an unknown format or
            granularity, or a graph that cannot reach the format's opset.
    """
    import onnx

    if weight_granularity not in WEIGHT_GRANULARITIES:
        raise InputError(
            f"weight granularity {weight_granularity!r}: expected one of "
            f"{', '.join(WEIGHT_GRANULARITIES)}"
        )
    fmt = format_of(format)
    quantized = onnx.ModelProto()
    quantized.CopyFrom(raise_opset(model, fmt.min_opset))
    graph = quantized.graph
    insertion = _QdqInsertion(graph, amax, fmt, per_channel=weight_granularity == "channel")
    targets = [m for m in quantizable_matmuls(quantized) if m.node_name not in exclude]
    nodes_by_name = {node.name: node for node in graph.node}
    extra = optional_inputs(quantized, quantize_ops)
    for target in targets:
        node = nodes_by_name[target.node_name]
        before = insertion.new_nodes.setdefault(target.node_name, [])
        activation_dq = insertion.quantize_activation(target.activation)
        weight_dq = insertion.quantize_weight(target, before)
        node.input[0], node.input[1] = activation_dq, weight_dq
    for node_name, index, tensor in extra:
        nodes_by_name[node_name].input[index] = insertion.quantize_activation(tensor)

    splice_nodes(graph, before=insertion.new_nodes, after=insertion.after_nodes)
    return quantized, insertion.record


class _QdqInsertion:
    """Q/DQ being added to a graph: the nodes to insert before a node (weight DQs before their
    MatMul; an input's Q/DQ before the first node) and after one (an activation's Q/DQ after its
    producer), each tensor's DQ output once made, and the record of every quantized tensor."""

    def __init__(
        self, graph: Any, amax: Mapping[str, float], fmt: QuantizedFormat, *, per_channel: bool
    ) -> None:
        self.graph = graph
        self.amax = amax
        self.fmt = fmt
        self.per_channel = per_channel
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers = {out: node.name for node in graph.node for out in node.output}
        self.record: dict[str, dict] = {}
        self.new_nodes: dict[str, list] = {}  # weight DQs, inserted before their MatMul
        self.after_nodes: dict[str, list] = {}
        self.dequantized: dict[str, str] = {}

    def add_const(self, name: str, array: np.ndarray) -> str:
        """``name``, added as an initializer holding ``array``."""
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def quantize_activation(self, tensor: str) -> str:
        """The DQ output standing for ``tensor``: one Q/DQ pair per tensor, shared.

        Raises:
            InputError: ``tensor`` has no calibrated range.
        """
        from onnx import helper

        amax, fmt, dequantized = self.amax, self.fmt, self.dequantized
        if tensor not in dequantized:
            if tensor not in amax:
                raise InputError(f"calibration: no range for tensor {tensor!r}")
            scale = activation_scale(amax[tensor], fmt)
            base = f"{tensor}_{fmt.name}"
            s_name = self.add_const(f"{base}_scale", np.array(scale, dtype=np.float32))
            z_name = self.add_const(f"{base}_zero_point", zero_points((), fmt))
            # Right after the producer (first, for a graph input): valid for every consumer.
            producer = self.producers.get(tensor)
            if producer is None:
                slot = self.new_nodes.setdefault(self.graph.node[0].name, [])
            else:
                slot = self.after_nodes.setdefault(producer, [])
            slot.extend(
                [
                    helper.make_node(
                        "QuantizeLinear", [tensor, s_name, z_name], [f"{base}_q"], name=f"{base}_Q"
                    ),
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_q", s_name, z_name],
                        [f"{base}_dq"],
                        name=f"{base}_DQ",
                    ),
                ]
            )
            dequantized[tensor] = f"{base}_dq"
            self.record[tensor] = {"kind": "activation", "amax": amax[tensor], "scale": scale}
        return dequantized[tensor]

    def quantize_weight(self, target: QuantizableMatMul, before: list) -> str:
        """The DQ output standing for ``target``'s weight, stored quantized ahead of time (its
        DequantizeLinear appended to ``before``, the nodes inserted before the MatMul, the first
        time the weight is seen)."""
        from onnx import helper, numpy_helper

        fmt, per_channel = self.fmt, self.per_channel
        if target.weight not in self.dequantized:
            weight = numpy_helper.to_array(self.initializers[target.weight]).astype(np.float32)
            if per_channel:
                scales = weight_scales(weight, target.weight_axis, fmt)
                shaped = scales if target.weight_axis == 1 else scales[:, None]
            else:
                scales = shaped = tensor_weight_scale(weight, fmt)
            # Quantized ahead of time: the graph stores the weight in the quantized type.
            q_weight = quantize_values(weight / shaped, fmt)
            base = f"{target.weight}_{fmt.name}"
            q_name = self.add_const(f"{base}_q", q_weight)
            s_name = self.add_const(f"{base}_scale", scales)
            z_name = self.add_const(f"{base}_zero_point", zero_points(scales.shape, fmt))
            # A scalar scale is per tensor: DequantizeLinear takes no axis then.
            axis: dict[str, Any] = {"axis": target.weight_axis} if per_channel else {}
            before.append(
                helper.make_node(
                    "DequantizeLinear",
                    [q_name, s_name, z_name],
                    [f"{base}_dq"],
                    name=f"{base}_DQ",
                    **axis,
                )
            )
            self.dequantized[target.weight] = f"{base}_dq"
            self.record[target.weight] = {
                "kind": "weight",
                "axis": target.weight_axis if per_channel else None,
                "scale": scales.tolist(),
            }
        return self.dequantized[target.weight]
