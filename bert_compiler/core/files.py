"""Reading the files a user, a model folder or an output folder hands over: regular files only,
never more than a cap, whatever the file claims to be.

A size from stat cannot be trusted (/dev/zero reports 0 bytes and never ends; a FIFO blocks the
reader until a writer comes), so a file is opened without blocking, refused unless it is a
regular file, and read up to one byte past the cap. JSON nested deeper than the parser's
recursion limit is one line, like any other malformed JSON.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from bert_compiler.core.errors import BertCompileError, InputError


def open_regular_file(
    path: Path, what: str, error: type[BertCompileError] = InputError
) -> BinaryIO:
    """A regular file opened for reading in binary (``what``: its name in messages), without
    ever blocking on the way: a FIFO is opened without waiting for a writer, then refused.

    Raises:
        ``error``: missing, unreadable, or not a regular file (a folder, a device, a pipe).
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise error(f"{path}: not a regular file (a folder, device or pipe); give a {what} on disk")
    os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "rb")


def read_regular_file(
    path: Path, limit: int, what: str, error: type[BertCompileError] = InputError
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (``what``: its name in messages).

    Raises:
        ``error``: as open_regular_file, or over ``limit`` bytes.
    """
    with open_regular_file(path, what, error) as handle:
        try:
            data = handle.read(limit + 1)
        except OSError as err:
            raise error(f"{path}: cannot read the {what} ({err.strerror})") from None
    if len(data) > limit:
        raise error(f"{path}: {what} over {_size(limit)}")
    return data


def read_json_file(
    path: Path, limit: int, what: str, error: type[BertCompileError] = InputError
) -> Any:
    """The JSON value of a regular UTF-8 file of at most ``limit`` bytes.

    Raises:
        ``error``: as read_regular_file, or not UTF-8 JSON (nesting too deep included).
    """
    data = read_regular_file(path, limit, what, error)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: {what} is not valid UTF-8 JSON ({err})") from None
    except RecursionError:
        raise error(f"{path}: {what} is JSON nested too deeply to read") from None


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
