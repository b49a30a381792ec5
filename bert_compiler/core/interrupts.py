"""SIGINT and SIGTERM as an exception that unwinds (staging removed, locks released, exit
130/143), with checkpoints that re-raise it where the first raise was swallowed.

Python runs a signal handler between bytecodes of whatever code is executing; when that is a
``__del__`` method or a callback from C (a garbage-collected tokenizer, an ONNX Runtime log
hook), the exception it raises is printed as "Exception ignored" and dropped, and the command
would run on to the end. So the handler also records the signal, every stage checks for it, and
the "Exception ignored" report (a traceback a user would take for a crash) is kept quiet for it.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from bert_compiler.core.errors import Interrupted

_pending: Interrupted | None = None


def _handle(signum: int, _frame: FrameType | None) -> None:
    global _pending
    _pending = Interrupted(signal.Signals(signum).name, 128 + signum)
    raise _pending


def _quiet_when_interrupted(unraisable: sys.UnraisableHookArgs) -> None:
    # The next checkpoint raises it again, so the report would only be a stray traceback.
    if isinstance(unraisable.exc_value, Interrupted):
        return
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """Make SIGINT and SIGTERM raise Interrupted in the main thread."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)
    sys.unraisablehook = _quiet_when_interrupted


def checkpoint() -> None:
    """Raise the Interrupted of a signal that arrived earlier, if there was one."""
    if _pending is not None:
        raise _pending
