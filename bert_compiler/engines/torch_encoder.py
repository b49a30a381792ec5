"""The torch backend: the fused graph's encoder run by PyTorch on packed rows.

Real sentences are short (STS-B: median 14 tokens). ONNX Runtime's and PyTorch's attention
kernels work in 64-128-row tiles, mostly empty for such rows, and a padded batch spends every
GEMM on its padding as well. This engine runs each batch packed (the rows' real tokens back to
back, no padding anywhere) and attention by a small Triton kernel that holds one row and head in
registers (``short_attention_kernel``); rows longer than SHORT_ATTENTION_MAX, and machines without
Triton, take PyTorch's scaled_dot_product_attention on the padded rows instead. Measured on an
H100 (docs/benchmarks.md, scripts/probe_gpu_encoder.py) this is where most of the GPU time of
short text went. Small batches on a GPU (one sentence per call) would spend their time launching
kernels, so they replay CUDA graphs captured per bucket of tokens and rows (``run_packed``).

Build: the fused fp32 graph (OUT/fuse) is read, not re-exported. Its layout (BERT's and
DistilBERT's EmbedLayerNormalization, or RoBERTa's standard-op embeddings numbered after the
padding index; then per layer Attention, MatMul, SkipLayerNormalization, MatMul, BiasGelu or
FastGelu, MatMul, SkipLayerNormalization) gives every weight; the head after the last layer must
be mean or first-token pooling, optionally L2-normalised, none, or a sequence-classification
head (first token, dense + tanh or relu, dense: classifiers and cross-encoders). Anything else
(MPNet's unfused attention, ELECTRA's projected embeddings, other heads) is refused in one line.
The engine file is those weights as safetensors (fp16 for a GPU fp16 engine); before the build
calls it complete, the weights as read are run against ONNX Runtime on the same graph, so a graph
read wrongly never becomes an engine. verify then checks the engine against PyTorch like every
other engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import (
    ArtifactError,
    EnvironmentProblem,
    InputError,
    UnsupportedModelError,
)
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.core.targets import Environment
from bert_compiler.engines.backend import (
    Backend,
    BuildJob,
    BuildSpec,
    TargetPlan,
    check_float_source,
    register,
)
from bert_compiler.engines.torch_module import (
    ACTIVATIONS,
    ENGINE_FILE,
    HEAD_ACTIVATIONS,
    EncoderLayout,
    LayoutError,
    TorchEncoder,
    read_layout,
)

log = logging.getLogger("bert_compile")

# The build compares the engine with ONNX Runtime on this many random rows of varied lengths.
CHECK_ROWS = 6
CHECK_LONGEST = 160
# The engine as built on its GPU (fp16 weights and math) against the same rows: a loose bound
# that only broken kernels exceed (verify then judges the engine at its real tolerances).
DEVICE_TOLERANCE = 5e-2
# Of the largest output magnitude, fp32 against fp32: read correctly, MiniLM and the tiny test
# models differ by under 1e-6; a LayerNorm epsilon read as 1e-5 instead of 1e-12 by 2e-4.
CHECK_TOLERANCE = 1e-4
# Ops a pooling head may use between the last layer and the output; anything else (a Gemm of a
# classifier) is a head this backend does not build.
POOLING_OPS = {
    "Cast", "Clip", "Constant", "Div", "Expand", "Gather", "Max", "Mul", "ReduceL2",
    "ReduceMean", "ReduceSum", "Reshape", "Shape", "Slice", "Sqrt", "Squeeze", "Unsqueeze",
    "Sub", "Add", "Pow", "Not", "Where", "Equal", "LpNormalization",
}  # fmt: skip


def _refuse(where: str, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{where}: {what}; the torch backend builds BERT-, DistilBERT- and RoBERTa-layout "
        "encoders (ORT-fused Attention) with a pooling or classifier head: build this model "
        "with --target cpu or cuda (ONNX Runtime)"
    )


def read_encoder(model: Any, where: str) -> tuple[EncoderLayout, dict[str, np.ndarray]]:
    """The layout and fp32 weights (linear weights as [out, in]) of a fused graph of a layout
    this backend runs (the module docstring lists them).

    Raises:
        UnsupportedModelError: another layout, or a head this backend does not run.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):  # a node reading a value twice consumes it once
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        if name not in weights:
            raise _refuse(where, f"{name!r} is computed, not a weight")
        return numpy_helper.to_array(weights[name]).astype(np.float32)

    def attrs(node) -> dict[str, Any]:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def only(value: str, op_types: tuple[str, ...], role: str):
        found = [n for n in consumers.get(value, []) if n.op_type in op_types]
        if len(found) != 1:
            raise _refuse(where, f"expected one {'/'.join(op_types)} ({role}) after {value!r}")
        return found[0]

    producers = {o: n for n in graph.node for o in n.output}
    embed = [n for n in graph.node if n.op_type == "EmbedLayerNormalization"]
    if len(embed) > 1:
        raise _refuse(where, f"{len(embed)} EmbedLayerNormalization nodes")
    if embed:
        tensors, epsilon, x, mask_index = _fused_embeddings(
            embed[0], producers, _constant_reader(graph), array, attrs, where
        )
        position_offset = 0
    else:
        tensors, epsilon, x, mask_index, position_offset = _standard_embeddings(
            graph, producers, array, attrs, where
        )
    epsilons = {epsilon}
    heads, activation, layer = set(), set(), 0
    while True:
        attention = [n for n in consumers.get(x, []) if n.op_type == "Attention"]
        if not attention:
            break
        if len(attention) != 1:
            raise _refuse(where, f"{len(attention)} Attention nodes read {x!r}")
        (attention,) = attention
        options = attrs(attention)
        extra = [name for name in list(attention.input)[4:] if name]
        if options.get("unidirectional") or options.get("qkv_hidden_sizes") or extra:
            raise _refuse(where, f"attention {attention.name!r} is not plain self-attention")
        if len(attention.input) < 4 or attention.input[3] != mask_index:
            raise _refuse(where, f"attention {attention.name!r} takes another mask")
        if options.get("scale"):
            raise _refuse(where, f"attention {attention.name!r} has its own scale")
        if int(options.get("num_heads", 0)) < 1:
            raise _refuse(where, f"attention {attention.name!r} has no head count")
        heads.add(int(options["num_heads"]))
        prefix = f"layers.{layer}."
        tensors[prefix + "qkv.weight"] = array(attention.input[1]).T
        tensors[prefix + "qkv.bias"] = array(attention.input[2])
        out = only(attention.output[0], ("MatMul",), "attention output projection")
        tensors[prefix + "out.weight"] = array(out.input[1]).T
        norm1 = only(out.output[0], ("SkipLayerNormalization",), "attention residual norm")
        up = only(norm1.output[0], ("MatMul",), "feed-forward up-projection")
        tensors[prefix + "up.weight"] = array(up.input[1]).T
        act = only(up.output[0], tuple(ACTIVATIONS), "activation")
        activation.add(ACTIVATIONS[act.op_type])
        if len(act.input) < 2 or not act.input[1]:
            raise _refuse(where, f"activation {act.name!r} has no bias")
        tensors[prefix + "up.bias"] = array(act.input[1])
        down = only(act.output[0], ("MatMul",), "feed-forward down-projection")
        tensors[prefix + "down.weight"] = array(down.input[1]).T
        norm2 = only(down.output[0], ("SkipLayerNormalization",), "feed-forward residual norm")
        residuals = ((norm1, x, "out", "norm1"), (norm2, norm1.output[0], "down", "norm2"))
        for norm, skip, bias, name in residuals:
            given = list(norm.input) + [""] * (5 - len(norm.input))
            if skip not in given[:2] or len(norm.input) < 4 or not given[4]:
                raise _refuse(where, f"{norm.name!r} is not a residual norm with a bias")
            if any(len(norm.output) > 3 and o for o in norm.output[3:]):
                raise _refuse(where, f"{norm.name!r} exports its sum")
            tensors[prefix + f"{name}.weight"] = array(given[2])
            tensors[prefix + f"{name}.bias"] = array(given[3])
            tensors[prefix + f"{bias}.bias"] = array(given[4])
            epsilons.add(float(attrs(norm).get("epsilon", 1e-12)))
        x, layer = norm2.output[0], layer + 1
    if not layer:
        raise _refuse(where, "no fused Attention after the embeddings")
    if len(heads) != 1 or len(activation) != 1 or len(epsilons) != 1:
        raise _refuse(where, "layers differ in heads, activation or LayerNorm epsilon")
    if len(graph.output) != 1:
        raise _refuse(where, f"{len(graph.output)} graph outputs, not 1")
    output = graph.output[0].name
    classifier = _classifier_head(graph, x, output, consumers, array, attrs)
    if classifier is None:
        pooling, normalize, dense = _head(graph, x, output, where, consumers, array, attrs)
    else:
        pooling, normalize, dense = "cls", False, classifier
    head = tuple(activation for activation, _, _ in dense)
    for index, (_activation, weight, bias) in enumerate(dense):
        tensors[f"head.{index}.weight"], tensors[f"head.{index}.bias"] = weight, bias
    hidden = tensors["embeddings.word"].shape[1]
    if hidden % heads.copy().pop():
        raise _refuse(where, f"hidden size {hidden} is not a multiple of the head count")
    layout = EncoderLayout(
        layers=layer,
        hidden=int(hidden),
        heads=heads.pop(),
        epsilon=epsilons.pop(),
        activation=activation.pop(),
        pooling=pooling,
        normalize=normalize,
        output=output,
        input_names=tuple(i.name for i in graph.input),
        token_types="embeddings.token_type" in tensors,
        head=head,
        position_offset=position_offset,
    )
    return layout, tensors


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


def _fused_embeddings(embed, producers, constant, array, attrs, where: str):
    """BERT's embeddings as ORT fuses them: (weights, epsilon, output, mask index).
    DistilBERT's explicit position ids are accepted when they are its buffer 0, 1, 2, ...
    sliced from 0 (what numbering from 0 means)."""
    inputs = list(embed.input) + [""] * (9 - len(embed.input))
    if inputs[8]:
        cast = producers.get(inputs[8])
        cut = producers.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
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
            raise _refuse(where, "the embeddings take position ids other than 0, 1, 2, ...")
    tensors = {
        "embeddings.word": array(inputs[2]),
        "embeddings.position": array(inputs[3]),
        "embeddings.norm.weight": array(inputs[5]),
        "embeddings.norm.bias": array(inputs[6]),
    }
    if inputs[4]:
        tensors["embeddings.token_type"] = array(inputs[4])
    mask_index = embed.output[1] if len(embed.output) > 1 else ""
    return tensors, float(attrs(embed).get("epsilon", 1e-12)), embed.output[0], mask_index


def _standard_embeddings(graph, producers, array, attrs, where: str):
    """RoBERTa's (and XLM-R's) embeddings, which ORT leaves as standard ops: a LayerNormalization
    of the sum of three table lookups (token ids; positions numbered from the padding index + 1
    by a CumSum over the non-padding tokens; the one token type), before the first Attention,
    whose mask is each row's count of tokens (ReduceSum of the attention mask). Returns
    (weights, epsilon, output, mask index, position offset)."""

    first = next((n for n in graph.node if n.op_type == "Attention"), None)
    norm = producers.get(first.input[0]) if first is not None else None
    if first is None or norm is None or norm.op_type != "LayerNormalization" or len(norm.input) < 3:
        raise _refuse(
            where, "no EmbedLayerNormalization, and no LayerNormalization before attention"
        )
    if attrs(norm).get("axis", -1) != -1:
        raise _refuse(where, f"{norm.name!r} normalizes another axis")
    tensors = {
        "embeddings.norm.weight": array(norm.input[1]),
        "embeddings.norm.bias": array(norm.input[2]),
    }
    initial = {i.name for i in graph.initializer}
    constant = _constant_reader(graph)
    graph_inputs = {i.name for i in graph.input}
    lookups, stack = [], [norm.input[0]]
    while stack:  # the Add tree down to its table lookups
        node = producers.get(stack.pop())
        if node is not None and node.op_type == "Add":
            stack.extend(node.input)
        elif node is not None and node.op_type == "Gather" and node.input[0] in initial:
            lookups.append(node)
        else:
            raise _refuse(where, "the embeddings are not a sum of table lookups")
    offset = None
    for lookup in lookups:
        table, indices = array(lookup.input[0]), lookup.input[1]
        by = producers.get(indices)
        if indices == "input_ids" and "embeddings.word" not in tensors:
            tensors["embeddings.word"] = table
        elif indices == "token_type_ids" and "embeddings.token_type" not in tensors:
            tensors["embeddings.token_type"] = table
        elif by is not None and by.op_type == "Add" and "embeddings.position" not in tensors:
            # positions = cumsum(ids != padding) * (ids != padding) + padding index
            padding = [constant(i) for i in by.input if constant(i) is not None]
            upstream = _ancestors(by, producers)
            if len(padding) != 1 or "CumSum" not in {n.op_type for n in upstream}:
                raise _refuse(where, "the position ids are not numbered from the padding index")
            value = padding[0]
            if value.size != 1:
                raise _refuse(where, "the position ids are not numbered from the padding index")
            offset = int(value.reshape(())) + 1
            tensors["embeddings.position"] = table
        elif indices not in graph_inputs and "embeddings.constant" not in tensors:
            # A token type without an input (RoBERTa's buffer of zeros): its first row; the
            # build's check against ONNX Runtime catches any other buffer.
            tensors["embeddings.constant"] = table[0]
        else:
            raise _refuse(where, f"the embedding lookup {lookup.name!r} is not one this reads")
    if "embeddings.word" not in tensors or offset is None:
        raise _refuse(where, "the embeddings lack token or position lookups")
    mask = producers.get(first.input[3]) if len(first.input) > 3 else None
    cast = (
        producers.get(mask.input[0]) if mask is not None and mask.op_type == "ReduceSum" else None
    )
    if cast is None or cast.op_type != "Cast" or cast.input[0] != "attention_mask":
        raise _refuse(where, "attention's mask is not each row's count of tokens")
    epsilon = float(attrs(norm).get("epsilon", 1e-5))
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


def _dense_chain(graph, value: str, stop: str, consumers, array, attrs):
    """The dense layers from ``value`` on: each a Gemm on its weight (an initializer), followed
    by Tanh, Relu or nothing, while the one node reading the value is such a Gemm (and never past
    ``stop``). Returns ([(activation, weight [out, in], bias)], the last value they write)."""
    initial = {i.name for i in graph.initializer}

    def single(name: str):
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 else None

    layers = []
    while value != stop:
        dense = single(value)
        if dense is None or dense.op_type != "Gemm" or len(dense.input) < 3:
            break
        options = attrs(dense)
        if options.get("alpha", 1.0) != 1.0 or options.get("beta", 1.0) != 1.0:
            break
        if options.get("transA", 0) or dense.input[1] not in initial:
            break
        weight = array(dense.input[1])
        weight = weight if options.get("transB", 0) else weight.T
        activation, value = "none", dense.output[0]
        after = single(value) if value != stop else None
        if after is not None and after.op_type in HEAD_ACTIVATIONS:
            activation, value = HEAD_ACTIVATIONS[after.op_type], after.output[0]
        layers.append((activation, weight, array(dense.input[2])))
    return layers, value


def _classifier_head(graph, last: str, output: str, consumers, array, attrs):
    """BERT's (RoBERTa's, DistilBERT's) sequence-classification head, when the graph ends in
    it: the first token (Gather index 0 on the sequence axis), then dense layers (Gemm), each
    followed by Tanh, Relu or nothing, the last one writing the output. Returns [(activation,
    weight [out, in], bias)], or None for any other tail (left to ``_head``)."""
    scalar = _constant_reader(graph)
    found = consumers.get(last, [])
    first = found[0] if len(found) == 1 else None
    index = scalar(first.input[1]) if first is not None and first.op_type == "Gather" else None
    if first is None or index is None or attrs(first).get("axis") != 1:
        return None
    if index.size != 1 or int(index) != 0:
        return None
    layers, end = _dense_chain(graph, first.output[0], output, consumers, array, attrs)
    return layers if layers and end == output else None


def _head(graph: Any, last: str, output: str, where: str, consumers, array, attrs):
    """(pooling, normalize, dense layers) of the nodes between the last layer's output and the
    graph's: sentence-transformers' Pooling, any Dense layers (Gemm, then Tanh, Relu or
    nothing), and Normalize."""
    if output == last:
        return "none", False, []
    produced_by = {o: n for n in graph.node for o in n.output}

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
    dense, end = _dense_chain(graph, pooled, output, consumers, array, attrs)
    pooling_ops = {n.op_type for n in between(pooled, last)}
    norm_ops = {n.op_type for n in between(output, end)} if end != output else set()
    ops = pooling_ops | norm_ops
    if (
        (gemms and len(dense) != len(gemms))
        or ops - POOLING_OPS
        or not any(last in n.input for n in between(pooled, last))
    ):
        ops |= {n.op_type for n in gemms}
        raise _refuse(
            where,
            f"the head after the last layer ({', '.join(sorted(ops))}) is not pooling, "
            "dense layers and normalization",
        )
    pooling = "mean" if pooling_ops & {"ReduceSum", "ReduceMean"} else "cls"
    normalize = bool(norm_ops & {"ReduceL2", "LpNormalization", "Sqrt"})
    if not dense:  # pooling and normalization are one subgraph
        normalize = bool(pooling_ops & {"ReduceL2", "LpNormalization", "Sqrt"})
    return pooling, normalize, dense


def _check_against_onnxruntime(
    source: Path, engine: TorchEncoder, where: str, built: TorchEncoder | None = None
) -> dict[str, float]:
    """The largest differences, relative to the largest output, between ONNX Runtime on the
    source graph and ``engine`` (the weights as read, padded and packed: ``onnxruntime``), and
    ``built`` (the engine as built, on its GPU: ``device``), on the same rows.

    Raises:
        UnsupportedModelError: the weights as read differ by more than CHECK_TOLERANCE.
        EnvironmentProblem: the built engine fails to run on its GPU, or differs by more than
            DEVICE_TOLERANCE (its kernels, not the reading, are wrong there).
    """
    import onnxruntime as ort
    import torch

    generator = np.random.default_rng(0)
    vocab = engine.weights["embeddings.word"].shape[0]
    offset = engine.layout.position_offset
    # Rows from 2 tokens to CHECK_LONGEST (or the position table's end): every position row a
    # real sentence reads, and rows past SHORT_ATTENTION_MAX.
    longest = min(CHECK_LONGEST, engine.weights["embeddings.position"].shape[0] - offset)
    lengths = np.linspace(2, longest, CHECK_ROWS).astype(np.int64)
    valid = np.arange(longest)[None, :] < lengths[:, None]
    # Token ids past the special ones (RoBERTa numbers positions around its padding id, 1).
    ids = np.where(valid, generator.integers(max(3, offset + 1), vocab, (CHECK_ROWS, longest)), 0)
    type_rows = engine.weights["embeddings.token_type"].shape[0] if engine.layout.token_types else 1
    types = np.where(valid, generator.integers(0, type_rows, ids.shape), 0)
    feeds = {
        "input_ids": ids,
        "attention_mask": valid.astype(np.int64),
        "token_type_ids": types,
    }
    feeds = {name: feeds[name] for name in engine.input_names}
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    (expected,) = session.run([engine.layout.output], feeds)
    padded = engine.run(feeds)[engine.layout.output]
    packed_rows = (
        torch.from_numpy(ids[valid]),
        torch.from_numpy(feeds.get("token_type_ids", types)[valid]),
        torch.from_numpy(lengths),
    )
    packed = engine.run_packed(*packed_rows, longest)[engine.layout.output].numpy()
    if expected.ndim == 3:  # token outputs: padded positions are not compared
        expected, padded, packed = expected[valid], padded[valid], packed[valid]
    scale = max(float(np.abs(expected).max()), 1e-6)
    worst = max(float(np.abs(got - expected).max()) for got in (padded, packed)) / scale
    if not worst <= CHECK_TOLERANCE:
        raise _refuse(where, f"the encoder read from it differs from ONNX Runtime by {worst:.2e}")
    differences = {"onnxruntime": worst}
    if built is None or built.device == "cpu":
        return differences
    # The engine as built, on its GPU (the Triton kernel compiles here): a GPU or Triton that
    # cannot run it fails at build, in one line, rather than in the middle of a verify.
    try:
        ids_on, types_on, lengths_on = (t.to(built.device) for t in packed_rows)
        on_device = built.run_packed(ids_on, types_on, lengths_on, longest)
        got = on_device[engine.layout.output].cpu().numpy()
    except Exception as err:  # noqa: BLE001 - Triton's compiler raises many kinds of error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EnvironmentProblem(
            f"{where}: the torch engine failed to run on this GPU ({first[:200]}); build it "
            "with --target cuda (ONNX Runtime) instead"
        ) from err
    got = got[valid] if got.ndim == 3 else got
    differences["device"] = float(np.abs(got - expected).max()) / scale
    if not differences["device"] <= DEVICE_TOLERANCE:
        raise EnvironmentProblem(
            f"{where}: the torch engine differs on this GPU by {differences['device']:.2e} of "
            "the output (fp32 on the CPU agrees); build it with --target cuda (ONNX Runtime)"
        )
    return differences


class TorchBackend(Backend):
    """PyTorch on packed rows (engines/torch_encoder.py): fp32 on the CPU or a GPU, fp16 on a
    GPU, from the fused fp32 graph."""

    name = "torch"
    tag = "pt"
    file_suffix = ".safetensors"
    triton_platform = ""  # no Triton backend runs it: a Python-backend text model does
    version_key = "torch"
    serves_as_python_text = True
    label = "torch"
    targets = ("torch",)

    def version(self) -> str:
        import torch

        return torch.__version__.split("+")[0]

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        """One engine for every GPU here (its file is the weights: it runs on any GPU), fp16 by
        default; the CPU engine, fp32, where torch sees no GPU."""
        refused = sorted(set(precisions) - {"fp32", "fp16"})
        if refused:
            raise InputError(
                f"--target {target} --precision {','.join(refused)}: the torch backend builds "
                "fp32 and fp16 engines; int8 and fp8 are ONNX Runtime's and TensorRT's"
            )
        notes: tuple[str, ...]
        if env.gpus and env.torch_cuda:
            device, chosen, notes = "cuda", precisions or ("fp16",), ()
        else:
            why = "no NVIDIA GPU found" if not env.gpus else "torch here is a CPU build"
            if "fp16" in precisions:
                raise EnvironmentProblem(
                    f"--target {target} --precision fp16: {why}; fp16 needs a GPU"
                )
            device, chosen, notes = "cpu", ("fp32",), (f"{why}: building the torch CPU engine",)
        engines = tuple(
            {"backend": self.name, "device": device, "precision": p, "compute_capability": ""}
            for p in chosen
        )
        return TargetPlan(engines, notes)

    def check(self, spec: BuildSpec) -> None:
        if spec.precision not in ("fp32", "fp16"):
            raise InputError(
                f"--precision {spec.precision}: the torch backend builds fp32 and fp16 engines; "
                "int8 and fp8 are ONNX Runtime's and TensorRT's"
            )

    def source_stage(self, spec: BuildSpec) -> str:
        return "fuse"

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        return [spec.device]

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        return [spec.device]

    def portable(self, spec: Mapping[str, Any]) -> bool:
        return True

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        return BuildSpec(backend=self.name, device=spec["device"], precision=spec["precision"])

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        read: dict[str, Any] = {}

        def prepare() -> None:
            graph = load_onnx(source)
            check_float_source(graph, precision=spec.precision, where=str(source))
            read["layout"], read["tensors"] = read_encoder(graph, str(source))

        def body(folder: Path) -> tuple[list[str], dict[str, Any]]:
            import torch
            from safetensors.torch import save_file

            if spec.device == "cuda" and not torch.cuda.is_available():
                raise EnvironmentProblem(
                    f"torch {torch.__version__} sees no CUDA GPU; a cuda torch engine is built "
                    "where torch's CUDA build runs"
                )
            layout: EncoderLayout = read["layout"]
            dtype = torch.float16 if spec.precision == "fp16" else torch.float32
            tensors = {
                n: torch.from_numpy(a).to(dtype).contiguous() for n, a in read["tensors"].items()
            }
            metadata = {"layout": json.dumps(layout.to_dict(), sort_keys=True)}
            with atomic_path(folder / ENGINE_FILE) as staging:
                save_file(tensors, str(staging), metadata=metadata)
            # The weights as read (fp32, before an fp16 engine rounds them), on the CPU, against
            # ONNX Runtime on the same graph: the reader is checked, verify judges the rounding.
            read_weights = {n: torch.from_numpy(a) for n, a in read["tensors"].items()}
            check = TorchEncoder(source, layout, "cpu", "fp32", tensors=read_weights)
            engine = TorchEncoder(folder / ENGINE_FILE, layout, spec.device, spec.precision)
            differences = _check_against_onnxruntime(source, check, str(source), built=engine)
            return [ENGINE_FILE], {
                "engine_file": ENGINE_FILE,
                "torch": self.version(),
                "layout": layout.to_dict(),
                "inputs": engine.input_names,
                "outputs": engine.output_names,
                "onnxruntime_check": float(f"{differences['onnxruntime']:.3g}"),
                **(
                    {"device_check": float(f"{differences['device']:.3g}")}
                    if "device" in differences
                    else {}
                ),
                "short_attention": engine.short_attention,
            }

        return BuildJob(settings={"engine": "packed rows"}, prepare=prepare, body=body)

    def load(self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]):
        import torch

        if spec["device"] == "cuda" and not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"{engine_path}: a cuda engine, and torch {torch.__version__} sees no CUDA GPU"
            )
        # The layout inside the engine file, whose sha256 the caller checked (the manifest's
        # results are a copy for readers).
        try:
            layout = read_layout(engine_path)
            return TorchEncoder(engine_path, layout, spec["device"], spec["precision"])
        except LayoutError as err:
            raise ArtifactError(str(err)) from None


BACKEND = register(TorchBackend())
