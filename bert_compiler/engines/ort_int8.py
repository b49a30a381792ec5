"""Lowering of explicit Q/DQ INT8 graphs to the integer operators ONNX Runtime's CPU runs fastest.

ORT's own QDQ fusion quantizes an input once per consuming MatMul (the Q, K and V projections
quantize one tensor three times) and keeps every bias Add as a separate pass. This rewrite gives
each quantized tensor one QuantizeLinear and each projection one MatMulIntegerToFloat with its
bias folded in. Activations go to uint8 with zero point 128: the levels of the symmetric int8
scale (plus one at +128 s), and u8 x s8 is the product VNNI instructions compute.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import splice_nodes

CONTRIB = "com.microsoft"
_UINT8_ZERO = 128


WEIGHT_TYPES = ("s8", "u8")
# Which lowered MatMuls quantize their activation at run time, per batch, instead of with the
# calibrated scale: none, the feed-forward down-projections, or all.
DYNAMIC_SCOPES = ("none", "ffn-down", "all")
# What a build may ask for: ``auto`` is weight_type_for_this_cpu().
WEIGHT_CHOICES = ("auto", *WEIGHT_TYPES)
# CPU flags (Linux /proc/cpuinfo) of the instructions that multiply u8 x s8 into int32 directly.
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_weight_type(requested: str) -> str:
    """The weight type a build asking for ``requested`` (one of WEIGHT_CHOICES) uses."""
    if requested not in WEIGHT_CHOICES:
        raise InputError(
            f"--int8-weights {requested!r}: expected one of {', '.join(WEIGHT_CHOICES)}"
        )
    return weight_type_for_this_cpu() if requested == "auto" else requested


def weight_type_for_this_cpu(cpuinfo: str | None = None) -> str:
    """``s8`` where this CPU has VNNI (exact and fastest), else ``u8`` (exact everywhere).

    Args:
        cpuinfo: text of /proc/cpuinfo (read when None; ``u8`` where it cannot be read).
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                cpuinfo = handle.read()
        except OSError:
            return "u8"
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return "s8" if flags & _VNNI_FLAGS else "u8"


def check_dynamic_scope(scope: str) -> str:
    """``scope`` when it is one of DYNAMIC_SCOPES.

    Raises:
        InputError: an unknown scope.
    """
    if scope not in DYNAMIC_SCOPES:
        raise InputError(f"--int8-dynamic {scope!r}: expected one of {', '.join(DYNAMIC_SCOPES)}")
    return scope


def lower_qdq_matmuls(model, *, weights: str = "s8", dynamic: str = "none"):
    """Return a copy of ``model`` with every Q/DQ -> MatMul (-> bias Add) as MatMulIntegerToFloat,
    or, for the MatMuls in ``dynamic``'s scope, as DynamicQuantizeMatMul: the float activation
    quantized at run time from the batch's own range, the calibrated scale unused.

    Args:
        dynamic: one of DYNAMIC_SCOPES: ``none``, ``ffn-down`` (the MatMuls that narrow their
            input: a BERT layer's feed-forward down-projection, whose input after GELU has the
            widest range) or ``all``.
        weights: ``s8`` keeps the int8 weights (u8 x s8: VNNI's product, fastest there);
            ``u8`` stores them as uint8 with zero point 128, the same integers shifted. On x86
            CPUs without VNNI, ONNX Runtime computes u8 x s8 with VPMADDUBSW, whose int16
            pair sums saturate (how far off that is: docs/guides/int8.md); its u8 x u8 kernel
            widens first and stays exact.

    Raises:
        InputError: a Q/DQ pattern it cannot lower (non-constant scales, mismatched scales).
    """
    import onnx
    from onnx import helper

    if weights not in WEIGHT_TYPES:
        raise InputError(f"INT8 weight type {weights!r}: expected one of {', '.join(WEIGHT_TYPES)}")
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    lowering = _QdqLowering(graph, weights=weights, dynamic=dynamic)
    check_dynamic_scope(dynamic)
    for node in list(graph.node):
        lowering.lower(node)
    if not lowering.quantized and not lowering.dynamic_count:
        return lowered
    if weights == "u8":
        # The int8 weights (and zero points) are now unused: drop them from the engine file.
        lowering.drop_unused_initializers()
    splice_nodes(graph, before=lowering.replacements, remove=lowering.removed)
    if not any(o.domain == CONTRIB for o in lowered.opset_import):
        lowered.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return lowered


class _QdqLowering:
    """One lowering in progress: the graph's constants, producers and consumers, the nodes to
    remove and to insert (by the name of the node they replace), and the activations quantized
    so far (float tensor -> (u8 tensor, scale name, scale value))."""

    def __init__(self, graph: Any, *, weights: str, dynamic: str) -> None:
        self.graph = graph
        self.weights = weights
        self.dynamic = dynamic
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: defaultdict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.removed: set[str] = set()
        self.replacements: dict[str, list[Any]] = {}  # node name -> nodes to insert in its place
        self.quantized: dict[str, tuple[str, str, float]] = {}
        self.dynamic_count = 0

    def const(self, name: str) -> np.ndarray:
        """A constant's value.

        Raises:
            InputError: ``name`` is not an initializer.
        """
        from onnx import numpy_helper

        if name not in self.inits:
            raise InputError(f"Q/DQ lowering: {name!r} is not a constant")
        return numpy_helper.to_array(self.inits[name])

    def add_init(self, name: str, array: np.ndarray) -> str:
        """``name``, added as an initializer holding ``array`` unless the graph has it."""
        from onnx import numpy_helper

        if name not in self.inits:
            tensor = numpy_helper.from_array(array, name)
            self.graph.initializer.append(tensor)
            self.inits[name] = tensor
        return name

    def fold_bias(self, node: Any, weight_dq: Any, inputs: list[str]) -> str:
        """Append the bias of a following constant bias Add to ``inputs``; the output to write."""
        output = node.output[0]
        users = self.consumers[output]
        bias_add = users[0] if len(users) == 1 and users[0].op_type == "Add" else None
        if bias_add is not None:
            other = [i for i in bias_add.input if i != output]
            bias = self.inits.get(other[0]) if len(other) == 1 else None
            width = self.const(weight_dq.input[0]).shape[1]
            if bias is not None and list(bias.dims) == [width]:
                inputs.append(other[0])
                self.removed.add(bias_add.name)
                return bias_add.output[0]
        return output

    def lower(self, node: Any) -> None:
        """Lower ``node`` when it is a MatMul of a quantized activation (Q -> DQ) and a constant
        quantized weight (DQ): dynamically where the scope says, else with the calibrated scale.

        Raises:
            InputError: a pattern it cannot lower (non-constant scales, mismatched scales).
        """
        if node.op_type != "MatMul":
            return
        act_dq, weight_dq = (self.producer.get(i) for i in node.input)
        if not (act_dq and weight_dq and act_dq.op_type == weight_dq.op_type == "DequantizeLinear"):
            return
        act_q = self.producer.get(act_dq.input[0])
        if (
            act_q is None
            or act_q.op_type != "QuantizeLinear"
            or weight_dq.input[0] not in self.inits
        ):
            return
        source = act_q.input[0]
        scale = float(self.const(act_q.input[1]))
        weight, weight_zero = (
            weight_dq.input[0],
            weight_dq.input[2] if len(weight_dq.input) > 2 else "",
        )
        rows, columns = self.const(weight).shape
        if self.dynamic == "all" or (self.dynamic == "ffn-down" and rows > columns):
            self._lower_dynamic(node, weight_dq, source, weight, weight_zero)
        else:
            self._lower_static(node, act_q, weight_dq, source, scale, weight, weight_zero)
        self.removed.update({node.name, act_dq.name, weight_dq.name, act_q.name})

    def _lower_dynamic(
        self, node: Any, weight_dq: Any, source: str, weight: str, weight_zero: str
    ) -> None:
        """``node`` as DynamicQuantizeMatMul: its float input ``source`` quantized at run time."""
        from onnx import helper

        if self.weights == "u8":
            weight, weight_zero = _shift_to_uint8(weight, weight_zero, self.const, self.add_init)
        inputs = [source, weight, weight_dq.input[1], weight_zero]
        output = self.fold_bias(node, weight_dq, inputs)
        self.replacements.setdefault(node.name, []).append(
            helper.make_node(
                "DynamicQuantizeMatMul",
                inputs,
                [output],
                name=f"{node.name}_int8_dynamic",
                domain=CONTRIB,
            )
        )
        self.dynamic_count += 1

    def _lower_static(
        self,
        node: Any,
        act_q: Any,
        weight_dq: Any,
        source: str,
        scale: float,
        weight: str,
        weight_zero: str,
    ) -> None:
        """``node`` as MatMulIntegerToFloat on ``source`` quantized once (the first of its
        consumers puts its QuantizeLinear in place of ``act_q``) with the calibrated ``scale``.

        Raises:
            InputError: ``source`` was quantized with another scale for another MatMul.
        """
        from onnx import helper

        if source not in self.quantized:
            u8 = f"{source}_u8"
            scale_name = self.add_init(f"{u8}_scale", np.array(scale, dtype=np.float32))
            zero_name = self.add_init(f"{u8}_zero_point", np.array(_UINT8_ZERO, dtype=np.uint8))
            self.replacements.setdefault(act_q.name, []).append(
                helper.make_node(
                    "QuantizeLinear", [source, scale_name, zero_name], [u8], name=f"{u8}_Q"
                )
            )
            self.quantized[source] = (u8, scale_name, scale)
        u8, scale_name, first_scale = self.quantized[source]
        if not np.isclose(scale, first_scale, rtol=1e-6):
            raise InputError(f"Q/DQ lowering: tensor {source!r} has two different scales")
        if self.weights == "u8":
            weight, weight_zero = _shift_to_uint8(weight, weight_zero, self.const, self.add_init)
        inputs = [
            u8,
            weight,
            scale_name,
            weight_dq.input[1],
            self.add_init(f"{u8}_zero_point", np.array(_UINT8_ZERO, dtype=np.uint8)),
            weight_zero,
        ]
        output = self.fold_bias(node, weight_dq, inputs)
        self.replacements.setdefault(node.name, []).append(
            helper.make_node(
                "MatMulIntegerToFloat", inputs, [output], name=f"{node.name}_int8", domain=CONTRIB
            )
        )

    def drop_unused_initializers(self) -> None:
        """Drop the initializers no node reads once the replacements are in (after a u8
        lowering: the int8 weights and zero points)."""
        graph = self.graph
        used = {name for node in graph.node for name in node.input}
        used |= {name for nodes in self.replacements.values() for n in nodes for name in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)


def _shift_to_uint8(weight: str, zero: str, const, add_init) -> tuple[str, str]:
    """The uint8 copy of an int8 weight (value + 128) and its zero point (int8 zero + 128)."""
    values = const(weight)
    if values.dtype != np.int8:
        raise InputError(f"Q/DQ lowering: weight {weight!r} is {values.dtype}, expected int8")
    scale_shape = values.shape[1:]  # per output channel (or scalar when per tensor)
    zeros = const(zero) if zero else np.zeros((), dtype=np.int8)
    if zeros.size > 1 and zeros.shape != scale_shape:
        raise InputError(f"Q/DQ lowering: zero point of {weight!r} has shape {zeros.shape}")
    shifted = (values.astype(np.int16) + _UINT8_ZERO).astype(np.uint8)
    shifted_zero = (zeros.astype(np.int16) + _UINT8_ZERO).astype(np.uint8)
    return (
        add_init(f"{weight}_uint8", shifted),
        add_init(f"{zero or weight}_uint8_zero_point", shifted_zero),
    )
