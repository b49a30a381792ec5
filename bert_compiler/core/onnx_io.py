"""Loading and saving ONNX graphs without trusting them.

onnx has had several path-traversal CVEs in external-data handling, so containment is checked here,
before onnx opens any external file: a location must be relative, free of ``..``, not a symlink, and
resolve inside the model's folder.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

from bert_compiler.core.artifacts import atomic_path, sha256_file
from bert_compiler.core.errors import InputError

# Standard ops plus the contrib domain ORT's fusions emit; anything else (custom domains, plugin
# ops, EPContext nodes pointing at engine blobs) is rejected by the stage that reads the graph.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
FORBIDDEN_OPS = frozenset({"EPContext", "If", "Loop", "Scan"})
_MAX_PROTO_BYTES = 2**31 - 1


def _external_locations(model) -> list[str]:
    from onnx import TensorProto

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    locations = []
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            locations.append(entries.get("location", ""))
    return locations


def check_external_data(model, path: Path) -> None:
    """Refuse external-data locations that could leave the model's folder.

    Raises:
        InputError: a location is absolute, contains ``..``, is a symlink, or is missing.
    """
    folder = path.parent.resolve()
    for location in _external_locations(model):
        pure = PurePosixPath(location.replace("\\", "/"))
        if not location or pure.is_absolute() or ".." in pure.parts or ":" in location:
            raise InputError(
                f"{path}: external data location {location!r} is outside the model's folder; "
                "refused"
            )
        target = folder / Path(*pure.parts)
        if target.is_symlink() or not target.resolve().is_relative_to(folder):
            raise InputError(f"{path}: external data {location!r} is a link out of the folder")
        if not target.is_file():
            raise InputError(f"{path}: external data file {location!r} is missing")
        # A hard link resolves inside the folder yet may be any file on the disk: refused too.
        if target.stat().st_nlink > 1:
            raise InputError(
                f"{path}: external data {location!r} is a hard link; copy the file instead"
            )


def _load_proto(path: Path):
    """The graph's protobuf without its external data.

    Raises:
        InputError: missing, empty, corrupt or truncated file.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ONNX file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: ONNX file is empty")
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise InputError(f"{path}: not a valid ONNX file (corrupt or truncated: {err})") from err


def check_onnx_file(path: Path) -> None:
    """Check an ONNX file's external-data references before a runtime (which would follow them
    itself) opens it.

    Raises:
        InputError: unreadable file, or external data outside its folder, linked or missing.
    """
    check_external_data(_load_proto(path), Path(path))


def onnx_input(path: Path) -> dict[str, Any]:
    """An ONNX stage input as a manifest records it: its path, its sha256 and the sha256 of every
    external-data file it references, so replacing the weights beside a graph is a new input.

    Raises:
        InputError: the file is missing or unreadable, or its external data is unsafe.
    """
    path = Path(path)
    model = _load_proto(path)
    check_external_data(model, path)
    external = {
        location: sha256_file(path.parent / location)
        for location in sorted(set(_external_locations(model)))
    }
    entry: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path)}
    if external:
        entry["external_data"] = external
    return entry


def load_onnx(path: Path, *, check_ops: bool = True):
    """Load and check an ONNX graph.

    Args:
        path: the .onnx file.
        check_ops: reject operators outside the BERT allowlist.

    Returns:
        The onnx ModelProto, external data loaded.

    Raises:
        InputError: missing, empty, corrupt or truncated file; unsafe external data; bad operators.
    """
    import onnx

    path = Path(path)
    model = _load_proto(path)
    check_external_data(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: ONNX graph fails onnx.checker ({first})") from err
    if not model.graph.node or not model.graph.output:
        raise InputError(f"{path}: ONNX graph has no nodes or no outputs (truncated?)")
    if check_ops:
        for node in model.graph.node:
            if node.domain not in ALLOWED_DOMAINS or node.op_type in FORBIDDEN_OPS:
                raise InputError(
                    f"{path}: node {node.name!r} uses operator {node.domain or 'ai.onnx'}::"
                    f"{node.op_type}, which is outside the BERT allowlist"
                )
    return model


def save_onnx(model, final: Path) -> None:
    """Write a graph atomically (staging name, fsync, rename).

    Raises:
        InputError: the graph is too large for a single protobuf file.
    """
    import onnx

    if model.ByteSize() > _MAX_PROTO_BYTES:
        raise InputError(
            f"{final}: graph is {model.ByteSize()} bytes, over protobuf's 2 GiB single-file limit; "
            "models this large are not supported yet"
        )
    with atomic_path(final) as staging:
        onnx.save(model, str(staging))


def op_counts(model) -> dict[str, int]:
    """Operator type -> node count, most frequent first."""
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def _vocab_size(model) -> int:
    """Rows of the embedding table that input_ids index (1 if the graph hides it)."""
    tables = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1:] == ["input_ids"] and node.input[0] in tables:
            return int(tables[node.input[0]].dims[0])
    return 1


def sample_token_feeds(model, *, batch: int, sequence: int) -> dict:
    """Valid random token inputs for a BERT graph: ids inside its vocabulary, a partly padded mask.

    Used where a stage checks a rewrite numerically (onnxsim's check, fusion before vs after).
    """
    import numpy as np

    shape = (batch, sequence)
    vocab = _vocab_size(model)
    rng = np.random.default_rng(0)
    feeds = {}
    for graph_input in model.graph.input:
        if graph_input.name == "attention_mask":
            mask = np.ones(shape, dtype=np.int64)
            mask[-1, sequence // 2 :] = 0
            feeds[graph_input.name] = mask
        elif graph_input.name == "token_type_ids":
            feeds[graph_input.name] = np.zeros(shape, dtype=np.int64)
        else:
            feeds[graph_input.name] = rng.integers(0, vocab, size=shape, dtype=np.int64)
    return feeds


def splice_nodes(graph, *, before=None, after=None, remove=frozenset()) -> None:
    """Rebuild ``graph.node`` in order: per node name, insert ``before[name]`` ahead of it and
    ``after[name]`` behind it, and leave out the names in ``remove``; then drop initializers that
    nothing reads any more (the float weights a quantized copy replaced, for instance)."""
    before, after = before or {}, after or {}
    ordered = []
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        if node.name not in remove:
            ordered.append(node)
        ordered.extend(after.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
