"""Reading a model folder's files before any weight is allocated: its JSON (regular files, with
a cap), a module's folder inside it, and a safetensors header (every tensor's dtype and shape
must fill its byte range inside the file, and weights must be floating point)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import InputError, UnsupportedModelError
from bert_compiler.core.files import read_json_file

_MAX_JSON_BYTES = 4 << 20

# Bytes per element of each safetensors dtype; the floating ones are weights, the integer ones
# only the position and type id buffers older checkpoints save.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_INTEGER_BUFFERS = ("position_ids", "token_type_ids")
_SAFETENSORS_MAX_HEADER = 100 << 20


def read_model_json(path: Path) -> Any:
    """A JSON file of the model folder (a regular file of at most _MAX_JSON_BYTES).

    Raises:
        InputError: the file is missing, not a regular file, too large or not JSON.
    """
    return read_json_file(path, _MAX_JSON_BYTES, "model file")


def module_folder(folder: Path, relative: Any, where: Path) -> Path:
    """The folder a sentence-transformers module's ``path`` names inside the model ``folder``
    (empty: the model folder itself).

    Raises:
        InputError: the path is not a string, or leaves the model folder.
    """
    if not isinstance(relative, str):
        raise InputError(f"{where}: module path {relative!r} is not a string")
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise InputError(
            f"{where}: module path {relative!r} leaves the model folder; modules live inside it"
        )
    return folder.joinpath(*parts)


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header and check every tensor's byte range lies inside the file.

    Returns:
        The tensors' header entries by name (dtype, shape, data_offsets).

    Raises:
        InputError: the file is truncated or its header corrupt.
        UnsupportedModelError: a weight tensor is not floating point.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, _SAFETENSORS_MAX_HEADER):
            raise InputError(
                f"{path}: safetensors header claims {header_len} bytes but the file has {size}; "
                "the file is truncated or corrupt"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path}: safetensors header is not valid JSON ({err})") from err
        except RecursionError:
            raise InputError(f"{path}: safetensors header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    data_bytes = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = _tensor_entry_problem(entry, data_bytes)
        if problem:
            raise InputError(f"{path}: tensor {name!r} {problem}; the file is truncated or corrupt")
        if entry["dtype"] not in _FLOAT_DTYPES and not name.endswith(_INTEGER_BUFFERS):
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} is {entry['dtype']}: weights must be floating point "
                f"({', '.join(sorted(_FLOAT_DTYPES))}; another type would be cast without a "
                "word); save the model in float32"
            )
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def _tensor_entry_problem(entry: Any, data_bytes: int) -> str | None:
    """What is wrong with a safetensors header entry (None: its dtype, shape and byte range
    agree, inside the file's data)."""
    if not isinstance(entry, dict):
        return f"has the header entry {entry!r}, not an object"
    offsets, dtype, shape = entry.get("data_offsets"), entry.get("dtype"), entry.get("shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        return f"has data_offsets {offsets!r} outside the file's {data_bytes} data bytes"
    if dtype not in _DTYPE_BYTES:
        return f"has dtype {dtype!r}, not one safetensors defines"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"has shape {shape!r}, not a list of sizes"
    size = math.prod(shape) * _DTYPE_BYTES[dtype]
    if size != offsets[1] - offsets[0]:
        return f"is {dtype} {shape} ({size} bytes) but spans {offsets[1] - offsets[0]} bytes"
    return None


def find_weights(folder: Path, allow_pickle: bool, holder: str) -> Path:
    """The weights file in ``folder`` (``holder`` names it in messages: the model folder, a
    Dense module): model.safetensors, or pytorch_model.bin where pickles are allowed (loaded
    with ``torch.load(weights_only=True)``). Its header is the caller's to check.

    Raises:
        InputError: a pickle without ``allow_pickle``, or no weights file.
        UnsupportedModelError: a sharded safetensors checkpoint.
    """
    safetensors = folder / "model.safetensors"
    if safetensors.is_file():
        return safetensors
    if (folder / "model.safetensors.index.json").is_file():
        raise UnsupportedModelError(
            f"{folder}: sharded safetensors checkpoints are not supported yet; "
            "save the model as one model.safetensors"
        )
    pickle = folder / "pytorch_model.bin"
    if pickle.is_file():
        if not allow_pickle:
            raise InputError(
                f"{pickle}: pickle checkpoints can run code when loaded and are refused; convert "
                "to model.safetensors, or pass --allow-pickle to load it with "
                "torch.load(weights_only=True)"
            )
        return pickle
    raise InputError(f"{folder}: {holder} has no model.safetensors (or pytorch_model.bin)")
