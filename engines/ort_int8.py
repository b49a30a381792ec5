"""Lowering of explicit Q/DQ INT8 graphs to the integer operators ONNX Runtime's CPU runs fastest.

ORT's own QDQ fusion quantizes an input once per consuming MatMul (the Q, K and V projections
quantize one tensor three times) and keeps every bias Add as a separate pass. This rewrite gives
each quantized tensor one QuantizeLinear and each projection one MatMulIntegerToFloat with its
bias folded in. Activations go to uint8 with zero point 128: the levels of the symmetric int8
scale (plus one at +128 s), and u8 x s8 is the product VNNI instructions compute.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.errors import InputError
from pipeline.onnx_io import splice_nodes

CONTRIB = "com.microsoft"
_UINT8_ZERO = 128


def lower_qdq_matmuls(model):
    """Return a copy of ``model`` with every Q/DQ -> MatMul (-> bias Add) as MatMulIntegerToFloat.

    Raises:
        InputError: a Q/DQ pattern it cannot lower (non-constant scales, mismatched scales).
    """
    import onnx
    from onnx import helper, numpy_helper

    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def const(name):
        if name not in inits:
            raise InputError(f"Q/DQ lowering: {name!r} is not a constant")
        return numpy_helper.to_array(inits[name])

    def add_init(name, array):
        if name not in inits:
            tensor = numpy_helper.from_array(array, name)
            graph.initializer.append(tensor)
            inits[name] = tensor
        return name

    removed, replacements = set(), {}  # node name -> nodes to insert in its place
    quantized: dict[str, tuple[str, str, float]] = {}  # float tensor -> (u8 tensor, scale, value)
    for node in list(graph.node):
        if node.op_type != "MatMul":
            continue
        act_dq, weight_dq = (producer.get(i) for i in node.input)
        if not (act_dq and weight_dq and act_dq.op_type == weight_dq.op_type == "DequantizeLinear"):
            continue
        act_q = producer.get(act_dq.input[0])
        if act_q is None or act_q.op_type != "QuantizeLinear" or weight_dq.input[0] not in inits:
            continue
        source = act_q.input[0]
        scale = float(const(act_q.input[1]))
        if source not in quantized:
            u8 = f"{source}_u8"
            scale_name = add_init(f"{u8}_scale", np.array(scale, dtype=np.float32))
            zero_name = add_init(f"{u8}_zero_point", np.array(_UINT8_ZERO, dtype=np.uint8))
            replacements.setdefault(act_q.name, []).append(
                helper.make_node(
                    "QuantizeLinear", [source, scale_name, zero_name], [u8], name=f"{u8}_Q"
                )
            )
            quantized[source] = (u8, scale_name, scale)
        u8, scale_name, first_scale = quantized[source]
        if not np.isclose(scale, first_scale, rtol=1e-6):
            raise InputError(f"Q/DQ lowering: tensor {source!r} has two different scales")
        inputs = [
            u8,
            weight_dq.input[0],
            scale_name,
            weight_dq.input[1],
            add_init(f"{u8}_zero_point", np.array(_UINT8_ZERO, dtype=np.uint8)),
            weight_dq.input[2] if len(weight_dq.input) > 2 else "",
        ]
        output = node.output[0]
        users = consumers[output]
        bias_add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        if bias_add is not None:
            other = [i for i in bias_add.input if i != output]
            bias = inits.get(other[0]) if len(other) == 1 else None
            width = const(weight_dq.input[0]).shape[1]
            if bias is not None and list(bias.dims) == [width]:
                inputs.append(other[0])
                output = bias_add.output[0]
                removed.add(bias_add.name)
        replacements.setdefault(node.name, []).append(
            helper.make_node(
                "MatMulIntegerToFloat", inputs, [output], name=f"{node.name}_int8", domain=CONTRIB
            )
        )
        removed.update({node.name, act_dq.name, weight_dq.name, act_q.name})

    if not quantized:
        return lowered
    splice_nodes(graph, before=replacements, remove=removed)
    if not any(o.domain == CONTRIB for o in lowered.opset_import):
        lowered.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return lowered
