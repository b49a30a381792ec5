"""The whole chain: export -> simplify -> fuse -> build -> verify, skipping what is up to date.

Output tree under ``out``::

    export/    model.onnx + manifest.json
    simplify/  model.onnx + manifest.json
    fuse/      model.onnx + manifest.json
    calibrate/ model.onnx (Q/DQ INT8, standard ops: the input of every INT8 engine), scales.json,
               calibration.cache (TensorRT) + manifest.json
    engines/<model>/<engine>/  engine + manifest.json; <engine> names backend and version, device
                               or GPU, precision: ort1.32.0-cpu-fp32, trt10.13.3-sm90-fp16 ...
    engines/timing-cache/      TensorRT timing caches, one per TensorRT version and GPU
    verify/<model>/<engine>/   report.json + manifest.json
    triton/                    Triton model repository of the run's engines (pipeline/triton/package.py)
    run.json   the summary ``run --json`` prints
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import atomic_write_text
from bert_compiler.pipeline.build import BuildSpec, backend_version, build, engine_name, model_slug
from bert_compiler.pipeline.calibrate import CalibrationSpec, calibrate, rank_for_fallback
from bert_compiler.pipeline.export import MODEL_FILE, ExportSpec, export
from bert_compiler.pipeline.fuse import FuseSpec, fuse
from bert_compiler.pipeline.models import ModelInfo
from bert_compiler.pipeline.simplify import SimplifySpec, simplify
from bert_compiler.pipeline.triton.package import (
    REPOSITORY_FOLDER,
    PackageSpec,
    package,
    repository_summary,
)
from bert_compiler.pipeline.verify import REPORT_FILE, VerifySpec, summarize_parity, verify

SUMMARY_FILE = "run.json"
log = logging.getLogger("bert_compile")


@dataclass(frozen=True)
class Layout:
    """Where each stage of one run writes."""

    root: Path

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def simplify(self) -> Path:
        return self.root / "simplify"

    @property
    def fuse(self) -> Path:
        return self.root / "fuse"

    def engine(self, model: str, name: str) -> Path:
        return self.root / "engines" / model_slug(model) / name

    def timing_cache(self, tensorrt_version: str, compute_capability: str) -> Path:
        sm = compute_capability.replace(".", "")
        return self.root / "engines" / "timing-cache" / f"trt{tensorrt_version}-sm{sm}.cache"

    @property
    def calibrate(self) -> Path:
        return self.root / "calibrate"

    def verify(self, model: str, name: str) -> Path:
        return self.root / "verify" / model_slug(model) / name


@dataclass(frozen=True)
class RunSpec:
    """Settings of a whole run, one spec per stage."""

    export: ExportSpec = ExportSpec()
    simplify: SimplifySpec = SimplifySpec()
    fuse: FuseSpec = FuseSpec()
    builds: tuple[BuildSpec, ...] = (BuildSpec(),)
    verify: VerifySpec = VerifySpec()
    calibration: CalibrationSpec = CalibrationSpec()
    fallback: bool = True
    profile_max_batch: int = 64
    profile_buckets: int = 2
    package: PackageSpec | None = None
    repository: Path | None = None


def run_pipeline(
    *, info: ModelInfo, out: Path, spec: RunSpec, force: bool = False
) -> dict[str, Any]:
    """Run every stage for ``info`` into ``out`` and return the summary (also written to run.json).

    A failed verification does not raise here: the summary's ``ok`` is False and each engine lists
    its failures, so callers (the CLI, CI) get the full report before deciding how to fail.
    """
    layout = Layout(Path(out))
    stages = {}
    exported = export(info=info, out_dir=layout.export, spec=spec.export, force=force)
    simplified = simplify(
        source=exported.output(MODEL_FILE), out_dir=layout.simplify, spec=spec.simplify, force=force
    )
    fused = fuse(
        info=info,
        source=simplified.output(MODEL_FILE),
        out_dir=layout.fuse,
        spec=spec.fuse,
        force=force,
    )
    for result in (exported, simplified, fused):
        stages[result.stage] = _stage_summary(result)
    engines = []
    pytorch_metric = None
    graphs = {"simplify": simplified.output(MODEL_FILE), "fuse": fused.output(MODEL_FILE)}
    for requested in spec.builds:
        build_spec = resolve_build_spec(requested, info=info, layout=layout, spec=spec)
        if build_spec.precision == "int8":
            built, verified, fallback = _int8_with_fallback(
                info=info,
                layout=layout,
                float_graph=graphs["simplify"],
                build_spec=build_spec,
                spec=spec,
                force=force,
                stages=stages,
            )
        else:
            built, verified = _build_and_verify(
                info=info,
                layout=layout,
                source=graphs[build_spec.source_stage],
                build_spec=build_spec,
                spec=spec,
                force=force,
                stages=stages,
            )
            fallback = None
        report = verified.results
        pytorch_metric = report["pytorch_metric"]
        engines.append(
            {
                "backend": build_spec.backend,
                "precision": build_spec.precision,
                "device": build_spec.device,
                "compute_capability": build_spec.compute_capability or None,
                "name": built.path.name,
                "path": str(built.output(built.results["engine_file"])),
                "manifest": str(built.path / "manifest.json"),
                "report": str(verified.output(REPORT_FILE)),
                "parity": summarize_parity(report["parity"]),
                "metric": {"name": report["metric"]["name"], "value": report["metric"]["value"]},
                "passed": report["passed"],
                "failures": report["failures"],
                **({"fallback": fallback} if fallback is not None else {}),
            }
        )
    ok = all(e["passed"] for e in engines)
    repository = None
    if ok and spec.package is not None:
        # Only this run's engines: older engine folders under OUT are not silently shipped.
        packaged = package(
            info=info,
            out=layout.root,
            repository=spec.repository or layout.root / REPOSITORY_FOLDER,
            spec=replace(spec.package, engines=tuple(e["name"] for e in engines)),
            force=force,
        )
        stages["package"] = _stage_summary(packaged)
        repository = repository_summary(packaged)
    summary = {
        "ok": ok,
        "model": {"name": info.name, "path": str(info.path), "task": info.task},
        "out": str(layout.root),
        "fused_operators": fused.results.get("fused_operators", {}),
        "pytorch_fp32_metric": pytorch_metric
        and {"name": pytorch_metric["name"], "value": pytorch_metric["value"]},
        "engines": engines,
        "repository": repository,
        "stages": stages,
    }
    atomic_write_text(layout.root / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def resolve_build_spec(
    requested: BuildSpec, *, info: ModelInfo, layout: Layout, spec: RunSpec
) -> BuildSpec:
    """Fill in what a GPU build learns from this machine and the data: the compute capability,
    TensorRT profiles derived from the calibration sentences' token lengths, and the timing cache
    shared by every TensorRT build of this output tree."""
    requested.validate()
    if requested.device != "cuda":
        return requested
    resolved = requested
    if not resolved.compute_capability:
        from bert_compiler.core.targets import current_gpu

        capability, _ = current_gpu("a CUDA engine (use --target auto to fall back to the CPU)")
        resolved = replace(resolved, compute_capability=capability)
    if resolved.backend == "tensorrt":
        options = resolved.tensorrt
        if not options.profiles:
            options = replace(options, profiles=derive_dataset_profiles(info, spec))
        if not options.timing_cache:
            cache = layout.timing_cache(backend_version("tensorrt"), resolved.compute_capability)
            options = replace(options, timing_cache=str(cache))
        resolved = replace(resolved, tensorrt=options)
    return resolved


def derive_dataset_profiles(info: ModelInfo, spec: RunSpec):
    """TensorRT profiles from the token lengths of the calibration sentences (engines/tensorrt)."""
    from bert_compiler.calibration import datasets
    from bert_compiler.engines.tensorrt import derive_profiles
    from bert_compiler.pipeline.models import load_tokenizer
    from bert_compiler.pipeline.verify import resolve_max_length

    max_length = resolve_max_length(info, spec.verify.max_length)
    texts = datasets.load_texts(spec.calibration.data_file(), column=spec.calibration.text_column)
    tokenizer = load_tokenizer(info)
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ]
    profiles = derive_profiles(
        lengths,
        max_batch=spec.profile_max_batch,
        max_length=max_length,
        buckets=spec.profile_buckets,
    )
    log.info(
        "[build] TensorRT profiles from %d sentences: %s",
        len(lengths),
        ", ".join(str(p) for p in profiles),
    )
    return profiles


def engine_folder_name(build_spec: BuildSpec) -> str:
    return engine_name(build_spec, backend_version(build_spec.backend))


def _build_and_verify(*, info, layout, source, build_spec, spec, force, stages):
    name = engine_folder_name(build_spec)
    built = build(
        source=source,
        out_dir=layout.engine(info.name, name),
        spec=build_spec,
        input_names=tuple(info.architecture.input_names),
        force=force,
    )
    verified = verify(
        info=info,
        engine_dir=built.path,
        out_dir=layout.verify(info.name, name),
        spec=replace(spec.verify, precision=build_spec.precision),
        force=force,
    )
    stages[f"build:{name}"] = _stage_summary(built)
    stages[f"verify:{name}"] = _stage_summary(verified)
    return built, verified


def _int8_with_fallback(*, info, layout, float_graph, build_spec, spec, force, stages):
    """Calibrate, build and verify; while the gate fails, keep the next most sensitive MatMul in
    float and try again, until the engine passes or nothing is left to keep."""
    kept: list[str] = []
    ranking = None
    steps = []
    while True:
        calibrated = calibrate(
            info=info,
            source=float_graph,
            out_dir=layout.calibrate,
            spec=replace(spec.calibration, keep_float=tuple(kept)),
            force=force,
        )
        stages["calibrate"] = _stage_summary(calibrated)
        built, verified = _build_and_verify(
            info=info,
            layout=layout,
            source=calibrated.output(MODEL_FILE),
            build_spec=build_spec,
            spec=spec,
            force=force,
            stages=stages,
        )
        steps.append(
            {
                "kept_float": list(kept),
                "metric": verified.results["metric"]["value"],
                "passed": verified.results["passed"],
            }
        )
        if verified.results["passed"] or not spec.fallback:
            break
        if ranking is None:
            log.info("[fallback] INT8 gate failed; ranking MatMuls by sensitivity")
            ranking = rank_for_fallback(
                info=info, float_source=float_graph, calibrated=calibrated, spec=spec.calibration
            )
        remaining = [s for s in ranking if s.node not in kept]
        if not remaining:
            break
        kept.append(remaining[0].node)
        log.info(
            "[fallback] keeping %s in float (error alone %.2e)",
            remaining[0].node,
            remaining[0].error,
        )
    fallback = {
        "kept_float": kept,
        "steps": steps,
        "ranking": [{"node": s.node, "error": s.error} for s in ranking or []],
    }
    return built, verified, fallback


def _stage_summary(result) -> dict[str, Any]:
    return {
        "path": str(result.path),
        "skipped": result.skipped,
        "seconds": result.results.get("seconds"),
    }


def find_engine(
    layout: Layout, model: str, engine_dir: Path | None, precision: str | None
) -> tuple[Path, str]:
    """The engine folder to verify and its precision: ``engine_dir`` if given, else the only
    complete engine of ``precision`` (any, when None) under OUT/engines/MODEL.

    Raises:
        InputError: no such engine, or several and none chosen.
    """
    from bert_compiler.core.artifacts import ArtifactDir
    from bert_compiler.core.errors import InputError

    def precision_of(folder: Path) -> str | None:
        manifest = ArtifactDir(folder).read_manifest()
        return (manifest or {}).get("spec", {}).get("precision")

    if engine_dir is not None:
        return Path(engine_dir), precision or precision_of(Path(engine_dir)) or "fp32"
    root = layout.root / "engines" / model_slug(model)
    candidates = [
        folder
        for folder in sorted(root.glob("*"))
        if folder.is_dir()
        and precision_of(folder) is not None
        and (precision is None or precision_of(folder) == precision)
    ]
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise InputError(
            f"{root}: {len(candidates)} engines{' of ' + precision if precision else ''} "
            f"({found}); pass --engine FOLDER"
        )
    return candidates[0], precision_of(candidates[0]) or "fp32"
