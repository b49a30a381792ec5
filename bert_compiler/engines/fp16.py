"""fp16 graphs for GPU engines, with the numerically fragile parts kept in float32.

What stays float32 and why:
- LayerNorm statistics: ``LayerNormalization`` keeps ``stash_type=1`` (mean and variance in
  float32, ONNX's default; TensorRT's parser and ORT's kernels honour it) and ORT's fused
  ``SkipLayerNormalization``/``EmbedLayerNormalization`` accumulate in float32 for fp16 inputs.
  A graph asking for fp16 statistics is refused rather than converted.
- Softmax: ORT's fused ``Attention`` and TensorRT's fused multi-head attention compute softmax in
  float32 internally; a standalone ``Softmax`` can be forced to float32 with ``keep_float_ops``.
- The head after the encoder (mean pooling over up to 512 tokens, L2 normalisation, a
  classifier): it sums many fp16 values and costs almost nothing, so it runs in float32.
- Graph inputs and outputs keep their types: callers feed int64 tokens and read float32.
"""

from __future__ import annotations

from collections.abc import Iterable

from bert_compiler.core.errors import InputError

_ENCODER_LAST_OPS = ("LayerNormalization", "SkipLayerNormalization")


def head_nodes(model) -> list[str]:
    """Names of the nodes downstream of the encoder's last layer norm (pooling, normalisation,
    classifier): the part of the graph that runs in float32."""
    graph = model.graph
    last = None
    for node in graph.node:  # ONNX requires topological order
        if node.op_type in _ENCODER_LAST_OPS:
            last = node
    if last is None:
        return []
    tainted = set(last.output)
    head = []
    after = False
    for node in graph.node:
        if node is last:
            after = True
            continue
        if after and tainted.intersection(node.input):
            tainted.update(node.output)
            head.append(node.name)
    return head


def _check_layer_norm_statistics(model) -> None:
    for node in model.graph.node:
        if node.op_type != "LayerNormalization":
            continue
        for attr in node.attribute:
            if attr.name == "stash_type" and attr.i != 1:
                raise InputError(
                    f"LayerNormalization {node.name!r} asks for stash_type={attr.i}: its "
                    "statistics would be computed in fp16; re-export with the default stash_type=1"
                )


def _name_unnamed_nodes(model) -> None:
    # The converter blocks nodes by name; unnamed nodes could not be kept in float32.
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"


def convert_to_fp16(model, *, keep_float_ops: Iterable[str] = ()):
    """Return an fp16 copy of ``model``: weights and activations fp16, the head and
    ``keep_float_ops`` float32, inputs and outputs unchanged.

    Raises:
        InputError: the graph is already fp16 or asks for fp16 layer-norm statistics.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never edit the caller's graph
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        raise InputError("graph already holds fp16 weights; expected the float32 graph")
    _check_layer_norm_statistics(model)
    _name_unnamed_nodes(model)
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        # Empty, not None: ORT's default block list is for its own CPU kernels, not ours.
        op_block_list=list(keep_float_ops),
        node_block_list=head_nodes(model),
    )
    _unique_node_names(converted)
    # The converter appends the Casts it adds in front of float32 consumers (the head) at the end
    # of the node list, after those consumers: ORT sorts for itself, but the graph fails
    # onnx.checker and misleads anything that reads nodes in order.
    OnnxModel.graph_topological_sort(converted.graph)
    return converted


def _unique_node_names(model) -> None:
    # onnxruntime-gpu 1.31's converter adds one Cast per float32 consumer of an fp16 tensor and
    # names node and output after the tensor, so two consumers give two identical Casts with the
    # same names, which ORT refuses to load. Keep the first of each.
    produced: set[str] = set()
    names: set[str] = set()
    kept = []
    for node in model.graph.node:
        if node.op_type == "Cast" and all(o in produced for o in node.output):
            continue
        produced.update(node.output)
        name, suffix = node.name, 1
        while node.name in names:
            node.name = f"{name}_{suffix}"
            suffix += 1
        names.add(node.name)
        kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)


def float16_fraction(model) -> float:
    """Share of the weight elements stored as fp16 (1.0 for a fully converted encoder)."""
    import onnx

    total = half = 0
    for tensor in model.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count
        if tensor.data_type == onnx.TensorProto.FLOAT16:
            half += count
    return half / total if total else 0.0
