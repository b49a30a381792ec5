"""Explicit INT8 quantization: Q/DQ pairs on MatMul inputs, symmetric, per-channel weights.

This is the form TensorRT 10/11 builds INT8 from (explicit quantization: precision lives in the
graph) and ONNX Runtime runs too. Only MatMuls with a constant 2-D weight (the projections and the
FFN) are quantized; LayerNorm, Softmax, GELU, residual adds and the attention score products stay in
float. Activations get one Q/DQ pair per tensor, shared by all its consumers (the Q, K and V
projections read one): TensorRT fuses it that way, and the ONNX Runtime INT8 engine lowers it to
one QuantizeLinear per tensor (engines/ort_int8.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from calibration.ranges import INT8_LEVELS
from pipeline.errors import InputError
from pipeline.onnx_io import splice_nodes


@dataclass(frozen=True)
class QuantizableMatMul:
    """One MatMul whose second input is a constant [in, out] weight."""

    node_name: str
    activation: str
    weight: str


def quantizable_matmuls(model) -> list[QuantizableMatMul]:
    """MatMuls in graph order whose weight is a 2-D float initializer."""
    from onnx import TensorProto

    weights = {
        init.name: init
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2
    }
    found = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in weights:
            if not node.name:
                raise InputError("calibration: a MatMul without a node name cannot be tracked")
            found.append(QuantizableMatMul(node.name, node.input[0], node.input[1]))
    return found


def weight_scales(weight: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel scales of a [in, out] weight."""
    amax = np.abs(weight).max(axis=0)
    return np.where(amax > 0, amax / INT8_LEVELS, 1.0).astype(np.float32)


def activation_scale(amax: float) -> float:
    """Symmetric per-tensor scale; an all-zero tensor gets scale 1 (any scale is exact)."""
    return float(amax / INT8_LEVELS) if amax > 0 else 1.0


def insert_qdq(
    model,
    amax: Mapping[str, float],
    *,
    exclude: frozenset[str] = frozenset(),
) -> tuple[object, dict[str, dict]]:
    """Return a copy of ``model`` with Q/DQ on the inputs of every quantizable MatMul.

    Args:
        model: a float ONNX graph.
        amax: calibrated magnitude per activation tensor name.
        exclude: MatMul node names to keep in float.

    Returns:
        The quantized graph and a record of every quantized tensor: its kind, scale(s) and amax.

    Raises:
        InputError: an activation to quantize has no calibrated amax.
    """
    import onnx
    from onnx import helper, numpy_helper

    quantized = onnx.ModelProto()
    quantized.CopyFrom(model)
    graph = quantized.graph
    initializers = {init.name: init for init in graph.initializer}
    targets = [m for m in quantizable_matmuls(quantized) if m.node_name not in exclude]
    nodes_by_name = {node.name: node for node in graph.node}
    record: dict[str, dict] = {}
    new_nodes: dict[str, list] = {}  # inserted before the node that first needs them
    dequantized: dict[str, str] = {}

    def add_const(name: str, array: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    for target in targets:
        node = nodes_by_name[target.node_name]
        pending = new_nodes.setdefault(target.node_name, [])
        if target.activation not in dequantized:
            if target.activation not in amax:
                raise InputError(f"calibration: no range for tensor {target.activation!r}")
            scale = activation_scale(amax[target.activation])
            base = f"{target.activation}_int8"
            s_name = add_const(f"{base}_scale", np.array(scale, dtype=np.float32))
            z_name = add_const(f"{base}_zero_point", np.array(0, dtype=np.int8))
            pending.append(
                helper.make_node(
                    "QuantizeLinear",
                    [target.activation, s_name, z_name],
                    [f"{base}_q"],
                    name=f"{base}_Q",
                )
            )
            pending.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{base}_q", s_name, z_name],
                    [f"{base}_dq"],
                    name=f"{base}_DQ",
                )
            )
            dequantized[target.activation] = f"{base}_dq"
            record[target.activation] = {
                "kind": "activation",
                "amax": amax[target.activation],
                "scale": scale,
            }
        if target.weight not in dequantized:
            weight = numpy_helper.to_array(initializers[target.weight]).astype(np.float32)
            scales = weight_scales(weight)
            q_weight = np.clip(np.round(weight / scales), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
            base = f"{target.weight}_int8"
            q_name = add_const(f"{base}_q", q_weight)
            s_name = add_const(f"{base}_scale", scales)
            z_name = add_const(f"{base}_zero_point", np.zeros(len(scales), dtype=np.int8))
            pending.append(
                helper.make_node(
                    "DequantizeLinear",
                    [q_name, s_name, z_name],
                    [f"{base}_dq"],
                    name=f"{base}_DQ",
                    axis=1,
                )
            )
            dequantized[target.weight] = f"{base}_dq"
            record[target.weight] = {"kind": "weight", "axis": 1, "scale": scales.tolist()}
        node.input[0] = dequantized[target.activation]
        node.input[1] = dequantized[target.weight]

    splice_nodes(graph, before=new_nodes)
    return quantized, record
