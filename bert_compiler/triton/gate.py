"""verify --repository: the deployment gate for a Triton repository this tool wrote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import sha256_file, sha256_json
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.engines.backend import load_recorded_engine
from bert_compiler.models.loading import ModelInfo
from bert_compiler.stages.verify import (
    REPORT_FILE,
    Metric,
    ParitySummary,
    VerifySpec,
    format_metric,
    or_nan,
    summarize_parity,
    verify_engine,
)
from bert_compiler.triton import config as tc
from bert_compiler.triton.package_spec import (
    TEMPLATES,
    PackageSpec,
    VerifiedEngine,
)
from bert_compiler.triton.plan import ModelPlan, plan_repository
from bert_compiler.triton.repository import (
    ENGINE_ROLES,
    SOURCE_ROLES,
    Repository,
    engine_tensors,
    open_repository,
)
from bert_compiler.triton.tokenizer_json import tokenizer_mismatches
from bert_compiler.triton.tokenizer_model import LADDER_PARAMETER, parse_ladder

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class GatedEngine:
    """One engine model file of the repository: passed or failed against PyTorch, or skipped
    with the reason (another package's, or one this machine cannot run)."""

    model: str
    file: str
    status: str
    reason: str | None = None
    failures: tuple[str, ...] = ()
    parity: ParitySummary | None = None
    metric: Metric | None = None
    report: Path | None = None

    @property
    def label(self) -> str:
        return f"{self.model}/{self.file}"

    def to_json(self) -> dict[str, Any]:
        head = {"model": self.model, "file": self.file, "status": self.status}
        if self.status == SKIPPED:
            return {**head, "reason": self.reason}
        assert self.parity is not None and self.metric is not None
        return {
            **head,
            "failures": list(self.failures),
            "parity": self.parity.to_json(),
            "metric": self.metric.to_json(),
            "report": str(self.report),
        }

    def line(self) -> str:
        if self.status == SKIPPED:
            return f"SKIP {self.label}: {self.reason}"
        assert self.parity is not None and self.metric is not None
        return (
            f"{self.status.upper()} {self.label}: min_cosine={or_nan(self.parity.min_cosine):.6f} "
            f"{self.metric.name}={format_metric(self.metric.value)}"
        )


@dataclass(frozen=True)
class TokenizerCheck:
    """The tokenizer model's tokenizer.json against the pipeline's tokenization."""

    model: str
    batches: int
    length_ladder: tuple[int, ...]
    mismatches: tuple[str, ...]

    @property
    def identical(self) -> bool:
        return not self.mismatches

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batches": self.batches,
            "identical": self.identical,
            "length_ladder": list(self.length_ladder),
            "mismatches": list(self.mismatches),
        }


@dataclass(frozen=True)
class RepositoryReport:
    """What the gate found: ``ok`` only when the tokenizer matches and every engine it ran
    passed."""

    repository: Path
    package: str
    reports: Path
    # Entries the user named as their own: left alone, never verified.
    foreign: tuple[str, ...]
    tokenizer: TokenizerCheck
    engines: tuple[GatedEngine, ...]

    @property
    def ok(self) -> bool:
        ran = [e for e in self.engines if e.status != SKIPPED]
        return self.tokenizer.identical and all(e.status == PASSED for e in ran)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "repository": str(self.repository),
            "package": self.package,
            "reports": str(self.reports),
            "foreign": list(self.foreign),
            "tokenizer": self.tokenizer.to_json(),
            "engines": [engine.to_json() for engine in self.engines],
        }

    def lines(self) -> str:
        """The tokenizer check, the foreign entries, where the reports are, each engine."""
        tokenizer = self.tokenizer
        return "\n".join(
            [
                f"{'PASS' if tokenizer.identical else 'FAIL'} tokenizer {tokenizer.model}: "
                f"{tokenizer.batches} batches compared with the pipeline's tokenization",
                *(f"FOREIGN {name}: yours, left alone (not verified)" for name in self.foreign),
                f"reports: {self.reports}",
                *(engine.line() for engine in self.engines),
            ]
        )

    def failures(self) -> str:
        """Each failed engine and the first tokenizer mismatches, for the one-line error."""
        failed = [f"{e.label}: {'; '.join(e.failures)}" for e in self.engines if e.status == FAILED]
        failed += [f"tokenizer: {m}" for m in self.tokenizer.mismatches[:3]]
        return f"{self.repository}: " + " | ".join(failed)


def verify_repository(
    *,
    info: ModelInfo,
    repository: Path,
    out_root: Path,
    spec: VerifySpec,
    force: bool = False,
    foreign: Sequence[str] = (),
) -> RepositoryReport:
    """The pre-deployment gate for a Triton repository this tool wrote, for the package of
    ``info`` (a repository may hold several models' packages and, named in ``foreign``, entries
    of the user's own that the gate leaves alone).

    Every file is checked against the repository's manifest (nothing modified, nothing added),
    every config.pbtxt is parsed and cross-checked again, the tokenizer model's tokenizer.json is
    compared with the pipeline's tokenization, and each engine this machine can run is loaded from
    the repository and verified against PyTorch (parity and task metric) into
    ``out_root/<triton model>/``. Engines this machine cannot run (another GPU, no TensorRT) are
    listed as skipped with the reason.

    Raises:
        ArtifactError: the repository does not match its manifest.
        InputError: it was packaged from another model, or a config fails its checks.
        EnvironmentProblem: no engine in it can run on this machine.
    """
    opened = open_repository(repository, foreign=foreign)
    slug = _package_of(opened, info, repository)
    rederived = rederived_problems(opened, info, slug)
    if rederived:
        raise ArtifactError(
            f"{repository}: not what package writes for its recorded settings: "
            + "; ".join(rederived[:3])
            + "; package again"
        )
    tokenizer_name, tokenizer = next(
        (n, r)
        for n, r in opened.models.items()
        if r["role"] == "tokenizer" and r["package"] == slug
    )
    max_length = tokenizer["max_length"]
    # The ladder Triton will use: the tokenizer config's (the one package writes for the sealed
    # settings, as checked above).
    ladder = tokenizer_ladder(opened.path / tokenizer_name / tc.CONFIG_FILE)
    check = tokenizer_mismatches(
        info, opened.file(tokenizer_name, "1/tokenizer.json"), max_length, ladder
    )
    entries = _gate_engines(
        opened, info, slug, out_root=out_root, spec=spec, force=force, max_length=max_length
    )
    ran = [e for e in entries if e.status != SKIPPED]
    if not ran:
        reasons = "; ".join(str(e.reason) for e in entries) or "no engine models"
        raise EnvironmentProblem(
            f"{repository}: no engine in it can run on this machine ({reasons})"
        )
    present = sorted(n for n in foreign if (Path(repository) / n).exists())
    return RepositoryReport(
        repository=Path(repository),
        package=slug,
        reports=Path(out_root),
        foreign=tuple(present),
        tokenizer=TokenizerCheck(
            tokenizer_name, check["batches"], tuple(ladder), tuple(check["mismatches"])
        ),
        engines=tuple(entries),
    )


def _package_of(opened: Repository, info: ModelInfo, repository: Path) -> str:
    """The package (slug) of ``info`` in the repository.

    Raises:
        InputError: the repository holds no package of this model.
    """
    fingerprint = info.fingerprint()["sha256"]
    packages = opened.manifest["inputs"]["packages"]
    slug = next((s for s, p in packages.items() if p["model"]["sha256"] == fingerprint), None)
    if slug is None:
        raise InputError(
            f"{repository}: packaged from another model than {info.path} (it holds "
            f"{', '.join(sorted(packages))}); pass that model with --model"
        )
    return slug


def _gate_engines(
    opened: Repository,
    info: ModelInfo,
    slug: str,
    *,
    out_root: Path,
    spec: VerifySpec,
    force: bool,
    max_length: int,
) -> list[GatedEngine]:
    """One entry per engine model file of the repository: verified when it is package
    ``slug``'s and this machine runs it (a byte-identical copy verified once), else skipped
    with the reason."""
    entries: list[GatedEngine] = []
    by_hash: dict[str, GatedEngine] = {}
    for name, record in opened.models.items():
        if record["role"] not in ENGINE_ROLES:
            continue
        if record["package"] != slug:
            why = f"packaged from {record['package']}: gate it with that --model"
            entries.extend(
                GatedEngine(name, relative, SKIPPED, reason=why) for relative in record["files"]
            )
            continue
        for relative, entry in record["files"].items():
            if entry["sha256"] in by_hash:
                # A Python-backend model serves a byte-identical copy: one verification.
                entries.append(replace(by_hash[entry["sha256"]], model=name, file=relative))
                continue
            gated = _gate_engine_file(
                opened,
                info,
                name,
                relative,
                entry,
                out_dir=Path(out_root) / name / Path(relative).stem,
                spec=replace(spec, precision=entry["spec"]["precision"], max_length=max_length),
                force=force,
            )
            entries.append(gated)
            if gated.status != SKIPPED:
                by_hash[entry["sha256"]] = gated
    return entries


def _gate_engine_file(
    opened: Repository,
    info: ModelInfo,
    name: str,
    relative: str,
    entry: dict[str, Any],
    *,
    out_dir: Path,
    spec: VerifySpec,
    force: bool,
) -> GatedEngine:
    """Load one engine file from the repository and verify it against PyTorch into
    ``out_dir``: its entry (skipped, with the reason, where this machine cannot run it).

    Raises:
        ArtifactError: the file changed while it was verified.
    """
    label = f"{name}/{relative}"
    try:
        engine = load_recorded_engine(opened.file(name, relative), entry["spec"], entry["results"])
    except EnvironmentProblem as err:
        return GatedEngine(name, relative, SKIPPED, reason=str(err))
    result = verify_engine(
        info=info,
        engine=engine,
        engine_spec=entry["spec"],
        label=label,
        out_dir=out_dir,
        spec=spec,
        force=force,
    )
    # What was verified is the file as it was loaded: it must still be the one recorded
    # (a file replaced during the run would be deployed unverified).
    if sha256_file(opened.file(name, relative)) != entry["sha256"]:
        raise ArtifactError(
            f"{label}: changed while the gate verified it; run verify --repository again"
        )
    report = result.results
    return GatedEngine(
        name,
        relative,
        PASSED if report["passed"] else FAILED,
        failures=tuple(report["failures"]),
        parity=summarize_parity(report["parity"]),
        metric=Metric.of(report["metric"]),
        report=result.output(REPORT_FILE),
    )


def tokenizer_ladder(config_path: Path) -> tuple[int, ...]:
    """The length ladder a tokenizer model's config.pbtxt gives it.

    Raises:
        ArtifactError: the parameter is not a ladder.
    """
    config = tc.parse(config_path.read_text(encoding="utf-8"), config_path)
    text = config.parameters[LADDER_PARAMETER].string_value
    try:
        return parse_ladder(text)
    except ValueError as err:
        raise ArtifactError(f"{config_path}: {err}") from err


def rederived_problems(opened: Repository, info: ModelInfo, slug: str) -> list[str]:
    """Plan the package ``slug`` again from what the manifest recorded (the sealed package
    settings and engine records, the engines' tensors as the repository holds them) and compare:
    every config.pbtxt must be the one package would write, every generated file (tokenizer.json,
    warmup tokens) byte-identical, every Python model's code this bert-compile's, every engine
    copy the engine model's file, every model record the one package writes, and every engine
    record the one sealed in the manifest. An edited config with its hash rewritten fails here.

    Returns:
        One line per difference (empty when the package is exactly what package writes).
    """
    manifest = opened.manifest
    sealed_inputs = manifest["inputs"]["packages"][slug]
    settings = dict(manifest["spec"]["packages"][slug])
    # A package written before --python-text served Python engines through the ensemble.
    settings.setdefault("python_text", "ensemble")
    try:
        settings["engines"] = tuple(settings.get("engines", ()))
        settings["length_ladder"] = tuple(settings.get("length_ladder", ()))
        spec = PackageSpec(**settings)
        spec.validate()
    except (TypeError, ValueError, InputError) as err:
        return [f"{slug}: recorded package settings are not package's ({err})"]
    own = {n: r for n, r in opened.models.items() if r["package"] == slug}
    engines, problems = _recorded_engines(opened, own, sealed_inputs.get("engines", {}))
    if problems or not engines:
        return problems or [f"{slug}: no engine model to plan from"]
    plans = plan_repository(info=info, engines=engines, spec=spec)
    if {p.name for p in plans} != set(own):
        return [
            f"{slug}: package would write models {sorted(p.name for p in plans)}, the "
            f"repository holds {sorted(own)}"
        ]
    # Exactly the files package writes: an added file (a version folder 2/ with its own engine,
    # listed in the manifest) is no file of the plan.
    planned = {
        f"{plan.name}/{relative}" for plan in plans for relative in [tc.CONFIG_FILE, *plan.files]
    }
    listed = {o for o in manifest["outputs"] if o.split("/", 1)[0] in own}
    problems.extend(f"{name}: not a file package writes" for name in sorted(listed - planned))
    problems.extend(f"{name}: missing" for name in sorted(planned - listed))
    problems.extend(_plan_differences(opened, plans, own))
    return problems


def _recorded_engines(
    opened: Repository, own: Mapping[str, Mapping[str, Any]], sealed_engines: Mapping[str, Any]
) -> tuple[list[VerifiedEngine], list[str]]:
    """The engines a package's model records describe, as package planned from them, and one
    line per record whose engine hash, spec or results differ from those sealed in the
    manifest (``sealed_engines``)."""
    problems: list[str] = []
    engines: list[VerifiedEngine] = []
    for name, record in own.items():
        if record["role"] not in ENGINE_ROLES:
            continue
        for relative, entry in record["files"].items():
            sealed = sealed_engines.get(entry["engine"], {})
            for key in ("sha256", "spec", "results"):
                if key in sealed and sha256_json(sealed[key]) != sha256_json(entry[key]):
                    problems.append(f"{name}/{relative}: its record's {key} was edited")
            if record["role"] not in SOURCE_ROLES:
                continue  # a copy: its file and record are compared with the plan's below
            path = opened.file(name, relative)
            engines.append(
                VerifiedEngine(
                    name=entry["engine"],
                    folder=path.parent,
                    spec=entry["spec"],
                    results=entry["results"],
                    engine_file=path,
                    engine_sha256=entry["sha256"],
                    report=entry["verification"],
                    max_length=record["max_length"],
                    io=engine_tensors(path, record),
                )
            )
    return engines, problems


def _plan_differences(
    opened: Repository, plans: Sequence[ModelPlan], own: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """One line per planned model whose record, config or files in the repository differ from
    what package writes."""
    problems: list[str] = []
    for plan in plans:
        recorded = {k: v for k, v in own[plan.name].items() if k != "package"}
        if sha256_json(recorded) != sha256_json(plan.record):
            problems.append(f"{plan.name}: its manifest record is not the one package writes")
        config_path = opened.path / plan.name / tc.CONFIG_FILE
        if tc.parse(config_path.read_text(encoding="utf-8"), config_path) != plan.config:
            problems.append(
                f"{config_path}: not the config package writes for the recorded settings"
            )
        for relative, source in plan.files.items():
            target = opened.path / plan.name / relative
            if isinstance(source, Path):
                # A Python model's code (a template of this bert-compile: the parity run never
                # runs it, so it must be exactly the code this version writes), or an engine
                # file: the engine model's own (its hash is its record's, checked above), or a
                # copy of it in a Python-backend model, which must be byte-identical to it.
                role = next((r for r, t in TEMPLATES.items() if t == source), None)
                if target.resolve() != source.resolve() and sha256_file(target) != sha256_file(
                    source
                ):
                    what = f"the {role} code this bert-compile writes" if role else f"{source}"
                    problems.append(f"{target}: not {what}")
                continue
            expected = source if isinstance(source, bytes) else source.encode("utf-8")
            if target.read_bytes() != expected:
                problems.append(f"{target}: not what package writes")
    return problems
