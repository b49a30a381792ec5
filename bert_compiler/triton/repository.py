"""A Triton model repository as bert-compile writes and reads it: its manifest (one section per
packaged model), the listing of every entry it may hold, and the cross-checks of its configs.

package.py writes repositories; gate.py (verify --repository) reads them; both read them here.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bert_compiler.core.artifacts import (
    MANIFEST_NAME,
    ArtifactDir,
    sealed,
    sha256_file,
    sha256_json,
)
from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.core.lock import HOLDER_FILE, LOCK_FILE
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.stages.layout import model_slug
from bert_compiler.triton import config as tc

# Every model of a repository has one version folder.
VERSION = "1"
# Written by package before it swaps any model folder in, removed once the manifest describes
# them: the package whose swap was interrupted, and its model folders.
JOURNAL_FILE = ".bert-compile.pending.json"
# Where Python writes the bytecode of a module it imports (Triton's Python backend: model.py).
BYTECODE_FOLDER = "__pycache__"


def engine_tensors(
    path: Path, record: Mapping[str, Any]
) -> tuple[list[tc.TensorSpec], list[tc.TensorSpec]]:
    """The tensors Triton sees of an engine file in a repository: read from an ONNX file, or,
    for a file only its backend can open (a TensorRT plan), the ones its model record keeps."""
    if path.suffix == ".onnx":
        return tc.onnx_tensor_specs(load_onnx(path))
    inputs, outputs = (
        [tc.TensorSpec(**{**t, "dims": tuple(t["dims"])}) for t in record["io"][role]]
        for role in ("inputs", "outputs")
    )
    return inputs, outputs


# Models that hold an engine file: its own backend's model, the Python-backend copy taking token
# tensors, the one-model Python text engine taking text, and the torch engine's text model.
ENGINE_ROLES = ("engine", "python-engine", "python-text", "torch-text")
# Of those, the models that take text (TEXT, TEXT_PAIR) and answer with the engine's outputs.
TEXT_ROLES = ("python-text", "torch-text")
# Of those, the models holding an engine file as package took it from the engine folder (the
# others hold byte-identical copies of one of these): the gate plans the package again from them.
SOURCE_ROLES = ("engine", "torch-text")


def repository_problems(folder: Path, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Parse every config.pbtxt with Triton's protobuf and cross-check it: name, the engine
    files' tensors (ONNX read directly; TensorRT plans against the graph TensorRT parsed, as
    recorded), file hashes against the engines they were copied from, the tokenizer's outputs
    against the engines' inputs, and each ensemble's wiring."""
    configs, problems = {}, []
    for name in records:
        path = folder / name / tc.CONFIG_FILE
        configs[name] = tc.parse(path.read_text(encoding="utf-8"), path)
        if configs[name].name != name:
            problems.append(f"{path}: names model {configs[name].name!r}, folder is {name!r}")
    for name, record in records.items():
        config = configs[name]
        where = str(folder / name / tc.CONFIG_FILE)
        if record["role"] in ENGINE_ROLES:
            for relative, entry in record["files"].items():
                path = folder / name / relative
                if sha256_file(path) != entry["sha256"]:
                    problems.append(f"{path}: differs from the verified engine {entry['engine']}")
                inputs, outputs = engine_tensors(path, record)
                if record["role"] in TEXT_ROLES:
                    # Text in (the tokenizer model's inputs), the engine's outputs out.
                    inputs = [tc.TensorSpec(n, "TYPE_STRING", (1,)) for n in record["text_inputs"]]
                    outputs = tc.text_outputs(outputs)
                problems.extend(tc.io_problems(config, inputs, outputs, where))
            if record["role"] == "engine":
                expected = {f: e["compute_capability"] for f, e in record["files"].items()}
                named = {f"{VERSION}/{f}": cc for cc, f in config.cc_model_filenames.items()}
                if record["device"] == "cuda" and not config.default_model_filename:
                    if named != expected:
                        problems.append(
                            f"{where}: cc_model_filenames {named} do not match the engines "
                            f"{expected}"
                        )
        elif record["role"] == "ensemble":
            problems.extend(tc.ensemble_problems(config, configs, where))
    return problems


def normalized(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A repository manifest in the per-package form: ``inputs`` and ``spec`` hold one section
    per packaged model (by its slug), and every model record names its package. A manifest of an
    older bert-compile, written for one model, is read as that one package."""
    manifest = dict(manifest)
    results = manifest.get("results", {})
    if "packages" in manifest.get("inputs", {}) or not isinstance(results.get("models"), dict):
        return manifest  # the new form, or no form at all (checked_manifest refuses it)
    model = results.get("model") if isinstance(results.get("model"), dict) else {}
    slug = model_slug(str(model.get("name", "model")))
    manifest["inputs"] = {"packages": {slug: manifest.get("inputs", {})}}
    manifest["spec"] = {"packages": {slug: manifest.get("spec", {})}}
    records = results.get("models", {})
    manifest["results"] = {
        "models": {
            name: {**record, "package": slug} if isinstance(record, dict) else record
            for name, record in records.items()
        },
        "packages": {
            slug: {"model": results.get("model"), "tokenizer_check": results.get("tokenizer_check")}
        },
    }
    return manifest


def package_models(manifest: Mapping[str, Any], slug: str) -> set[str]:
    """The Triton models of one package in a normalized repository manifest."""
    return {n for n, r in manifest["results"]["models"].items() if r.get("package") == slug}


def package_outputs(manifest: Mapping[str, Any], models: set[str]) -> dict[str, Any]:
    return {n: e for n, e in manifest["outputs"].items() if n.split("/", 1)[0] in models}


@dataclass(frozen=True)
class Repository:
    """A packaged repository read back: its manifest and its models' records, hash-checked."""

    path: Path
    manifest: Mapping[str, Any]

    @property
    def models(self) -> Mapping[str, Mapping[str, Any]]:
        return self.manifest["results"]["models"]

    def file(self, model: str, relative: str) -> Path:
        return ArtifactDir(self.path).output_path(f"{model}/{relative}")


def _repository_entries(root: Path, skip: Collection[str] = ()) -> tuple[set[str], set[str]]:
    """Every file and folder under ``root`` as relative POSIX paths, never following a link
    (top-level entries named in ``skip`` are not entered).

    Raises:
        ArtifactError: a link of any kind (Triton would follow a symbolic link; a hard link is
            another file's content under a name we wrote), or something not a file or folder.
    """
    files: set[str] = set()
    folders: set[str] = set()
    pending = [root]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                relative = Path(entry.path).relative_to(root).as_posix()
                if relative in skip:
                    continue
                if entry.is_symlink():
                    raise ArtifactError(
                        f"{entry.path}: a link inside a Triton repository (Triton would follow "
                        "it); a repository bert-compile wrote holds none: remove it"
                    )
                if entry.is_dir(follow_symlinks=False):
                    folders.add(relative)
                    pending.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    raise ArtifactError(f"{entry.path}: neither a file nor a folder; remove it")
                elif entry.stat(follow_symlinks=False).st_nlink > 1:
                    raise ArtifactError(
                        f"{entry.path}: a hard link inside a Triton repository; a repository "
                        "bert-compile wrote holds none: package again"
                    )
                else:
                    files.add(relative)
    return files, folders


def check_entries(path: Path, manifest: Mapping[str, Any], foreign: Collection[str] = ()) -> None:
    """Refuse every file, folder or link in the repository that its manifest does not name:
    Triton loads any model folder and any version folder it finds. Top-level entries named in
    ``foreign`` (a user's own models and files) are left alone, unread.

    Raises:
        ArtifactError: an entry the manifest does not name.
    """
    try:
        records, listed = dict(manifest["results"]["models"]), set(manifest["outputs"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: its manifest lists no models and outputs ({err})") from err
    foreign = set(foreign) - set(records)
    files, folders = _repository_entries(path, skip=foreign)
    # Named before any other stray: a Triton that loaded the repository in place leaves these,
    # and their contents are never read (Python would run a .pyc whose source stamp matches
    # model.py instead of model.py).
    for folder in sorted(f for f in folders if PurePosixPath(f).name == BYTECODE_FOLDER):
        raise ArtifactError(
            f"{path / folder}: Python bytecode that a Triton server wrote when it loaded this "
            "repository in place (or that someone put there); not trusted, since Python would "
            f"run it instead of model.py: remove it (rm -r '{path / folder}') and run again; "
            "`bert-compile serve` and a read-only mount write none"
        )
    strays = sorted(f for f in folders if "/" not in f and f not in records)
    if strays:
        raise ArtifactError(
            f"{path}: model folders {strays} are not in its manifest (Triton would serve them); "
            "remove them, package again, or name them with --allow-foreign"
        )
    for file in sorted(files - listed - {MANIFEST_NAME, LOCK_FILE, HOLDER_FILE, JOURNAL_FILE}):
        raise ArtifactError(f"{path / file}: not written by bert-compile package; remove it")
    expected = {*records, *(f"{name}/{VERSION}" for name in records)}
    for file in listed:
        expected.update(p.as_posix() for p in PurePosixPath(file).parents if str(p) != ".")
    for folder in sorted(folders - expected):
        raise ArtifactError(
            f"{path / folder}: a folder bert-compile package did not write (Triton would load "
            "it, e.g. as another model version); remove it"
        )


def foreign_entries(path: Path, manifest: Mapping[str, Any]) -> set[str]:
    """Top-level entries of a repository that no package of it wrote (a user's own models and
    files): packaging leaves them alone."""
    records = manifest.get("results", {}).get("models", {})
    ours = {*records, MANIFEST_NAME, LOCK_FILE, HOLDER_FILE, JOURNAL_FILE}
    return {entry.name for entry in path.iterdir() if entry.name not in ours}


def checked_manifest(folder: ArtifactDir, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A repository manifest this tool wrote, unedited and complete, in the per-package form,
    every model record of the shape ``package`` writes.

    Raises:
        ArtifactError: another stage's manifest, an incomplete or edited one, a malformed record.
    """
    if manifest.get("stage") != "package":
        raise ArtifactError(f"{folder.path}: not a Triton repository bert-compile wrote")
    if not manifest.get("complete") or not sealed(manifest):
        raise ArtifactError(
            f"{folder.manifest_path}: incomplete, or edited after it was written; package "
            "into a new --repository, or remove it"
        )
    result = normalized(manifest)
    problem = _package_problem(result)
    if problem:
        raise ArtifactError(f"{folder.manifest_path}: {problem}; package again")
    for name, record in result["results"]["models"].items():
        tc.check_name(name, f"{folder.manifest_path}: model")
        problem = _record_problem(name, record)
        if problem:
            raise ArtifactError(f"{folder.manifest_path}: {problem}; package again")
    return result


def _package_problem(manifest: Mapping[str, Any]) -> str:
    """Why a normalized repository manifest is not shaped as ``package`` writes it ('' if it is):
    one sealed section of inputs and one of settings per package, every model record in a known
    package, and each package's records equal to the hash sealed with them."""
    packages = manifest.get("inputs", {}).get("packages")
    settings = manifest.get("spec", {}).get("packages")
    models = manifest.get("results", {}).get("models")
    if not isinstance(packages, dict) or not isinstance(settings, dict):
        return "no package sections"
    if set(packages) != set(settings) or not isinstance(models, dict):
        return "package sections that do not match"
    for slug, section in packages.items():
        model = section.get("model") if isinstance(section, dict) else None
        if not isinstance(model, dict) or not isinstance(model.get("sha256"), str):
            return f"package {slug!r} names no model"
        if not isinstance(settings[slug], dict):
            return f"package {slug!r} has no settings"
        own = {n: r for n, r in models.items() if isinstance(r, dict) and r.get("package") == slug}
        # Older manifests sealed no records; newer ones seal each package's.
        if "records" in section and section["records"] != sha256_json(own):
            return f"the model records of package {slug!r} were edited after it was written"
    for name, record in models.items():
        if not isinstance(record, dict) or record.get("package") not in packages:
            return f"model {name!r} belongs to no package"
    return ""


_ROLES = ("tokenizer", *ENGINE_ROLES, "ensemble")


def _record_problem(name: str, record: Any) -> str:
    """Why a model's record in a repository manifest is not one ``package`` writes ('' if it is):
    the gate loads engines by these records, so their shape is checked before any is used."""
    if not isinstance(record, dict) or record.get("role") not in _ROLES:
        return f"model {name!r} has no record of a known role"
    role = record["role"]
    if role == "tokenizer":
        ok = isinstance(record.get("max_length"), int) and isinstance(record.get("inputs"), list)
        return "" if ok else f"tokenizer {name!r} lacks max_length or inputs"
    if role == "ensemble":
        return "" if isinstance(record.get("engine"), str) else f"ensemble {name!r} names no engine"
    texts = record.get("text_inputs")
    if role in TEXT_ROLES and not (
        isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)
    ):
        return f"text model {name!r} names no text inputs"
    files = record.get("files")
    if not isinstance(files, dict) or not files or not isinstance(record.get("device"), str):
        return f"engine model {name!r} lists no files or device"
    if not isinstance(record.get("max_length"), int):
        return f"engine model {name!r} has no max_length"
    for relative, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("engine"), str)
            and isinstance(entry.get("spec"), dict)
            and isinstance(entry.get("results"), dict)
            and isinstance(entry.get("verification"), dict)
            and isinstance(entry["verification"].get("passed"), bool)
            and isinstance(entry["spec"].get("backend"), str)
            and isinstance(entry["spec"].get("precision"), str)
        ):
            return f"engine file {name}/{relative} has no complete record"
    io = record.get("io")
    if io is not None:
        parts = [io.get(part) for part in ("inputs", "outputs")] if isinstance(io, dict) else []
        if not parts or not all(
            isinstance(tensors, list)
            and all(
                isinstance(t, dict) and set(t) == {"name", "data_type", "dims"} for t in tensors
            )
            for tensors in parts
        ):
            return f"engine model {name!r} has malformed tensor records"
    return ""


def open_repository(path: Path, *, foreign: Collection[str] = ()) -> Repository:
    """Read a repository this tool wrote: every entry (file, folder, at any depth) must be one its
    manifest names and none may be a link, every file must match its recorded hash, the manifest
    must be unedited, and every config passes its checks.

    Args:
        foreign: top-level entries the user put there on purpose (their own models, notes):
            left alone and unread, never verified.

    Raises:
        ArtifactError: no complete manifest, a file missing or modified, an unlisted entry, a link.
        InputError: a config that fails its checks.
    """
    path = Path(path)
    for name in foreign:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise InputError(
                f"--allow-foreign {name!r}: name a top-level model folder or file of the repository"
            )
    folder = ArtifactDir(path)
    if (path / JOURNAL_FILE).exists():
        raise ArtifactError(
            f"{path}: a package into it was interrupted ({JOURNAL_FILE}); run that package again"
        )
    manifest = folder.read_manifest()
    if manifest is not None and manifest.get("stage") != "package":
        raise ArtifactError(f"{path}: not a Triton repository bert-compile wrote")
    if manifest is not None and manifest.get("complete"):
        # Before any file is read through a path that might be a link.
        check_entries(path, manifest, foreign)
    manifest = checked_manifest(folder, folder.require_complete())
    problems = repository_problems(path, manifest["results"]["models"])
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    return Repository(path, manifest)
