"""What a long step shows on stderr: progress bars, and other libraries' output under a prefix.

Bars are tqdm's, on stderr, and shown only where ``configure`` turned them on (the command line:
``--progress/--no-progress``, by default on when stderr is a terminal and there is no ``--json``);
a library caller that never configures gets them when stderr is a terminal. stdout is never
written: with ``--json`` its last line is the summary.

``captured`` runs a third-party call with its output (Python's ``print`` and C/C++ writes to file
descriptors 1 and 2 alike) going to a temporary file instead of the terminal, then logs each line
under a prefix such as ``[simplify]``: onnxsim's "Checking 0/3..." lines would otherwise land on
stdout, unlabelled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("bert_compile")

_enabled: bool | None = None


def configure(enabled: bool | None) -> None:
    """Turn progress bars on or off for this process (None: on when stderr is a terminal)."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    """Whether bars are shown now."""
    if _enabled is not None:
        return _enabled
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def bar(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
):
    """A tqdm bar on stderr, or a silent one when bars are off (it still counts)."""
    from tqdm import tqdm

    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        file=sys.stderr,
        disable=not enabled(),
        dynamic_ncols=True,
    )


@contextlib.contextmanager
def logging_through_bars() -> Iterator[None]:
    """While bars are on, log lines are written through tqdm so a bar is redrawn below them
    instead of being split by them."""
    if not enabled():
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[log]):
        yield


def _flush_c_streams() -> None:
    # C stdio buffers of the captured library must reach the file before the descriptors move.
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def captured(prefix: str, level: int = logging.INFO) -> Iterator[None]:
    """Run the body with stdout and stderr (Python objects and file descriptors 1 and 2) sent to
    a temporary file; afterwards, even when the body raised, log each non-empty line as
    ``[prefix] line`` at ``level``."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        _flush_c_streams()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        text = open(sink.fileno(), "w", encoding="utf-8", errors="replace", closefd=False)
        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                yield
        finally:
            text.flush()
            _flush_c_streams()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            text.close()
            sink.seek(0)
            lines = sink.read().decode("utf-8", errors="replace").splitlines()
            for line in lines:
                if line.strip():
                    log.log(level, "[%s] %s", prefix, line.rstrip())
