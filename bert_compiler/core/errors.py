"""Errors the user can act on, each with a stable exit code.

A ``BertCompileError`` is printed as one line (what, where, what to do) and exits with its code; any
other exception is an internal error and keeps its traceback. Codes are documented in
docs/guides/ci.md.
"""

from __future__ import annotations

import errno

# The OSError numbers of a full disk or an exhausted quota: a one-line error, never a traceback.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_rust_panic(err: BaseException) -> bool:
    """A panic in a Rust library (tokenizers, safetensors): pyo3 raises it as PanicException, a
    BaseException that ``except Exception`` lets through; its class is made at run time, so it
    is known by name."""
    return type(err).__name__ == "PanicException"


class BertCompileError(Exception):
    """Base of all user-facing errors: bad input, unsupported model, failed gate."""

    exit_code = 3
    kind = "error"


class InputError(BertCompileError):
    """A file, folder, flag or dataset the user gave cannot be used."""

    exit_code = 3
    kind = "input"


class UnsupportedModelError(BertCompileError):
    """The model's architecture or configuration is not one this tool compiles."""

    exit_code = 4
    kind = "unsupported-model"


class ParityError(BertCompileError):
    """The engine's outputs or task metric are outside tolerance against PyTorch."""

    exit_code = 5
    kind = "parity"


class EnvironmentProblem(BertCompileError):
    """A package, provider or device the requested target needs is missing."""

    exit_code = 6
    kind = "environment"


class FusionError(BertCompileError):
    """A graph that should have fused did not: it would run, but silently slower."""

    exit_code = 7
    kind = "fusion"


class ArtifactError(BertCompileError):
    """An artifact on disk does not match its manifest (missing, truncated, tampered)."""

    exit_code = 8
    kind = "artifact"


class BusyError(BertCompileError):
    """Another bert-compile process is writing the same output folder."""

    exit_code = 9
    kind = "busy"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (staging files removed, lock released) and exit."""

    def __init__(self, signal_name: str, exit_code: int):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


EXIT_CODES = {
    cls.kind: cls.exit_code
    for cls in (
        InputError,
        UnsupportedModelError,
        ParityError,
        EnvironmentProblem,
        FusionError,
        ArtifactError,
        BusyError,
    )
}
