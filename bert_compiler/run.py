"""The whole chain: export -> simplify -> fuse -> [calibrate ->] build -> verify -> package,
skipping what is up to date (the output tree: stages/layout.py).

Each quantized engine calibrates in its own format whatever ``--format`` says: int8 engines
through the INT8 precision fallback (OUT/calibrate), the TensorRT fp8 engine from one fp8
calibration (OUT/calibrate-fp8), kept only if verify passes it like any other engine."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.calibration.qdq import FP8, INT8
from bert_compiler.core.artifacts import atomic_write_text
from bert_compiler.core.outdir import claim_output
from bert_compiler.core.stage import StageReport, StageResult
from bert_compiler.engines.backend import BuildSpec, get_backend
from bert_compiler.engines.tensorrt_options import ProfileDerivation
from bert_compiler.models.loading import ModelInfo
from bert_compiler.run_summary import (
    EngineReport,
    FallbackReport,
    FloatOps,
    Metric,
    RunSummary,
    VerifySpeed,
)
from bert_compiler.stages.build import (
    ProfileText,
    build,
    engine_folder_name,
    resolve_build_spec,
)
from bert_compiler.stages.calibrate import CalibrationSpec, calibrate
from bert_compiler.stages.export import MODEL_FILE, ExportSpec, export
from bert_compiler.stages.fallback import FallbackSpec, Split, int8_with_fallback
from bert_compiler.stages.fuse import FuseSpec, fuse
from bert_compiler.stages.layout import Layout
from bert_compiler.stages.simplify import SimplifySpec, simplify
from bert_compiler.stages.verify import REPORT_FILE, VerifySpec, summarize_parity, verify
from bert_compiler.triton.package import (
    package,
    repository_summary,
)
from bert_compiler.triton.package_spec import PackageSpec

log = logging.getLogger("bert_compile")


@dataclass(frozen=True)
class RunSpec:
    """Settings of a whole run, one spec per stage."""

    export: ExportSpec = ExportSpec()
    simplify: SimplifySpec = SimplifySpec()
    fuse: FuseSpec = FuseSpec()
    builds: tuple[BuildSpec, ...] = (BuildSpec(),)
    verify: VerifySpec = VerifySpec()
    calibration: CalibrationSpec = CalibrationSpec()
    fallback: FallbackSpec = FallbackSpec()
    profiles: ProfileDerivation = ProfileDerivation()
    package: PackageSpec | None = None
    repository: Path | None = None


def run_pipeline(
    *, info: ModelInfo, out: Path, spec: RunSpec, force: bool = False, wait_lock: float = 0.0
) -> RunSummary:
    """Run every stage for ``info`` into ``out`` and return the summary (also written to run.json).

    A failed verification does not raise here: the summary's ``ok`` is False and each engine lists
    its failures, so callers (the CLI, CI) get the full report before deciding how to fail.

    Args:
        wait_lock: seconds to wait for another packager of the same Triton repository.
    """
    layout = Layout(Path(out))
    # Library callers get the command line's guard too: never the root, the home folder, the
    # model's parents or a user's folder (a no-op for a folder this tool already claimed).
    claim_output(layout.root, model_folder=info.path)
    stages: dict[str, StageReport] = {}
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
        stages[result.stage] = result.report()
    engines: list[EngineReport] = []
    pytorch_metric = None
    graphs = {"simplify": simplified.output(MODEL_FILE), "fuse": fused.output(MODEL_FILE)}
    for requested in spec.builds:
        build_spec = resolve_build_spec(
            requested,
            info=info,
            layout=layout,
            text=ProfileText(
                spec.calibration.data_file(),
                spec.calibration.text_column,
                spec.calibration.pair_column,
                spec.verify.max_length,
            ),
            derivation=spec.profiles,
        )
        built, verified, fallback = _engine(
            build_spec, graphs, info=info, layout=layout, spec=spec, stages=stages, force=force
        )
        engines.append(_engine_report(build_spec, built, verified, fallback))
        pytorch_metric = Metric.of(verified.results["pytorch_metric"])
    ok = all(engine.passed for engine in engines)
    repository = None
    # Only this run's engines: older engine folders under OUT are not silently shipped.
    served = tuple(engine.name for engine in engines)
    if ok and spec.package is not None and served:
        packaged = package(
            info=info,
            out=layout.root,
            repository=spec.repository or layout.repository,
            spec=replace(spec.package, engines=served),
            force=force,
            wait_lock=wait_lock,
        )
        stages["package"] = packaged.report()
        repository = repository_summary(packaged)
    summary = RunSummary(
        ok=ok,
        model_name=info.name,
        model_path=info.path,
        task=info.task,
        out=layout.root,
        fused_operators=fused.results.get("fused_operators", {}),
        fusion_note=fused.results.get("fusion_note", ""),
        pytorch_fp32_metric=pytorch_metric,
        engines=tuple(engines),
        repository=repository,
        stages=stages,
    )
    atomic_write_text(layout.summary, json.dumps(summary.to_json(), indent=2) + "\n")
    return summary


def _engine(
    build_spec: BuildSpec,
    graphs: dict[str, Path],
    *,
    info: ModelInfo,
    layout: Layout,
    spec: RunSpec,
    stages: dict[str, StageReport],
    force: bool,
) -> tuple[StageResult, StageResult, dict[str, Any] | None]:
    """Build and verify one engine: int8 through the precision fallback, fp8 from its own
    calibration, the rest from the graph its backend builds from."""
    if build_spec.precision == INT8.name and get_backend(build_spec.backend).quantizes_from_qdq:
        return int8_with_fallback(
            info=info,
            float_graph=graphs["simplify"],
            calibrate_dir=layout.calibrate,
            calibration=replace(spec.calibration, format=INT8.name),
            fallback=spec.fallback,
            build_and_verify=functools.partial(
                _build_and_verify,
                info=info,
                layout=layout,
                build_spec=build_spec,
                spec=spec,
                stages=stages,
            ),
            reporting=spec.verify.metric_file(info),
            force=force,
            stages=stages,
        )
    if build_spec.precision == FP8.name:
        calibrated = calibrate(
            info=info,
            source=graphs["simplify"],
            out_dir=layout.calibration(FP8.name),
            spec=replace(spec.calibration, format=FP8.name),
            force=force,
        )
        stages[f"calibrate:{FP8.name}"] = calibrated.report()
        source = calibrated.output(MODEL_FILE)
    else:
        source = graphs[build_spec.source_stage]
    built, verified = _build_and_verify(
        source, force, info=info, layout=layout, build_spec=build_spec, spec=spec, stages=stages
    )
    return built, verified, None


def _engine_report(
    build_spec: BuildSpec,
    built: StageResult,
    verified: StageResult,
    fallback: dict[str, Any] | None,
) -> EngineReport:
    """What the run summary says of one engine, read once from its build and verify records."""
    report = verified.results
    failures = list(report["failures"])
    if fallback is not None and fallback["failure"]:
        failures.append(fallback["failure"])
    float_ops = built.results.get("float_ops")
    return EngineReport(
        backend=build_spec.backend,
        precision=build_spec.precision,
        device=build_spec.device,
        compute_capability=build_spec.compute_capability or None,
        name=built.path.name,
        path=built.output(built.results["engine_file"]),
        manifest=built.path / "manifest.json",
        report=verified.output(REPORT_FILE),
        parity=summarize_parity(report["parity"]),
        metric=Metric.of(report["metric"]),
        passed=report["passed"] and not failures,
        failures=tuple(failures),
        float_ops=float_ops and FloatOps(float_ops["float"], float_ops["total"]),
        speed=VerifySpeed.of(report.get("speed")),
        fallback=FallbackReport.of(fallback) if fallback is not None else None,
    )


def _build_and_verify(
    source, force, split: Split | None = None, *, info, layout, build_spec, spec, stages
):
    """Build, then verify on ``split`` (None: the reporting set, the verify options' data)."""
    name = engine_folder_name(build_spec)
    built = build(
        source=source,
        out_dir=layout.engine(info.name, name),
        spec=build_spec,
        input_names=tuple(info.architecture.input_names),
        model=info.fingerprint(),
        force=force,
    )
    verify_spec = replace(spec.verify, precision=build_spec.precision)
    out_dir = layout.verify(info.name, name)
    if split is not None:
        verify_spec = replace(
            verify_spec, split=split.name, parity_data=split.parity, metric_data=split.metric
        )
        out_dir = layout.selection(info.name, name)
    verified = verify(
        info=info, engine_dir=built.path, out_dir=out_dir, spec=verify_spec, force=force
    )
    stages[f"build:{name}"] = built.report()
    stages[f"verify:{name}" + (f"@{split.name}" if split else "")] = verified.report()
    return built, verified
