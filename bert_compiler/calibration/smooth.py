"""SmoothQuant-style migration of activation outliers into the weights.

BERT's MatMul inputs have a few channels with magnitudes far above the rest; one per-tensor INT8
scale either clips them or spends its levels on them. For an activation X read by MatMuls with
weights W, ``X W = (X / s) (s W)`` for any positive per-channel ``s``: dividing the activation's
channels by ``s`` and multiplying the weights' input rows by ``s`` is exact in real arithmetic and
moves the outliers into the weights, which are quantized per output channel. With
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (Xiao et al., 2023) both sides end up with
comparable ranges.

The division is one Mul on the activation, seen only by the quantized MatMuls: in a post-LayerNorm
BERT the LayerNorm output also feeds the residual add, so it cannot be folded into the LayerNorm's
weights without changing the residual; the Mul stays float, in front of the activation's Q/DQ.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import numpy as np

from bert_compiler.calibration.qdq import quantizable_matmuls
from bert_compiler.core.errors import InputError
from bert_compiler.core.onnx_io import splice_nodes

SMOOTHED_SUFFIX = "_smoothed"
# Factors are clipped: a channel that is (nearly) always zero would otherwise get a huge weight.
_FACTOR_RANGE = (1e-3, 1e3)


def smoothed_name(activation: str) -> str:
    """The tensor the quantized MatMuls read instead of ``activation`` once it is smoothed."""
    return activation + SMOOTHED_SUFFIX


def _input_rows(weight: np.ndarray, axis: int) -> np.ndarray:
    """The weight as [input channel, output channel] (``axis`` is its output-channel axis)."""
    return weight if axis == 1 else weight.T


def smoothing_factors(
    model, channel_amax: Mapping[str, np.ndarray], *, alpha: float
) -> dict[str, list[float]]:
    """Per activation (a quantizable MatMul input with a channel range): its factors ``s``.

    Args:
        model: the float graph.
        channel_amax: the largest magnitude of each last-axis channel, per activation tensor.
        alpha: migration strength in [0, 1]: 0 leaves activations as they are (s from the
            weights alone), 1 moves their whole range into the weights.

    Raises:
        InputError: alpha outside [0, 1], or a channel range of the wrong length.
    """
    from onnx import numpy_helper

    if not 0 <= alpha <= 1:
        raise InputError(f"--smooth-alpha {alpha}: must be in [0, 1]")
    initializers = {init.name: init for init in model.graph.initializer}
    weight_amax: dict[str, np.ndarray] = {}
    for target in quantizable_matmuls(model):
        if target.activation not in channel_amax:
            continue
        weight = numpy_helper.to_array(initializers[target.weight]).astype(np.float32)
        rows = np.abs(_input_rows(weight, target.weight_axis)).max(axis=1)
        seen = weight_amax.get(target.activation)
        weight_amax[target.activation] = rows if seen is None else np.maximum(seen, rows)
    factors = {}
    for activation, w_max in weight_amax.items():
        a_max = np.asarray(channel_amax[activation], dtype=np.float64)
        if a_max.shape != w_max.shape:
            raise InputError(
                f"smoothing: {activation!r} has {a_max.size} channel ranges, its weights "
                f"{w_max.size} input rows"
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.power(a_max, alpha) / np.power(w_max.astype(np.float64), 1 - alpha)
        s = np.where((a_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
        factors[activation] = np.clip(s, *_FACTOR_RANGE).astype(np.float32).tolist()
    return factors


def apply_smoothing(model, factors: Mapping[str, list[float]]):
    """Return a copy of ``model`` in which the quantizable MatMuls reading each activation in
    ``factors`` read ``activation / s`` (one Mul, ``smoothed_name``) and weights scaled by ``s``
    on their input rows. Equal to ``model`` in real arithmetic.

    Raises:
        InputError: an activation in ``factors`` that no quantizable MatMul reads.
    """
    import onnx
    from onnx import helper, numpy_helper

    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(model)
    graph = smoothed.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = defaultdict(list)
    for target in quantizable_matmuls(smoothed):
        readers[target.activation].append(target)
    missing = set(factors) - set(readers)
    if missing:
        raise InputError(f"smoothing: no quantizable MatMul reads {sorted(missing)}")
    nodes = {node.name: node for node in graph.node}
    producers = {out: node.name for node in graph.node for out in node.output}
    before: dict[str, list] = {}
    after: dict[str, list] = {}
    for activation, values in factors.items():
        s = np.asarray(values, dtype=np.float32)
        inverse = f"{activation}_smooth_inverse"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inverse))
        mul = helper.make_node(
            "Mul", [activation, inverse], [smoothed_name(activation)], name=f"{activation}_Smooth"
        )
        producer = producers.get(activation)
        if producer is None:  # a graph input: first in the graph
            before.setdefault(graph.node[0].name, []).append(mul)
        else:
            after.setdefault(producer, []).append(mul)
        for target in readers[activation]:
            weight = numpy_helper.to_array(initializers[target.weight]).astype(np.float32)
            shaped = s[:, None] if target.weight_axis == 1 else s[None, :]
            name = f"{target.weight}{SMOOTHED_SUFFIX}"
            if name not in initializers:
                initializers[name] = numpy_helper.from_array(weight * shaped, name)
                graph.initializer.append(initializers[name])
            node = nodes[target.node_name]
            node.input[0] = smoothed_name(activation)
            node.input[1] = name
    # The original weights no longer read by anything are dropped.
    splice_nodes(graph, before=before, after=after)
    return smoothed
