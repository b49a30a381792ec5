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
import stat
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
    _refuse_planted(out)
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
    written = False
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
        }
        written = _write_holder(out / HOLDER_FILE, json.dumps(holder))
        yield
    finally:
        if written:
            with contextlib.suppress(OSError):
                (out / HOLDER_FILE).unlink()
        lock.release()


def _refuse_planted(out: Path) -> None:
    """The lock file and the holder file as this tool makes them: absent, or regular files. The
    lock opens its file with O_TRUNC, and a link planted under either name (in a shared
    repository or OUT) would have the tool truncate or overwrite a file outside the folder.

    Raises:
        InputError: either name is a link, or anything but a regular file.
    """
    for name in (LOCK_FILE, HOLDER_FILE):
        path = out / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as err:
            raise InputError(f"{path}: cannot check the lock file ({err.strerror})") from None
        if not stat.S_ISREG(mode):
            what = "a link" if stat.S_ISLNK(mode) else "not a regular file"
            raise InputError(
                f"{path}: {what} where bert-compile keeps its lock; it was not made by "
                "bert-compile: remove it"
            )


def _write_holder(path: Path, text: str) -> bool:
    """Write the holder file without following a link (O_NOFOLLOW); False if it was not."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o644)
    except OSError:
        return False
    with contextlib.suppress(OSError), os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    return True
