"""ONNX Runtime's packing mode for the fused graph: the encoder runs on the valid tokens only.

ORT's ``convert_to_packing_mode`` (onnxruntime.transformers) rewrites a graph of fused
``Attention`` nodes. One ``RemovePadding`` after the embeddings gathers the valid tokens of the
padded [batch, sequence, hidden] tensor into [tokens, hidden], from each row's token count (the
mask input every ``Attention`` already reads); each ``Attention`` becomes ``PackedAttention``,
which reads the token offsets and cumulative sequence lengths ``RemovePadding`` computes; one
``RestorePadding`` after the encoder's last LayerNorm scatters the tokens back. So every per-token
operation between them (projections, feed-forward, LayerNorms) skips the padding, and the graph's
inputs and outputs stay the same padded tensors: callers feed it as before.

The converter logs and returns the graph unchanged where its pattern does not fit (no mask, masks
that differ between layers, no LayerNorm); this pass checks what it needs first and what it
promises afterwards, and fails in one line instead.

The three operators have CUDA kernels only. ``RemovePadding``'s output has as many rows as the
batch has valid tokens, which only the GPU knows: ORT copies that count to the host in the middle
of every run, so no CUDA graph can capture one.
"""

from __future__ import annotations

from collections import Counter

from bert_compiler.core.errors import InputError

# What produces a per-row token count [batch] (int32) in ORT's fused BERT graphs: the mask index
# output of EmbedLayerNormalization, or a ReduceSum of the cast mask where the embeddings stay
# standard ops (RoBERTa). RemovePadding reads it as the padded Attention does, as the count of
# leading valid tokens: rows padded on the right, as this tool's tokenization pads them.
_TOKEN_COUNT_PRODUCERS = {"EmbedLayerNormalization": 1, "ReduceSum": 0}
PACKED_OPS = ("RemovePadding", "PackedAttention", "RestorePadding")


def require_packable(model, *, where: str) -> str:
    """The one mask tensor every Attention of ``model`` reads, checked to be a per-row token
    count.

    Raises:
        InputError: no fused Attention, or Attention nodes that do not read one token count.
    """
    attentions = [node for node in model.graph.node if node.op_type == "Attention"]
    if not attentions:
        raise InputError(
            f"{where}: --packed-attention rewrites fused Attention nodes and this graph has none "
            "(its architecture's attention is not fused); build it without --packed-attention"
        )
    masks = {node.input[3] if len(node.input) > 3 else "" for node in attentions}
    producers = {output: node for node in model.graph.node for output in node.output}
    (mask,) = masks if len(masks) == 1 else ("",)
    producer = producers.get(mask)
    if (
        producer is None
        or producer.op_type not in _TOKEN_COUNT_PRODUCERS
        or list(producer.output).index(mask) != _TOKEN_COUNT_PRODUCERS[producer.op_type]
    ):
        raise InputError(
            f"{where}: --packed-attention needs every Attention to read one per-row token count "
            f"as its mask, and this graph's Attention nodes read {sorted(masks)}; build it "
            "without --packed-attention"
        )
    return mask


def pack_attention(model, *, where: str):
    """Return a copy of the fused graph ``model`` in ORT's packing mode.

    Args:
        where: the graph's file, for error messages.

    Returns:
        The rewritten copy: one RemovePadding, a PackedAttention per Attention, one
        RestorePadding; graph inputs and outputs (names, types, shapes) unchanged.

    Raises:
        InputError: the graph has no fused Attention, its Attention nodes do not read one token
            count, or ORT's converter left the graph short of packing mode.
    """
    import onnx
    from onnxruntime.transformers.convert_to_packing_mode import PackingMode
    from onnxruntime.transformers.onnx_model import OnnxModel

    copy = onnx.ModelProto.FromString(model.SerializeToString())  # never edit the caller's graph
    require_packable(copy, where=where)
    attentions = sum(node.op_type == "Attention" for node in copy.graph.node)
    wrapped = OnnxModel(copy)
    # No symbolic shape inference: ORT infers shapes itself when it loads the graph; the
    # converter's pass would only add value_info.
    PackingMode(wrapped).convert(use_symbolic_shape_infer=False)
    # The converter appends its nodes at the end; ONNX wants them in topological order.
    wrapped.topological_sort()
    packed = wrapped.model
    counts = Counter(node.op_type for node in packed.graph.node)
    expected = {
        "Attention": 0,
        "RemovePadding": 1,
        "PackedAttention": attentions,
        "RestorePadding": 1,
    }
    if any(counts.get(op, 0) != want for op, want in expected.items()):
        reached = {op: counts.get(op, 0) for op in expected}
        raise InputError(
            f"{where}: ORT's packing-mode converter reached {reached}, not {expected}; build it "
            "without --packed-attention"
        )
    for kind in ("input", "output"):
        before, after = getattr(model.graph, kind), getattr(packed.graph, kind)
        if [v.SerializeToString() for v in before] != [v.SerializeToString() for v in after]:
            raise InputError(
                f"{where}: ORT's packing-mode converter changed the graph's {kind}s; build it "
                "without --packed-attention"
            )
    return packed
