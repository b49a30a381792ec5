"""Artifact folders, atomic writes and manifests.

Every stage writes into its own folder. The order is what makes a crash harmless: the old manifest
is removed first (the folder no longer claims to be complete), each output is written to a
temporary name, fsynced and moved into place with ``os.replace``, and the new manifest is written
last. A folder is complete only when its manifest says so and every output's sha256 matches it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from bert_compiler.core import __version__
from bert_compiler.core.errors import NO_SPACE_ERRNOS, ArtifactError, InputError
from bert_compiler.core.files import open_regular_file, read_json_file

MANIFEST_NAME = "manifest.json"
# Far above any manifest this tool writes (a Triton repository's is a few hundred KiB).
MAX_MANIFEST_BYTES = 64 << 20
SCHEMA_VERSION = 1
# Staging names carry the tool's name: leftovers of an interrupted write are removed by name, and a
# user's own `.notes.tmp-1` must never match.
_TMP_MARK = ".bert-compile.tmp-"
_OLD_MARK = ".bert-compile.old-"
_SPACE_MARGIN_MIB = 16
_VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxsim",
    "numpy",
)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    with open(path, "rb") as handle:
        return _sha256_of(handle)


def _sha256_of(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def input_file(path: Path, what: str) -> dict[str, str]:
    """A stage input as a manifest records it: its path and sha256 (read without blocking:
    a FIFO, a device or a folder is refused as such, not hashed forever or called missing).

    Raises:
        InputError: missing, or not a regular file.
    """
    path = Path(path)
    with open_regular_file(path, what) as handle:
        return {"path": str(path), "sha256": _sha256_of(handle)}


def sha256_json(value: Any) -> str:
    """Return the sha256 of a value's canonical JSON form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of Python, this tool and the libraries that shape the artifacts."""
    versions = {
        "python": platform.python_version(),
        "bert-compiler": __version__,
        "platform": f"{sys.platform}-{platform.machine()}",
    }
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success fsync it and rename it into place.

    On any exception the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}{_TMP_MARK}{os.getpid()}")
    # The staging name is predictable: whatever stands there is written through, so only a file
    # of ours (left by an interrupted run of the same pid) is cleared; a link or anything else
    # planted there is refused, never followed or removed.
    if os.path.lexists(staging):
        if staging.is_symlink() or not staging.is_file():
            raise ArtifactError(
                f"{staging}: a link or other entry where bert-compile writes its staging file "
                f"for {final.name}; remove it and rerun"
            )
        staging.unlink()
    try:
        yield staging
        if not staging.exists():
            raise ArtifactError(
                f"{final}: the stage wrote nothing to its staging file {staging.name}"
            )
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, final)
        _fsync_dir(final.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            raise InputError(
                f"{final}: no space left while writing it ({_free_mib(final.parent)} MiB free); "
                "free space or choose another --out, then rerun"
            ) from err
        raise


def existing_ancestor(path: Path) -> Path:
    """``path`` itself, or its nearest parent that exists (where a new folder's disk is)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_mib(folder: Path) -> int:
    return shutil.disk_usage(existing_ancestor(folder)).free >> 20


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start writing ``folder`` when its disk has less than ``needed_bytes`` (plus a
    margin) free: a preflight, so the previous complete artifact is never touched.

    Raises:
        InputError: not enough space.
    """
    needed_mib = (needed_bytes >> 20) + _SPACE_MARGIN_MIB
    free = _free_mib(folder)
    if free < needed_mib:
        raise InputError(
            f"{folder}: needs about {needed_mib} MiB but {free} MiB are free; free space or "
            "choose another --out"
        )


def replace_tree(staging: Path, final: Path) -> None:
    """Move a finished folder into place, replacing ``final`` and everything in it.

    Two renames: ``final`` (if any) to a hidden ``.NAME.bert-compile.old-PID`` beside it, then
    ``staging`` to
    ``final``; the old tree is deleted last. A crash in between leaves no ``final`` at all (never a
    mix of old and new files); ``clear_staging`` removes the hidden leftovers on the next run.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(f".{final.name}{_OLD_MARK}{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def staging_tree(final: Path) -> Path:
    """A fresh hidden folder beside ``final`` to build a replacement tree in (replace_tree)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_staging(final)
    staging = final.with_name(f".{final.name}{_TMP_MARK}{os.getpid()}")
    staging.mkdir()
    return staging


def clear_staging(final: Path) -> None:
    """Remove what interrupted tree builds and swaps of ``final`` left beside it."""
    final = Path(final)
    for leftover in final.parent.glob(f".{final.name}.*"):
        if _TMP_MARK in leftover.name or _OLD_MARK in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)


def is_leftover(name: str) -> bool:
    """True for the name of a staging or swap leftover of this tool's interrupted writes."""
    return name.startswith(".") and (_TMP_MARK in name or _OLD_MARK in name)


def clear_leftovers(folder: Path) -> None:
    """Remove every staging or swap leftover this tool's interrupted writes left in ``folder``
    (hidden entries named with its marks; nothing else is touched)."""
    for leftover in Path(folder).glob(".*"):
        if is_leftover(leftover.name):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def atomic_write_text(final: Path, text: str) -> None:
    """Write text to ``final`` atomically (temporary name, fsync, rename)."""
    with atomic_path(final) as staging:
        staging.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class StageRecord:
    """What a stage declares about one run: its inputs' hashes, its settings and its results."""

    stage: str
    inputs: Mapping[str, Any]
    spec: Mapping[str, Any]

    def input_key(self, versions: Mapping[str, str]) -> str:
        """One hash over everything that determines the outputs: inputs, settings, tool versions."""
        return sha256_json(
            {"stage": self.stage, "inputs": self.inputs, "spec": self.spec, "versions": versions}
        )


class ArtifactDir:
    """One stage's output folder and its manifest."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest, or None when the folder has none (never built, or interrupted).

        Raises:
            ArtifactError: a manifest that is not a regular file, too large, not UTF-8 JSON, or
                not a JSON object.
        """
        if not os.path.lexists(self.manifest_path):
            return None
        try:
            manifest = read_json_file(
                self.manifest_path, MAX_MANIFEST_BYTES, "manifest", ArtifactError
            )
        except ArtifactError as err:
            raise ArtifactError(
                f"{err}; no manifest this tool wrote: delete the folder or rerun with --force"
            ) from None
        problem = _shape_problem(manifest)
        if problem:
            raise ArtifactError(
                f"{self.manifest_path}: {problem}; not a manifest this tool wrote (delete the "
                "folder or rerun with --force)"
            )
        return manifest

    def require_complete(self) -> dict[str, Any]:
        """Return the manifest after checking every output against its recorded sha256.

        Raises:
            ArtifactError: the folder has no complete manifest or an output does not match it.
        """
        manifest = self.read_manifest()
        if manifest is None or not manifest.get("complete"):
            raise ArtifactError(
                f"{self.path}: no complete artifact here (missing or interrupted); run the stage "
                "that makes it first"
            )
        for name, entry in manifest.get("outputs", {}).items():
            self.check_output(name, entry)
        if not sealed(manifest):
            raise ArtifactError(
                f"{self.manifest_path}: its inputs, settings or tool versions were edited after it "
                "was written (they no longer hash to its input_key); rebuild with --force"
            )
        return manifest

    def check_output(self, name: str, entry: Mapping[str, Any]) -> None:
        """Raises ArtifactError when output ``name`` is missing or differs from ``entry``."""
        path = self.output_path(name)
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in {self.manifest_path.name} but missing; rebuild")
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest "
                f"({str(entry.get('sha256'))[:12]}…): truncated or modified after it was built; "
                "rebuild with --force"
            )

    def output_path(self, name: str) -> Path:
        """Path of an output named in a manifest (``model.onnx``, or ``sub/dir/file`` for a tree
        such as a Triton repository), refusing names that leave the folder: absolute, ``..``,
        hidden parts (staging files), or a link out."""
        pure = PurePosixPath(name)
        root = self.path.resolve()
        candidate = (self.path / name).resolve()
        if (
            not name
            or pure.is_absolute()
            or any(part.startswith(".") for part in pure.parts)
            or not candidate.is_relative_to(root)
            or candidate == root
        ):
            raise ArtifactError(f"{self.manifest_path}: output name {name!r} leaves its folder")
        return candidate

    def expected_bytes(self, record: StageRecord) -> int:
        """What a rebuild will write, roughly: the previous outputs' size, or else the size of
        the input files (an engine or graph is about as large as the graph it came from)."""
        with contextlib.suppress(ArtifactError):
            previous = self.read_manifest() or {}
            sizes = [entry.get("bytes", 0) for entry in previous.get("outputs", {}).values()]
            if sizes:
                return sum(sizes)
        return sum(_input_sizes(record.inputs))

    def is_up_to_date(self, record: StageRecord) -> bool:
        """True when a complete manifest exists for exactly these inputs, settings and versions."""
        try:
            manifest = self.read_manifest()
        except ArtifactError:
            return False
        if manifest is None or not manifest.get("complete"):
            return False
        versions = tool_versions()
        # The recorded versions themselves, not only the key: an edited "versions" would
        # otherwise be skipped over and copied on (into a Triton repository's manifest).
        if manifest.get("versions") != versions or not sealed(manifest):
            return False
        if manifest.get("input_key") != record.input_key(versions):
            return False
        try:
            for name, entry in manifest.get("outputs", {}).items():
                self.check_output(name, entry)
        except ArtifactError:
            return False
        return True

    def reusable_output(
        self, record: StageRecord, name: str, *, ignore: tuple[str, ...]
    ) -> Path | None:
        """Output ``name`` of the complete manifest in this folder, when that manifest is sealed,
        was written by the running tool versions, and records the same inputs and settings as
        ``record`` except the ``ignore`` keys of the spec: what a stage computed that those
        settings do not change, reused instead of computed again. None otherwise.
        """
        try:
            manifest = self.read_manifest()
        except ArtifactError:
            return None
        if manifest is None or not manifest.get("complete") or not sealed(manifest):
            return None
        if manifest.get("stage") != record.stage or manifest.get("versions") != tool_versions():
            return None

        def kept(spec: Mapping[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in spec.items() if k not in ignore}

        # Compared in canonical JSON: the manifest holds JSON values, the record Python ones.
        if sha256_json(manifest["inputs"]) != sha256_json(record.inputs):
            return None
        if sha256_json(kept(manifest["spec"])) != sha256_json(kept(record.spec)):
            return None
        entry = manifest.get("outputs", {}).get(name)
        if entry is None:
            return None
        try:
            self.check_output(name, entry)
        except ArtifactError:
            return None
        return self.output_path(name)

    def begin(self) -> None:
        """Mark the folder incomplete before any output is replaced, and clear old staging files."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"{self.path}: cannot create output folder ({err.strerror})") from err
        if not os.access(self.path, os.W_OK):
            raise InputError(f"{self.path}: output folder is not writable; choose another --out")
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()
        for leftover in self.path.glob(f".*{_TMP_MARK}*"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()

    def commit(
        self, record: StageRecord, outputs: list[str], results: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Hash the outputs and write the manifest last; return it."""
        versions = tool_versions()
        manifest = {
            "schema": SCHEMA_VERSION,
            "stage": record.stage,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions,
            "inputs": dict(record.inputs),
            "spec": dict(record.spec),
            "input_key": record.input_key(versions),
            "outputs": {
                name: {
                    "sha256": sha256_file(self.path / name),
                    "bytes": (self.path / name).stat().st_size,
                }
                for name in outputs
            },
            "results": dict(results or {}),
            "complete": True,
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest


_MANIFEST_FIELDS = {
    "stage": str,
    "inputs": dict,
    "spec": dict,
    "versions": dict,
    "outputs": dict,
    "results": dict,
    "input_key": str,
    "complete": bool,
}


def _shape_problem(manifest: Any) -> str:
    """Why ``manifest`` is not shaped like one this tool writes ('' when it is): every field of
    the right type, each output a {"sha256": str, "bytes": int} entry."""
    if not isinstance(manifest, dict):
        return "manifest is not a JSON object"
    for field, kind in _MANIFEST_FIELDS.items():
        if field in manifest and not isinstance(manifest[field], kind):
            return f"field {field!r} has the wrong type ({type(manifest[field]).__name__})"
    for name, entry in manifest.get("outputs", {}).items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes", 0), int)
        ):
            return f"output {name!r} has no sha256 or size"
    return ""


def sealed(manifest: Mapping[str, Any]) -> bool:
    """True when the manifest's recorded stage, inputs, settings and versions still hash to the
    input_key written with them (an edit of any of them breaks the seal)."""
    try:
        record = StageRecord(str(manifest["stage"]), manifest["inputs"], manifest["spec"])
        return record.input_key(manifest["versions"]) == manifest.get("input_key")
    except (KeyError, TypeError):
        return False


def _input_sizes(value: Any) -> Iterator[int]:
    """Sizes of the files a record's inputs name (``{"path": ..., "sha256": ...}`` entries)."""
    if isinstance(value, Mapping):
        path = value.get("path")
        if isinstance(path, str) and "sha256" in value and Path(path).is_file():
            yield Path(path).stat().st_size
        for item in value.values():
            if isinstance(item, Mapping):
                yield from _input_sizes(item)
