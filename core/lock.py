"""One writer per output folder.

Two builds into one OUT would interleave stage folders and manifests. Every command that writes
OUT holds an OS file lock on ``OUT/.bert-compile.lock`` (flock: released by the kernel when the
process dies, even by SIGKILL, so a crash never leaves a stale lock) and writes who holds it to
``OUT/.bert-compile.lock.json``, so the second command can say whom it is waiting for.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from bert_compiler.core.errors import BusyError, InputError

LOCK_FILE = ".bert-compile.lock"
HOLDER_FILE = ".bert-compile.lock.json"


def _holder(out: Path) -> str:
    try:
        info = json.loads((out / HOLDER_FILE).read_text(encoding="utf-8"))
        return (
            f"pid {info['pid']} on {info['host']} since {info['since']} "
            f"({' '.join(info['command'])[:120]})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (no holder record)"


@contextlib.contextmanager
def output_lock(out: Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the lock of ``out`` (created if missing) for the duration of the block.

    Raises:
        BusyError: another process holds it for longer than ``wait_s`` seconds.
        InputError: the folder cannot be created.
    """
    from filelock import FileLock, Timeout

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create output folder ({err.strerror})") from err
    lock = FileLock(str(out / LOCK_FILE), thread_local=False)
    try:
        lock.acquire(timeout=max(wait_s, 0.0), poll_interval=0.2)
    except Timeout as err:
        raise BusyError(
            f"{out}: in use by {_holder(out)}; wait for it to finish, pass --wait-lock SECONDS, "
            "or choose another --out"
        ) from err
    except OSError as err:
        raise InputError(f"{out}: cannot lock the output folder ({err.strerror})") from err
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        with contextlib.suppress(OSError):
            (out / HOLDER_FILE).write_text(json.dumps(holder), encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            (out / HOLDER_FILE).unlink()
        lock.release()
