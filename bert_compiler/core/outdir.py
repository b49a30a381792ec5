"""Which folders bert-compile may write into, and the marker that says a folder is its own.

An output folder is claimed before anything is written: the filesystem root, the home folder
itself and the model folder's parents are refused; a non-empty folder without the marker (a
user's folder) is refused unless the user says otherwise; a new folder gets the marker. What a
failed command created and left empty of artifacts is removed again (``release_if_unused``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from bert_compiler.core import __version__
from bert_compiler.core.artifacts import atomic_write_text, existing_ancestor
from bert_compiler.core.errors import InputError
from bert_compiler.core.lock import HOLDER_FILE, LOCK_FILE

MARKER_FILE = ".bert-compile.json"
# The tool's own bookkeeping at the top of OUT: a folder holding nothing else has no artifact.
BOOKKEEPING = frozenset({MARKER_FILE, LOCK_FILE, HOLDER_FILE})


def require_writable(path: Path, what: str) -> None:
    """Refuse a path whose nearest existing folder cannot be written (read-only, no access).

    Raises:
        InputError: not writable, with ``what`` (the option) named.
    """
    folder = existing_ancestor(Path(path).resolve())
    if not folder.is_dir():
        raise InputError(
            f"{folder}: is a file, not a folder; choose another output folder ({what})"
        )
    if not os.access(folder, os.W_OK):
        raise InputError(
            f"{folder}: not writable (read-only or no access); choose another output folder "
            f"({what})"
        )


def _refuse_place(out: Path, model_folder: Path | None) -> None:
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise InputError(f"{out}: the filesystem root is no output folder; choose a new folder")
    if resolved == Path.home().resolve():
        raise InputError(f"{out}: your home folder itself is no output folder; choose a new one")
    if model_folder is not None:
        model = model_folder.resolve()
        if resolved == model or resolved in model.parents:
            raise InputError(
                f"{out}: holds the model folder {model_folder}; choose an output folder outside it"
            )


def claim_output(out: Path, *, model_folder: Path | None = None, force: bool = False) -> bool:
    """Make ``out`` an output folder of this tool, or refuse it before anything is written.

    Args:
        model_folder: the model the command reads (its folder and parents are refused).
        force: write into a non-empty folder that has no marker (``--force-out``).

    Returns:
        True when this call created the folder.

    Raises:
        InputError: a refused place, a file, a user's folder, or a folder that cannot be made.
    """
    out = Path(out)
    _refuse_place(out, model_folder)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file, not a folder; choose another --out")
    # A folder with the lock file predates the marker and was made by this tool too.
    ours = (out / MARKER_FILE).is_file() or (out / LOCK_FILE).is_file()
    if out.is_dir() and not ours and any(out.iterdir()) and not force:
        raise InputError(
            f"{out}: not empty and not an output folder of bert-compile (no {MARKER_FILE}); "
            "choose an empty or new folder, or pass --force-out to write into it anyway"
        )
    require_writable(out, "--out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{out}: cannot create output folder ({err.strerror})") from err
    if not (out / MARKER_FILE).is_file():
        marker = {
            "tool": "bert-compiler",
            "version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(out / MARKER_FILE, json.dumps(marker) + "\n")
    return created


def release_if_unused(out: Path) -> None:
    """Remove ``out`` again when it holds nothing but this tool's bookkeeping and empty folders
    (the command that created it failed before writing an artifact: a stage's folder, made
    before its body failed, stays empty). Call it holding the folder's lock, so no other command
    writes into it meanwhile."""
    out = Path(out)
    try:
        entries = list(out.iterdir())
        unused = all(
            (entry.name in BOOKKEEPING and entry.is_file() and not entry.is_symlink())
            or _empty_folders(entry)
            for entry in entries
        )
    except OSError:
        return
    if not unused:
        return
    try:
        for entry in entries:
            if entry.name in BOOKKEEPING and not entry.is_dir():
                entry.unlink(missing_ok=True)
            else:
                _remove_empty_folders(entry)
        out.rmdir()
    except OSError:
        pass  # something appeared meanwhile: it stays, and so does the folder


def _empty_folders(path: Path) -> bool:
    """Whether ``path`` is a folder (not a link) holding nothing but empty folders."""
    return (
        path.is_dir()
        and not path.is_symlink()
        and all(_empty_folders(child) for child in path.iterdir())
    )


def _remove_empty_folders(path: Path) -> None:
    for child in path.iterdir():
        _remove_empty_folders(child)
    path.rmdir()  # only ever empty: a file that appeared meanwhile stops it with an OSError
