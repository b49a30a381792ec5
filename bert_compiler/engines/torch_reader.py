"""The torch backend's graph reader: the layout and weights of the fused fp32 graph (OUT/fuse),
read rather than re-exported.

Its layout (BERT's and DistilBERT's EmbedLayerNormalization, or RoBERTa's standard-op embeddings
numbered after the padding index; then per layer Attention, MatMul, SkipLayerNormalization,
MatMul, BiasGelu or FastGelu, MatMul, SkipLayerNormalization) gives every weight; the head after
the last layer must be mean or first-token pooling, optionally L2-normalised, none, or a
sequence-classification head (first token, dense + tanh or relu, dense: classifiers and
cross-encoders). Anything else (MPNet's unfused attention, ELECTRA's projected embeddings, other
heads) is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bert_compiler.core.errors import UnsupportedModelError
from bert_compiler.engines.torch_layout import ACTIVATIONS, HEAD_ACTIVATIONS, EncoderLayout

# Ops a pooling head may use between the last layer and the output; anything else (a Gemm of a
# classifier) is a head this backend does not build.
POOLING_OPS = {
    "Cast", "Clip", "Constant", "Div", "Expand", "Gather", "Max", "Mul", "ReduceL2",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Slice", "Sqrt", "Squeeze", "Unsqueeze",
    "Sub", "Add", "Pow", "Not", "Where", "Equal", "LpNormalization",
}  # fmt: skip


def unsupported(where: str, what: str) -> UnsupportedModelError:
    """The one-line refusal of a graph this backend does not build: ``what`` is wrong with it."""
    return UnsupportedModelError(
        f"{where}: {what}; the torch backend builds BERT-, DistilBERT- and RoBERTa-layout "
        "encoders (ORT-fused Attention) with a pooling or classifier head: build this model "
        "with --target cpu or cuda (ONNX Runtime)"
    )


class _GraphIndex:
    """A graph indexed for reading: its weights, the nodes that read each value and the node
    that writes it; ``where`` names the graph in refusals."""

    def __init__(self, graph: Any, where: str) -> None:
        self.graph = graph
        self.where = where
        self.weights = {init.name: init for init in graph.initializer}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):  # a node reading a value twice consumes it once
                self.consumers.setdefault(name, []).append(node)
        self.producers = {o: n for n in graph.node for o in n.output}

    def array(self, name: str) -> np.ndarray:
        """A weight's values, fp32.

        Raises:
            UnsupportedModelError: ``name`` is computed, not a weight.
        """
        from onnx import numpy_helper

        if name not in self.weights:
            raise unsupported(self.where, f"{name!r} is computed, not a weight")
        return numpy_helper.to_array(self.weights[name]).astype(np.float32)

    def attrs(self, node: Any) -> dict[str, Any]:
        """A node's attributes: name -> value."""
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def only(self, value: str, op_types: tuple[str, ...], role: str) -> Any:
        """The one node of ``op_types`` that reads ``value`` (as ``role``).

        Raises:
            UnsupportedModelError: none does, or several do.
        """
        found = [n for n in self.consumers.get(value, []) if n.op_type in op_types]
        if len(found) != 1:
            raise unsupported(
                self.where, f"expected one {'/'.join(op_types)} ({role}) after {value!r}"
            )
        return found[0]


@dataclass
class _Layers:
    """The encoder layers read so far: how many, the value the last one writes, and the head
    counts, activations and LayerNorm epsilons (the embeddings' included) they use, which a
    layout this backend runs holds one of each."""

    last: str
    count: int = 0
    heads: set[int] = field(default_factory=set)
    activations: set[str] = field(default_factory=set)
    epsilons: set[float] = field(default_factory=set)


def read_encoder(model: Any, where: str) -> tuple[EncoderLayout, dict[str, np.ndarray]]:
    """The layout and fp32 weights (linear weights as [out, in]) of a fused graph of a layout
    this backend runs (the module docstring lists them).

    Raises:
        UnsupportedModelError: another layout, or a head this backend does not run.
    """
    graph = model.graph
    index = _GraphIndex(graph, where)
    tensors, epsilon, embedded, mask_index, position_offset = _read_embeddings(index)
    layers = _read_layers(index, embedded, mask_index, epsilon, tensors)
    if not layers.count:
        raise unsupported(where, "no fused Attention after the embeddings")
    if len(layers.heads) != 1 or len(layers.activations) != 1 or len(layers.epsilons) != 1:
        raise unsupported(where, "layers differ in heads, activation or LayerNorm epsilon")
    if len(graph.output) != 1:
        raise unsupported(where, f"{len(graph.output)} graph outputs, not 1")
    output = graph.output[0].name
    pooling, normalize, head = _read_head(index, layers.last, output, tensors)
    hidden = tensors["embeddings.word"].shape[1]
    ((heads,), (activation,), (layer_norm_epsilon,)) = (
        layers.heads,
        layers.activations,
        layers.epsilons,
    )
    if hidden % heads:
        raise unsupported(where, f"hidden size {hidden} is not a multiple of the head count")
    layout = EncoderLayout(
        layers=layers.count,
        hidden=int(hidden),
        heads=heads,
        epsilon=layer_norm_epsilon,
        activation=activation,
        pooling=pooling,
        normalize=normalize,
        output=output,
        input_names=tuple(i.name for i in graph.input),
        token_types="embeddings.token_type" in tensors,
        head=head,
        position_offset=position_offset,
    )
    return layout, tensors


def _read_embeddings(index: _GraphIndex) -> tuple[dict[str, np.ndarray], float, str, str, int]:
    """The embeddings, ORT-fused (BERT's, DistilBERT's) or standard ops (RoBERTa's): (weights,
    LayerNorm epsilon, output, mask index, position offset)."""
    embed = [n for n in index.graph.node if n.op_type == "EmbedLayerNormalization"]
    if len(embed) > 1:
        raise unsupported(index.where, f"{len(embed)} EmbedLayerNormalization nodes")
    if embed:
        tensors, epsilon, output, mask_index = _fused_embeddings(index, embed[0])
        return tensors, epsilon, output, mask_index, 0
    return _standard_embeddings(index)


def _read_layers(
    index: _GraphIndex,
    embedded: str,
    mask_index: str,
    epsilon: float,
    tensors: dict[str, np.ndarray],
) -> _Layers:
    """The encoder layers after the embeddings' output ``embedded`` (whose LayerNorm has
    ``epsilon``): one per fused Attention, its weights put in ``tensors``."""
    layers = _Layers(last=embedded, epsilons={epsilon})
    while True:
        attention = [n for n in index.consumers.get(layers.last, []) if n.op_type == "Attention"]
        if not attention:
            return layers
        if len(attention) != 1:
            raise unsupported(index.where, f"{len(attention)} Attention nodes read {layers.last!r}")
        _read_layer(index, attention[0], mask_index, tensors, layers)


def _read_layer(
    index: _GraphIndex,
    attention: Any,
    mask_index: str,
    tensors: dict[str, np.ndarray],
    layers: _Layers,
) -> None:
    """One encoder layer, from its fused ``attention`` to its second residual norm: its weights
    put in ``tensors`` under layers.N., what it uses added to ``layers``, which it ends."""
    where, x = index.where, layers.last
    options = index.attrs(attention)
    extra = [name for name in list(attention.input)[4:] if name]
    if options.get("unidirectional") or options.get("qkv_hidden_sizes") or extra:
        raise unsupported(where, f"attention {attention.name!r} is not plain self-attention")
    if len(attention.input) < 4 or attention.input[3] != mask_index:
        raise unsupported(where, f"attention {attention.name!r} takes another mask")
    if options.get("scale"):
        raise unsupported(where, f"attention {attention.name!r} has its own scale")
    if int(options.get("num_heads", 0)) < 1:
        raise unsupported(where, f"attention {attention.name!r} has no head count")
    layers.heads.add(int(options["num_heads"]))
    prefix = f"layers.{layers.count}."
    tensors[prefix + "qkv.weight"] = index.array(attention.input[1]).T
    tensors[prefix + "qkv.bias"] = index.array(attention.input[2])
    out = index.only(attention.output[0], ("MatMul",), "attention output projection")
    tensors[prefix + "out.weight"] = index.array(out.input[1]).T
    norm1 = index.only(out.output[0], ("SkipLayerNormalization",), "attention residual norm")
    up = index.only(norm1.output[0], ("MatMul",), "feed-forward up-projection")
    tensors[prefix + "up.weight"] = index.array(up.input[1]).T
    act = index.only(up.output[0], tuple(ACTIVATIONS), "activation")
    layers.activations.add(ACTIVATIONS[act.op_type])
    if len(act.input) < 2 or not act.input[1]:
        raise unsupported(where, f"activation {act.name!r} has no bias")
    tensors[prefix + "up.bias"] = index.array(act.input[1])
    down = index.only(act.output[0], ("MatMul",), "feed-forward down-projection")
    tensors[prefix + "down.weight"] = index.array(down.input[1]).T
    norm2 = index.only(down.output[0], ("SkipLayerNormalization",), "feed-forward residual norm")
    residuals = ((norm1, x, "out", "norm1"), (norm2, norm1.output[0], "down", "norm2"))
    for norm, skip, bias, name in residuals:
        given = list(norm.input) + [""] * (5 - len(norm.input))
        if skip not in given[:2] or len(norm.input) < 4 or not given[4]:
            raise unsupported(where, f"{norm.name!r} is not a residual norm with a bias")
        if any(len(norm.output) > 3 and o for o in norm.output[3:]):
            raise unsupported(where, f"{norm.name!r} exports its sum")
        tensors[prefix + f"{name}.weight"] = index.array(given[2])
        tensors[prefix + f"{name}.bias"] = index.array(given[3])
        tensors[prefix + f"{bias}.bias"] = index.array(given[4])
        layers.epsilons.add(float(index.attrs(norm).get("epsilon", 1e-12)))
    layers.last, layers.count = norm2.output[0], layers.count + 1


def _read_head(
    index: _GraphIndex, last: str, output: str, tensors: dict[str, np.ndarray]
) -> tuple[str, bool, tuple[str, ...]]:
    """The head from the last layer's output ``last`` to the graph's: a classifier, or pooling,
    dense layers and normalization; the dense layers' weights put in ``tensors`` under head.N.
    Returns (pooling, normalize, the dense layers' activations)."""
    classifier = _classifier_head(index, last, output)
    if classifier is None:
        pooling, normalize, dense = _head(index, last, output)
    else:
        pooling, normalize, dense = "cls", False, classifier
    head = tuple(activation for activation, _, _ in dense)
    for number, (_activation, weight, bias) in enumerate(dense):
        tensors[f"head.{number}.weight"], tensors[f"head.{number}.bias"] = weight, bias
    return pooling, normalize, head


def _constant_reader(graph):
    """A function: value name -> its array if an initializer or a Constant node holds it, else
    None."""
    from onnx import numpy_helper

    held = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def read(name: str):
        if name in held:
            return numpy_helper.to_array(held[name])
        if name in constants and constants[name].attribute:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    return read


def _fused_embeddings(index: _GraphIndex, embed: Any):
    """BERT's embeddings as ORT fuses them: (weights, epsilon, output, mask index).
    DistilBERT's explicit position ids are accepted when they are its buffer 0, 1, 2, ...
    sliced from 0 (what numbering from 0 means)."""
    constant = _constant_reader(index.graph)
    inputs = list(embed.input) + [""] * (9 - len(embed.input))
    if inputs[8]:
        cast = index.producers.get(inputs[8])
        cut = (
            index.producers.get(cast.input[0])
            if cast is not None and cast.op_type == "Cast"
            else None
        )
        sliced = cut if cut is not None and cut.op_type == "Slice" else None
        table = constant(sliced.input[0]) if sliced is not None else None
        starts = (
            constant(sliced.input[1])
            if sliced is not None and table is not None and len(sliced.input) > 1
            else None
        )
        steps = (
            constant(sliced.input[4])
            if sliced is not None and starts is not None and len(sliced.input) > 4
            else 1
        )
        numbered = table is not None and np.array_equal(table.reshape(-1), np.arange(table.size))
        if not numbered or starts is None or np.any(starts != 0) or np.any(steps != 1):
            raise unsupported(
                index.where, "the embeddings take position ids other than 0, 1, 2, ..."
            )
    tensors = {
        "embeddings.word": index.array(inputs[2]),
        "embeddings.position": index.array(inputs[3]),
        "embeddings.norm.weight": index.array(inputs[5]),
        "embeddings.norm.bias": index.array(inputs[6]),
    }
    if inputs[4]:
        tensors["embeddings.token_type"] = index.array(inputs[4])
    mask_index = embed.output[1] if len(embed.output) > 1 else ""
    return tensors, float(index.attrs(embed).get("epsilon", 1e-12)), embed.output[0], mask_index


def _standard_embeddings(index: _GraphIndex):
    """RoBERTa's (and XLM-R's) embeddings, which ORT leaves as standard ops: a LayerNormalization
    of the sum of three table lookups (token ids; positions numbered from the padding index + 1
    by a CumSum over the non-padding tokens; the one token type), before the first Attention,
    whose mask is each row's count of tokens (ReduceSum of the attention mask). Returns
    (weights, epsilon, output, mask index, position offset)."""

    graph = index.graph
    first = next((n for n in graph.node if n.op_type == "Attention"), None)
    norm = index.producers.get(first.input[0]) if first is not None else None
    if first is None or norm is None or norm.op_type != "LayerNormalization" or len(norm.input) < 3:
        raise unsupported(
            index.where, "no EmbedLayerNormalization, and no LayerNormalization before attention"
        )
    if index.attrs(norm).get("axis", -1) != -1:
        raise unsupported(index.where, f"{norm.name!r} normalizes another axis")
    tensors = {
        "embeddings.norm.weight": index.array(norm.input[1]),
        "embeddings.norm.bias": index.array(norm.input[2]),
    }
    initial = {i.name for i in graph.initializer}
    constant = _constant_reader(graph)
    graph_inputs = {i.name for i in graph.input}
    lookups, stack = [], [norm.input[0]]
    while stack:  # the Add tree down to its table lookups
        node = index.producers.get(stack.pop())
        if node is not None and node.op_type == "Add":
            stack.extend(node.input)
        elif node is not None and node.op_type == "Gather" and node.input[0] in initial:
            lookups.append(node)
        else:
            raise unsupported(index.where, "the embeddings are not a sum of table lookups")
    offset = None
    for lookup in lookups:
        table, indices = index.array(lookup.input[0]), lookup.input[1]
        by = index.producers.get(indices)
        if indices == "input_ids" and "embeddings.word" not in tensors:
            tensors["embeddings.word"] = table
        elif indices == "token_type_ids" and "embeddings.token_type" not in tensors:
            tensors["embeddings.token_type"] = table
        elif by is not None and by.op_type == "Add" and "embeddings.position" not in tensors:
            # positions = cumsum(ids != padding) * (ids != padding) + padding index
            padding = [constant(i) for i in by.input if constant(i) is not None]
            upstream = _ancestors(by, index.producers)
            if len(padding) != 1 or "CumSum" not in {n.op_type for n in upstream}:
                raise unsupported(
                    index.where, "the position ids are not numbered from the padding index"
                )
            value = padding[0]
            if value.size != 1:
                raise unsupported(
                    index.where, "the position ids are not numbered from the padding index"
                )
            offset = int(value.reshape(())) + 1
            tensors["embeddings.position"] = table
        elif indices not in graph_inputs and "embeddings.constant" not in tensors:
            # A token type without an input (RoBERTa's buffer of zeros): its first row; the
            # build's check against ONNX Runtime catches any other buffer.
            tensors["embeddings.constant"] = table[0]
        else:
            raise unsupported(
                index.where, f"the embedding lookup {lookup.name!r} is not one this reads"
            )
    if "embeddings.word" not in tensors or offset is None:
        raise unsupported(index.where, "the embeddings lack token or position lookups")
    mask = index.producers.get(first.input[3]) if len(first.input) > 3 else None
    cast = (
        index.producers.get(mask.input[0])
        if mask is not None and mask.op_type == "ReduceSum"
        else None
    )
    if cast is None or cast.op_type != "Cast" or cast.input[0] != "attention_mask":
        raise unsupported(index.where, "attention's mask is not each row's count of tokens")
    epsilon = float(index.attrs(norm).get("epsilon", 1e-5))
    return tensors, epsilon, norm.output[0], first.input[3], offset


def _ancestors(node, producers) -> list:
    """Every node ``node`` depends on (itself included)."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        stack.extend(producers[i] for i in current.input if i in producers)
    return found


def _dense_chain(index: _GraphIndex, value: str, stop: str):
    """The dense layers from ``value`` on: each a Gemm on its weight (an initializer), followed
    by Tanh, Relu or nothing, while the one node reading the value is such a Gemm (and never past
    ``stop``). Returns ([(activation, weight [out, in], bias)], the last value they write)."""
    initial = {i.name for i in index.graph.initializer}

    def single(name: str):
        found = index.consumers.get(name, [])
        return found[0] if len(found) == 1 else None

    layers = []
    while value != stop:
        dense = single(value)
        if dense is None or dense.op_type != "Gemm" or len(dense.input) < 3:
            break
        options = index.attrs(dense)
        if options.get("alpha", 1.0) != 1.0 or options.get("beta", 1.0) != 1.0:
            break
        if options.get("transA", 0) or dense.input[1] not in initial:
            break
        weight = index.array(dense.input[1])
        weight = weight if options.get("transB", 0) else weight.T
        activation, value = "none", dense.output[0]
        after = single(value) if value != stop else None
        if after is not None and after.op_type in HEAD_ACTIVATIONS:
            activation, value = HEAD_ACTIVATIONS[after.op_type], after.output[0]
        layers.append((activation, weight, index.array(dense.input[2])))
    return layers, value


def _classifier_head(index: _GraphIndex, last: str, output: str):
    """BERT's (RoBERTa's, DistilBERT's) sequence-classification head, when the graph ends in
    it: the first token (Gather index 0 on the sequence axis), then dense layers (Gemm), each
    followed by Tanh, Relu or nothing, the last one writing the output. Returns [(activation,
    weight [out, in], bias)], or None for any other tail (left to ``_head``)."""
    scalar = _constant_reader(index.graph)
    found = index.consumers.get(last, [])
    first = found[0] if len(found) == 1 else None
    token = scalar(first.input[1]) if first is not None and first.op_type == "Gather" else None
    if first is None or token is None or index.attrs(first).get("axis") != 1:
        return None
    if token.size != 1 or int(token) != 0:
        return None
    layers, end = _dense_chain(index, first.output[0], output)
    return layers if layers and end == output else None


def _head(index: _GraphIndex, last: str, output: str):
    """(pooling, normalize, dense layers) of the nodes between the last layer's output and the
    graph's: sentence-transformers' Pooling, any Dense layers (Gemm, then Tanh, Relu or
    nothing), and Normalize."""
    if output == last:
        return "none", False, []
    produced_by = index.producers

    def between(end: str, start: str) -> list:
        """Every node ``end`` depends on, back to ``start``."""
        found, stack, seen = [], [end], set()
        while stack:
            name = stack.pop()
            if name in seen or name == start or name not in produced_by:
                continue
            seen.add(name)
            found.append(produced_by[name])
            stack.extend(i for i in produced_by[name].input if i)
        return found

    gemms = [n for n in between(output, last) if n.op_type == "Gemm"]
    pooled = output
    for gemm in gemms:  # the Dense layers start where pooling ends: at the first Gemm
        if not any(n.op_type == "Gemm" for n in between(gemm.input[0], last)):
            pooled = gemm.input[0]
    dense, end = _dense_chain(index, pooled, output)
    pooling_ops = {n.op_type for n in between(pooled, last)}
    norm_ops = {n.op_type for n in between(output, end)} if end != output else set()
    ops = pooling_ops | norm_ops
    if (
        (gemms and len(dense) != len(gemms))
        or ops - POOLING_OPS
        or not any(last in n.input for n in between(pooled, last))
    ):
        ops |= {n.op_type for n in gemms}
        raise unsupported(
            index.where,
            f"the head after the last layer ({', '.join(sorted(ops))}) is not pooling, "
            "dense layers and normalization",
        )
    pooling = "mean" if pooling_ops & {"ReduceSum", "ReduceMean"} else "cls"
    normalize = bool(norm_ops & {"ReduceL2", "LpNormalization", "Sqrt"})
    if not dense:  # pooling and normalization are one subgraph
        normalize = bool(pooling_ops & {"ReduceL2", "LpNormalization", "Sqrt"})
    return pooling, normalize, dense
