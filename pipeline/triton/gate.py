"""verify --repository: the deployment gate for a Triton repository this tool wrote."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.engines.backend import load_recorded_engine
from bert_compiler.pipeline.models import ModelInfo
from bert_compiler.pipeline.triton.package import (
    open_repository,
    rederived_problems,
    tokenizer_mismatches,
)
from bert_compiler.pipeline.verify import REPORT_FILE, VerifySpec, summarize_parity, verify_engine


def verify_repository(
    *,
    info: ModelInfo,
    repository: Path,
    out_root: Path,
    spec: VerifySpec,
    force: bool = False,
    foreign: Sequence[str] = (),
) -> dict[str, Any]:
    """The pre-deployment gate for a Triton repository this tool wrote, for the package of
    ``info`` (a repository may hold several models' packages and, named in ``foreign``, entries
    of the user's own that the gate leaves alone).

    Every file is checked against the repository's manifest (nothing modified, nothing added),
    every config.pbtxt is parsed and cross-checked again, the tokenizer model's tokenizer.json is
    compared with the pipeline's tokenization, and each engine this machine can run is loaded from
    the repository and verified against PyTorch (parity and task metric) into
    ``out_root/<triton model>/``. Engines this machine cannot run (another GPU, no TensorRT) are
    listed as skipped with the reason.

    Returns:
        The summary: ``ok``, the tokenizer check, and one entry per engine model file.

    Raises:
        ArtifactError: the repository does not match its manifest.
        InputError: it was packaged from another model, or a config fails its checks.
        EnvironmentProblem: no engine in it can run on this machine.
    """
    opened = open_repository(repository, foreign=foreign)
    fingerprint = info.fingerprint()["sha256"]
    packages = opened.manifest["inputs"]["packages"]
    slug = next((s for s, p in packages.items() if p["model"]["sha256"] == fingerprint), None)
    if slug is None:
        raise InputError(
            f"{repository}: packaged from another model than {info.path} (it holds "
            f"{', '.join(sorted(packages))}); pass that model with --model"
        )
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
    check = tokenizer_mismatches(info, opened.file(tokenizer_name, "1/tokenizer.json"), max_length)
    entries: list[dict[str, Any]] = []
    by_hash: dict[str, dict[str, Any]] = {}
    for name, record in opened.models.items():
        if record["role"] not in ("engine", "python-engine"):
            continue
        if record["package"] != slug:
            entries.extend(
                {
                    "model": name,
                    "file": relative,
                    "status": "skipped",
                    "reason": f"packaged from {record['package']}: gate it with that --model",
                }
                for relative in record["files"]
            )
            continue
        for relative, entry in record["files"].items():
            label = f"{name}/{relative}"
            if entry["sha256"] in by_hash:
                # The Python-backend model serves a byte-identical copy: one verification.
                entries.append({**by_hash[entry["sha256"]], "model": name, "file": relative})
                continue
            try:
                engine = load_recorded_engine(
                    opened.file(name, relative), entry["spec"], entry["results"]
                )
            except EnvironmentProblem as err:
                entries.append(
                    {"model": name, "file": relative, "status": "skipped", "reason": str(err)}
                )
                continue
            result = verify_engine(
                info=info,
                engine=engine,
                engine_spec=entry["spec"],
                label=label,
                out_dir=Path(out_root) / name / Path(relative).stem,
                spec=replace(spec, precision=entry["spec"]["precision"], max_length=max_length),
                force=force,
            )
            report = result.results
            entries.append(
                {
                    "model": name,
                    "file": relative,
                    "status": "passed" if report["passed"] else "failed",
                    "failures": report["failures"],
                    "parity": summarize_parity(report["parity"]),
                    "metric": {
                        "name": report["metric"]["name"],
                        "value": report["metric"]["value"],
                    },
                    "report": str(result.output(REPORT_FILE)),
                }
            )
            by_hash[entry["sha256"]] = entries[-1]
    ran = [e for e in entries if e["status"] != "skipped"]
    if not ran:
        reasons = "; ".join(e["reason"] for e in entries) or "no engine models"
        raise EnvironmentProblem(
            f"{repository}: no engine in it can run on this machine ({reasons})"
        )
    tokenizer_ok = not check["mismatches"]
    present = sorted(n for n in foreign if (Path(repository) / n).exists())
    return {
        "ok": tokenizer_ok and all(e["status"] == "passed" for e in ran),
        "repository": str(repository),
        "package": slug,
        # Entries the user named as their own: left alone, never verified.
        "foreign": present,
        "tokenizer": {
            "model": tokenizer_name,
            "batches": check["batches"],
            "identical": tokenizer_ok,
            "mismatches": check["mismatches"],
        },
        "engines": entries,
    }
