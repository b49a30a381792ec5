"""package: verified engines -> a Triton model repository.

Only engines whose verify report passed, for the same engine file and the same model, are
packaged. The repository (default ``OUT/triton``) holds, for model M::

    manifest.json                  what was packaged from what; Triton ignores files at the root
    M-tokenizer/                   Python backend: TEXT (strings; a cross-encoder's TEXT_PAIR too)
                                   -> input_ids, attention_mask, ...
        config.pbtxt  1/model.py  1/token_rows.py  1/tokenizer.json
    M-ort-cpu-fp32/                onnxruntime_onnx on KIND_CPU instances (also -int8)
        config.pbtxt  1/model.onnx  warmup/...
    M-ort-cuda-fp16/               onnxruntime_onnx on KIND_GPU, one file per compute capability
        config.pbtxt  1/model.sm90.onnx  1/model.sm80.onnx ...   (cc_model_filenames)
    M-trt-fp16/                    tensorrt_plan, one plan per compute capability, every profile
        config.pbtxt  1/model.sm90.plan ...
    M-<engine model>-text/         ensemble: TEXT -> tokenizer -> engine -> outputs
        config.pbtxt  1/
    M-ort-cpu-fp32-python-text/    --python-cpu-engine: Python backend, TEXT -> outputs in one
                                   process (text_engine_model.py; --python-text ensemble: an
                                   M-ort-cpu-fp32-python engine model and an ensemble instead)
        config.pbtxt  1/model.py  1/tokenizer_model.py  1/token_rows.py
        1/onnxruntime_model.py  1/tokenizer.json  1/model.onnx

No GPU model has a default file: a GPU whose compute capability has no engine fails to load the
model instead of running a plan or graph built for another GPU (hardware-compatible TensorRT
plans are the exception, and are named ``M-trt-ampere_plus-...``).

The tree is built in a hidden folder beside the repository, every config.pbtxt is parsed back
with Triton's protobuf and cross-checked against the engine files and the ensembles' wiring, the
manifest is written last, and the finished tree replaces the old one in two renames.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import (
    ArtifactDir,
    StageRecord,
    atomic_write_text,
    check_free_space,
    clear_leftovers,
    clear_staging,
    is_leftover,
    replace_tree,
    sha256_file,
    sha256_json,
    staging_tree,
    tool_versions,
)
from bert_compiler.core.errors import ArtifactError, InputError
from bert_compiler.core.interrupts import checkpoint
from bert_compiler.core.lock import HOLDER_FILE, LOCK_FILE, output_lock
from bert_compiler.core.outdir import require_writable
from bert_compiler.core.stage import StageResult
from bert_compiler.models.loading import ModelInfo
from bert_compiler.stages.layout import model_slug
from bert_compiler.triton import config as tc
from bert_compiler.triton.package_spec import (
    TEMPLATES,
    PackageSpec,
    VerifiedEngine,
    verified_engines,
)
from bert_compiler.triton.plan import ModelPlan, plan_repository, recorded_results
from bert_compiler.triton.repository import (
    JOURNAL_FILE,
    VERSION,
    check_entries,
    checked_manifest,
    foreign_entries,
    package_models,
    package_outputs,
    repository_problems,
)
from bert_compiler.triton.tokenizer_json import tokenizer_mismatches

log = logging.getLogger("bert_compile")


def _write(plans: list[ModelPlan], folder: Path) -> list[str]:
    """Write every planned model into ``folder``; return the written files (relative)."""
    written = []
    for plan in plans:
        model_dir = folder / plan.name
        (model_dir / VERSION).mkdir(parents=True)
        (model_dir / tc.CONFIG_FILE).write_text(tc.render(plan.config), encoding="utf-8")
        written.append(f"{plan.name}/{tc.CONFIG_FILE}")
        for relative, source in sorted(plan.files.items()):
            target = model_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, Path):
                shutil.copyfile(source, target)
            elif isinstance(source, bytes):
                target.write_bytes(source)
            else:
                target.write_text(source, encoding="utf-8")
            written.append(f"{plan.name}/{relative}")
    return written


@dataclass(frozen=True)
class _Package:
    """One model's package as the manifest seals it: the model, its folder-name prefix (slug),
    the settings, and the inputs (model, engines, templates, tool versions)."""

    info: ModelInfo
    slug: str
    spec: PackageSpec
    inputs: dict[str, Any]
    settings: dict[str, Any]


def package(
    *,
    info: ModelInfo,
    out: Path,
    repository: Path,
    spec: PackageSpec,
    force: bool = False,
    wait_lock: float = 0.0,
) -> StageResult:
    """Add (or replace) the Triton models of the verified engines of ``info`` under ``out`` in
    ``repository``, touching nothing else in it: other models' folders (bert-compile's or a
    user's) and other files stay as they are, and the repository manifest keeps describing every
    package in it. Two packagers of one repository take turns (a lock in it).

    Raises:
        InputError: nothing verified to package, unsafe names, engines that cannot share a model,
            a model folder of the same name that is not this model's, or ``repository`` is a
            non-empty folder this tool did not write.
        ParityError: an engine failed verification.
        ArtifactError: an engine, report or another package's file does not match its manifest.
        BusyError: another packager holds the repository for longer than ``wait_lock`` seconds.
    """
    spec.validate()
    repository = Path(repository)
    engines = verified_engines(info=info, out=out, names=spec.engines)
    # Sealed as the engines selected, not as asked for: `run` names its engines and a later
    # `package` of the same engines names none, and the two must agree on being up to date.
    spec = replace(spec, engines=tuple(sorted(e.name for e in engines)))
    # The ladder goes into the sealed settings: the gate plans again from exactly this one.
    spec = spec.with_ladder(info, engines[0].max_length)
    slug = tc.check_name(model_slug(info.name), "model name")
    this = _Package(info, slug, spec, _package_inputs(info, engines), asdict(spec))
    check_repository_target(repository)
    with output_lock(repository, wait_s=wait_lock):
        # Again under the lock: another packager may have written it meanwhile.
        check_repository_target(repository)
        folder = ArtifactDir(repository)
        existing, own = _open_existing(folder, slug)
        _check_same_model(this, repository, existing, force)
        if (
            not force
            and existing
            and _up_to_date(folder, existing, slug, this.inputs, this.settings)
        ):
            log.info("[package] up to date: %s (%s)", repository, slug)
            return StageResult("package", repository, existing, skipped=True)
        log.info("[package] writing %s into the Triton repository %s", slug, repository)
        started = time.perf_counter()
        plans = plan_repository(info=info, engines=engines, spec=spec)
        others = _check_room(this, folder, existing, plans, own)
        outputs, check, records = _write_and_swap(
            this, plans, repository, own, max_length=engines[0].max_length
        )
        record, results = _package_record(this, existing, records, own, check)
        manifest = folder.commit(
            record,
            [*sorted(others), *outputs],
            {**results, "seconds": round(time.perf_counter() - started, 3)},
        )
        # The manifest now describes every folder the journal named.
        (repository / JOURNAL_FILE).unlink(missing_ok=True)
    log.info("[package] %d models: %s", len(plans), ", ".join(p.name for p in plans))
    return StageResult("package", repository, manifest, skipped=False)


def _package_inputs(info: ModelInfo, engines: list[VerifiedEngine]) -> dict[str, Any]:
    """What the package is made from, as its manifest seals it."""
    return {
        "model": info.fingerprint(),
        # Each engine's build spec and results too: sealed with the manifest, so the gate can
        # tell an edited model record from the one package wrote.
        "engines": {
            e.name: {
                "sha256": e.engine_sha256,
                "report": e.report.get("summary"),
                "spec": dict(e.spec),
                "results": recorded_results(e.results),
            }
            for e in engines
        },
        "templates": {role: sha256_file(path) for role, path in TEMPLATES.items()},
        # This package's own tool versions: another package written later by another version
        # of the tool must not make this one look up to date.
        "versions": tool_versions(),
    }


def _open_existing(folder: ArtifactDir, slug: str) -> tuple[dict[str, Any] | None, set[str]]:
    """The repository's manifest, checked (None for a new repository), and the model folders of
    package ``slug`` in it: those its manifest names, and those an interrupted package of it
    swapped in before it could record them. Leftovers of an interrupted write are cleared.

    Raises:
        ArtifactError: the manifest or an entry does not check, or an interrupted package of
            another model must be finished first.
    """
    repository = folder.path
    clear_leftovers(repository)
    # Model folders an interrupted package of this model swapped in before it could record
    # them: its own. An interrupted package of another model must be finished first.
    pending = _pending_models(repository, slug)
    existing = folder.read_manifest()
    if existing is not None:
        existing = checked_manifest(folder, existing)
        # No link or stray entry inside the packages' folders; a user's own entries beside
        # them, and the pending folders, are left alone.
        check_entries(repository, existing, foreign=foreign_entries(repository, existing) | pending)
    own = (package_models(existing, slug) if existing else set()) | pending
    return existing, own


def _check_same_model(
    this: _Package, repository: Path, existing: Mapping[str, Any] | None, force: bool
) -> None:
    """Raises InputError when the repository's package of this slug is of another model (and
    ``force`` does not replace it)."""
    section = (existing or {}).get("inputs", {}).get("packages", {}).get(this.slug)
    if section and section["model"]["sha256"] != this.inputs["model"]["sha256"] and not force:
        raise InputError(
            f"{repository}: its package {this.slug!r} is of another model (a folder of the same "
            f"name than {this.info.path}); rename this model's folder, or pass --force to replace "
            "that package"
        )


def _check_room(
    this: _Package,
    folder: ArtifactDir,
    existing: Mapping[str, Any] | None,
    plans: list[ModelPlan],
    own: set[str],
) -> dict[str, Any]:
    """Check that the planned model folders are free or this package's, that the other packages'
    files are intact, and that the disk holds the new folders beside the old ones; returns the
    other packages' outputs (name -> manifest entry).

    Raises:
        InputError: a planned folder is another model's or a user's.
        ArtifactError: another package's file does not match the manifest.
    """
    repository = folder.path
    names = {p.name for p in plans}
    taken = sorted(n for n in names if os.path.lexists(repository / n) and n not in own)
    if taken:
        raise InputError(
            f"{repository}: model folders {taken} exist and are not {this.info.name}'s (another "
            "model's, or your own); rename the model or package into another --repository"
        )
    others = package_outputs(existing, set(existing["results"]["models"]) - own) if existing else {}
    for name, entry in others.items():
        folder.check_output(name, entry)
    # The new model folders are complete beside the old ones before they swap: room for both.
    check_free_space(
        repository,
        sum(Path(f).stat().st_size for p in plans for f in p.files.values() if isinstance(f, Path)),
    )
    return others


def _write_and_swap(
    this: _Package, plans: list[ModelPlan], repository: Path, own: set[str], *, max_length: int
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    """Write the planned models into a staging tree, check them (the tokenizer model against
    verify's tokenization, every config), and swap them into the repository under a journal;
    this package's stale folders are removed. Returns (the files written, relative to the
    repository; the tokenizer check; the model records).

    Raises:
        InputError: the tokenizer model or a config fails its check.
    """
    names = {p.name for p in plans}
    tokenizer = next(p for p in plans if p.role == "tokenizer")
    staging = staging_tree(repository / this.slug)
    try:
        outputs = _write(plans, staging)
        check = tokenizer_mismatches(
            this.info,
            staging / tokenizer.name / VERSION / "tokenizer.json",
            max_length,
            this.spec.length_ladder,
        )
        if check["mismatches"]:
            raise InputError(
                f"{this.info.path}: the tokenizer model would not tokenize as verify did: "
                + "; ".join(check["mismatches"][:3])
            )
        records = {p.name: {**p.record, "package": this.slug} for p in plans}
        problems = repository_problems(staging, records)
        if problems:
            raise InputError("generated repository fails its checks: " + "; ".join(problems))
        checkpoint()
        journal = {"package": this.slug, "models": sorted(names | own)}
        atomic_write_text(repository / JOURNAL_FILE, json.dumps(journal) + "\n")
        for plan in plans:
            replace_tree(staging / plan.name, repository / plan.name)
        for stale in sorted(own - names):
            shutil.rmtree(repository / stale, ignore_errors=True)
    finally:
        clear_staging(repository / this.slug)
    return outputs, check, records


def _package_record(
    this: _Package,
    existing: Mapping[str, Any] | None,
    records: dict[str, Any],
    own: set[str],
    check: Mapping[str, Any],
) -> tuple[StageRecord, dict[str, Any]]:
    """The repository manifest's record and results with this package in them (the other
    packages' kept as they were)."""
    previous = existing or {"inputs": {}, "spec": {}, "results": {}}
    packages = dict(previous["results"].get("packages", {}))
    packages[this.slug] = {
        "model": {"name": this.info.name, "task": this.info.task},
        "tokenizer_check": {"batches": check["batches"], "identical": True},
        "length_ladder": list(this.spec.length_ladder),
    }
    other_records = {n: r for n, r in previous["results"].get("models", {}).items() if n not in own}
    record = StageRecord(
        stage="package",
        inputs={
            "packages": {
                **previous["inputs"].get("packages", {}),
                # The package's model records, sealed: an edited record is refused.
                this.slug: {**this.inputs, "records": sha256_json(records)},
            }
        },
        spec={"packages": {**previous["spec"].get("packages", {}), this.slug: this.settings}},
    )
    return record, {"models": {**other_records, **records}, "packages": packages}


def _pending_models(repository: Path, slug: str) -> set[str]:
    """The model folders an interrupted package of ``slug`` was swapping in (its journal).

    Raises:
        ArtifactError: the journal is unreadable, or names another model's interrupted package.
    """
    path = repository / JOURNAL_FILE
    if not path.is_file():
        return set()
    try:
        journal = json.loads(path.read_bytes().decode("utf-8"))
        package, models = journal["package"], set(journal["models"])
        if not isinstance(package, str) or not all(isinstance(m, str) for m in models):
            raise TypeError("wrong types")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: unreadable ({err}); remove it and package again") from err
    if package != slug:
        raise ArtifactError(
            f"{repository}: the package of {package!r} into it was interrupted; package that "
            "model again first"
        )
    return models


def _up_to_date(
    folder: ArtifactDir,
    manifest: Mapping[str, Any],
    slug: str,
    inputs: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> bool:
    """True when the repository already holds exactly this package, made by these tool versions,
    with every one of its files unchanged."""
    if not manifest.get("complete"):
        return False
    # The package's own inputs hold the tool versions it was written with.
    recorded = {
        k: v for k, v in manifest["inputs"]["packages"].get(slug, {}).items() if k != "records"
    }
    recorded_spec = manifest["spec"]["packages"].get(slug)
    if sha256_json(recorded) != sha256_json(inputs) or sha256_json(recorded_spec) != sha256_json(
        settings
    ):
        return False
    try:
        for name, entry in package_outputs(manifest, package_models(manifest, slug)).items():
            folder.check_output(name, entry)
    except ArtifactError:
        return False
    return True


def check_repository_target(repository: Path) -> None:
    """Write only where the repository can be written, and only into an empty folder or a
    repository this tool wrote (never a user's folder). A folder holding nothing but a
    packager's lock is empty: another packager is making it.

    Raises:
        InputError: a read-only place, a file, or a user's non-empty folder.
    """
    repository = Path(repository)
    require_writable(repository.parent, "--repository")
    if not repository.exists():
        return
    if not repository.is_dir():
        raise InputError(f"{repository}: exists and is not a folder; choose another --repository")
    try:
        manifest = ArtifactDir(repository).read_manifest()
    except ArtifactError:
        manifest = None
    # A packager's lock, its journal and its staging leftovers are this tool's: a folder holding
    # nothing else is empty (a first package was interrupted, or another one is making it).
    bookkeeping = {LOCK_FILE, HOLDER_FILE, JOURNAL_FILE}
    contents = [
        e for e in repository.iterdir() if e.name not in bookkeeping and not is_leftover(e.name)
    ]
    journal = (repository / JOURNAL_FILE).is_file()
    if contents and (manifest or {}).get("stage") != "package" and not journal:
        raise InputError(
            f"{repository}: not empty and not a repository bert-compile wrote; choose another "
            "--repository or remove it"
        )


@dataclass(frozen=True)
class PackagedRepository:
    """A repository `package` wrote (or found up to date): each model's name and role."""

    path: Path
    skipped: bool
    models: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        """The part of ``run --json`` / ``package --json`` that describes a repository."""
        return {"path": str(self.path), "skipped": self.skipped, "models": dict(self.models)}

    def lines(self) -> str:
        return "\n".join(
            [f"repository: {self.path}"]
            + [f"  {name} ({role})" for name, role in self.models.items()]
        )


def repository_summary(result: StageResult) -> PackagedRepository:
    """What ``package`` returned, as run and the CLI report it."""
    models = result.results.get("models", {})
    return PackagedRepository(
        result.path, result.skipped, {name: record["role"] for name, record in models.items()}
    )
