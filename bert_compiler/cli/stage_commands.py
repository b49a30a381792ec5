"""The commands that build and check engines: targets, doctor, export, simplify, fuse,
calibrate, build, verify (an engine, or a Triton repository: the gate) and run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from bert_compiler.cli.app import (
    CALIBRATION,
    FALLBACK,
    FUSE,
    MAX_LENGTH,
    MODEL,
    PACKAGE,
    SWEEP,
    TARGETS,
    TEXT,
    VERIFY,
    cli,
    emit,
    json_option,
    model_stage_file,
    stage_command,
    stage_file,
    stage_output,
)
from bert_compiler.cli.doctor import diagnose, require_target
from bert_compiler.cli.options import (
    ExportOptions,
    input_option,
    out_option,
    precision_option,
    target_option,
    uses,
)
from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import (
    InputError,
    ParityError,
)
from bert_compiler.core.targets import detect
from bert_compiler.engines.targets import plan_targets
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.run_summary import FloatOps, float_ops_line
from bert_compiler.stages.build import ProfileText, build, engine_folder_name, resolve_build_spec
from bert_compiler.stages.calibrate import calibrate
from bert_compiler.stages.export import MODEL_FILE, export
from bert_compiler.stages.fuse import fuse
from bert_compiler.stages.layout import Layout, find_engine
from bert_compiler.stages.simplify import simplify
from bert_compiler.stages.sweep import run_sweep
from bert_compiler.stages.sweep_report import format_table as sweep_table
from bert_compiler.stages.sweep_report import write_report as write_sweep
from bert_compiler.stages.verify import REPORT_FILE, require_passed, verify
from bert_compiler.triton.gate import verify_repository
from bert_compiler.triton.package import (
    package,
    repository_summary,
)


@cli.command("targets")
@json_option
def targets_command(as_json: bool) -> None:
    """Show the GPUs, TensorRT and ONNX Runtime providers here, and what --target auto builds."""
    env = detect()
    plan = plan_targets("auto", (), env)
    lines = [
        f"GPU {g.index}: {g.name}, compute capability {g.compute_capability} ({g.sm}), "
        f"{g.memory_mib} MiB, driver {g.driver}"
        for g in env.gpus
    ] or ["GPU: none"]
    lines.append(f"TensorRT: {env.tensorrt or 'no (' + env.tensorrt_problem + ')'}")
    lines.append(
        f"ONNX Runtime: {env.onnxruntime or 'no'} (providers: {', '.join(env.ort_providers)})"
    )
    lines.append(
        "torch (--target torch): "
        + (f"CUDA {env.torch_cuda} build" if env.torch_cuda else "a CPU build (CPU engine only)")
    )
    lines.extend(f"note: {n}" for n in (*env.notes, *plan.notes))
    for e in plan.engines:
        gpu = f"-sm{e['compute_capability'].replace('.', '')}" if e["compute_capability"] else ""
        lines.append(f"auto builds: {e['backend']}-{e['device']}{gpu}-{e['precision']}")
    result = {"ok": True, **env.to_dict(), "auto": list(plan.engines), "notes": list(plan.notes)}
    emit(result, as_json, "\n".join(lines))


@cli.command("doctor")
@out_option("Where outputs would go (free space and writability are checked there).")
@target_option("Exit 6 unless this target can be built here (auto: report only).")
@json_option
def doctor_command(out: Path, target: str, as_json: bool) -> None:
    """Check this machine: versions, GPUs, TensorRT, ONNX Runtime providers, disk; say what is
    missing for which target."""
    report = diagnose(detect(), out)
    emit(report.to_json(), as_json, report.lines())
    if not report.disk.writable:
        raise InputError(report.problems[0])
    require_target(report, target)


@cli.command("export")
@stage_command
@uses(ExportOptions(opset=True))
def export_command(**values: Any) -> None:
    """Export the model to ONNX with dynamic batch and sequence axes (OUT/export)."""
    result = export(
        info=MODEL.parse(values),
        out_dir=Layout(values["out"]).export,
        spec=ExportOptions(opset=True).parse(values),
        force=values["force"],
    )
    emit(stage_output(result), values["as_json"], f"exported: {result.output(MODEL_FILE)}")


@cli.command("simplify")
@stage_command
@input_option("ONNX file to simplify (default: OUT/export/model.onnx).")
def simplify_command(input_path: Path | None, **values: Any) -> None:
    """Simplify the exported graph with onnxsim, checked numerically (OUT/simplify)."""
    layout = Layout(values["out"])
    source = input_path or stage_file(layout.export)
    result = simplify(source=source, out_dir=layout.simplify, force=values["force"])
    emit(stage_output(result), values["as_json"], f"simplified: {result.output(MODEL_FILE)}")


@cli.command("fuse")
@stage_command
@input_option("ONNX file to fuse (default: OUT/simplify/model.onnx).")
@uses(FUSE)
def fuse_command(input_path: Path | None, **values: Any) -> None:
    """Apply ORT's transformers fusions and check their counts (OUT/fuse)."""
    layout = Layout(values["out"])
    info = MODEL.parse(values)
    source = input_path or model_stage_file(layout, layout.simplify, info)
    result = fuse(
        info=info,
        source=source,
        out_dir=layout.fuse,
        spec=FUSE.parse(values),
        force=values["force"],
    )
    note = result.results.get("fusion_note")
    partial = f" (partial: {note})" if note else ""
    emit(
        stage_output(result),
        values["as_json"],
        f"fused: {result.results['fused_operators']}{partial}",
    )


@cli.command("calibrate")
@stage_command
@uses(CALIBRATION, TEXT, MAX_LENGTH, SWEEP)
@input_option("Float ONNX file to calibrate (default: OUT/simplify/model.onnx).")
def calibrate_command(input_path: Path | None, **values: Any) -> None:
    """Calibrate INT8 ranges on text and write the Q/DQ graph every INT8 engine builds from
    (--format fp8: the TensorRT fp8 engine's; --sweep: print the method table instead)."""
    layout = Layout(values["out"])
    info = MODEL.parse(values)
    sweep = SWEEP.parse(values)
    if sweep is not None:
        report = run_sweep(info=info, layout=layout, spec=sweep)
        written = write_sweep(report, layout.root / "sweep")
        emit(
            {**report.to_json(), "file": str(written)},
            values["as_json"],
            f"{sweep_table(report)}\nresults: {written}",
        )
        return
    source = input_path or model_stage_file(layout, layout.simplify, info)
    spec = CALIBRATION.parse(values, info)
    result = calibrate(
        info=info,
        source=source,
        out_dir=layout.calibration(spec.format),
        spec=spec,
        force=values["force"],
    )
    summary = {
        **stage_output(result),
        "results": {k: v for k, v in result.results.items() if k != "scales"},
    }
    emit(summary, values["as_json"], f"calibrated: {result.output(MODEL_FILE)}")


@cli.command("build")
@stage_command
@uses(TARGETS, TEXT, MAX_LENGTH)
@input_option("ONNX file to build from (default: the stage folder the engine needs).")
@precision_option(
    multiple=True,
    help="Repeatable (default: fp16 on GPUs, fp32 on the CPU). fp32/fp16 build from OUT/fuse "
    "(ONNX Runtime) or OUT/simplify (TensorRT); int8 from OUT/calibrate; fp8 (TensorRT, compute "
    "capability 8.9+) from OUT/calibrate-fp8.",
)
def build_command(input_path: Path | None, **values: Any) -> None:
    """Build engines for --target (OUT/engines/MODEL/ENGINE, one folder per engine)."""
    layout = Layout(values["out"])
    info = MODEL.parse(values)
    specs, notes = TARGETS.parse(values)
    text = ProfileText(*TEXT.parse(values, info), MAX_LENGTH.parse(values))
    derivation = TARGETS.parse_derivation(values)
    built = []
    for requested in specs:
        spec = resolve_build_spec(
            requested,
            info=info,
            layout=layout,
            text=text,
            derivation=derivation,
        )
        result = build(
            source=input_path or model_stage_file(layout, layout.root / spec.source_stage, info),
            out_dir=layout.engine(info.name, engine_folder_name(spec)),
            spec=spec,
            input_names=tuple(info.architecture.input_names),
            # A graph given by path may be any model's: only OUT's own records the model.
            model=None if input_path else info.fingerprint(),
            force=values["force"],
        )
        built.append(stage_output(result))
    emit(
        {"ok": True, "notes": list(notes), "engines": built},
        values["as_json"],
        "\n".join([*(f"note: {n}" for n in notes), *(f"engine: {b['path']}" for b in built)]),
    )


@cli.command("verify")
@stage_command
@uses(MAX_LENGTH, VERIFY)
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine folder (default: the only engine of --precision under OUT/engines/MODEL).",
)
@precision_option(multiple=False, help="Tolerances to apply (default: the engine's own precision).")
@click.option(
    "--repository",
    type=click.Path(path_type=Path),
    default=None,
    help="Verify a Triton repository written by `package` instead: files against its manifest, "
    "configs, the tokenizer model, and every engine this machine can run.",
)
@click.option(
    "--allow-foreign",
    "foreign",
    multiple=True,
    help="With --repository: a top-level model folder or file of your own that the gate leaves "
    "alone (it is not verified); repeatable. Anything else not packaged fails the gate.",
)
def verify_command(
    engine_dir: Path | None,
    precision: str | None,
    repository: Path | None,
    foreign: tuple[str, ...],
    **values: Any,
) -> None:
    """Check an engine (or a Triton repository) against PyTorch on real text plus the task
    metric; exit 5 on failure."""
    layout = Layout(values["out"])
    info = MODEL.parse(values)
    if repository is not None:
        if engine_dir is not None:
            raise click.UsageError("--engine and --repository exclude each other")
        _verify_repository(info, repository, layout, values, foreign)
        return
    engine_dir, engine_precision = find_engine(layout, info.name, engine_dir, precision)
    result = verify(
        info=info,
        engine_dir=engine_dir,
        out_dir=layout.verify(info.name, Path(engine_dir).name),
        spec=VERIFY.parse(values, precision or engine_precision),
        force=values["force"],
    )
    # The engine's manifest was checked by verify; an INT8 one counts its float MatMuls.
    counted = (ArtifactDir(engine_dir).read_manifest() or {}).get("results", {}).get("float_ops")
    float_ops = counted and FloatOps(counted["float"], counted["total"])
    emit(
        {
            **stage_output(result),
            "ok": bool(result.results.get("passed")),
            "float_ops": float_ops and float_ops.to_json(),
        },
        values["as_json"],
        f"{'PASS' if result.results.get('passed') else 'FAIL'} {engine_dir}"
        f"{float_ops_line(float_ops)}\n  report: {result.output(REPORT_FILE)}",
    )
    require_passed(result)


def _verify_repository(
    info, repository: Path, layout: Layout, values: dict[str, Any], foreign: tuple[str, ...]
) -> None:
    summary = verify_repository(
        info=info,
        repository=repository,
        out_root=layout.repository_reports,
        spec=VERIFY.parse(values),
        force=values["force"],
        foreign=foreign,
    )
    emit(summary.to_json(), values["as_json"], summary.lines())
    if not summary.ok:
        raise ParityError(summary.failures())


@cli.command("package")
@stage_command
@uses(PACKAGE)
@click.option(
    "--engine",
    "engines",
    multiple=True,
    help="Engine folder name under OUT/engines/MODEL to package; repeatable (default: all).",
)
def package_command(engines: tuple[str, ...], **values: Any) -> None:
    """Write a Triton model repository from the verified engines (default OUT/triton)."""
    result = package(
        info=MODEL.parse(values),
        out=values["out"],
        repository=PACKAGE.repository(values),
        spec=PACKAGE.parse(values, engines),
        force=values["force"],
        wait_lock=values["wait_lock"],
    )
    summary = repository_summary(result)
    emit({"ok": True, "stage": "package", **summary.to_json()}, values["as_json"], summary.lines())


@cli.command("run")
@stage_command
@uses(MAX_LENGTH, VERIFY, CALIBRATION, TEXT, TARGETS, PACKAGE)
@click.option(
    "--package/--no-package",
    "make_package",
    default=True,
    show_default=True,
    help="End with a Triton repository of the engines (when every one passed).",
)
@precision_option(
    multiple=True,
    help="Engines to build; repeatable (default: fp32 on CPU, fp16 on GPU targets).",
)
@uses(FALLBACK, FUSE, ExportOptions(opset=False))
def run_command(make_package: bool, **values: Any) -> None:
    """Run every stage (export, simplify, fuse, [calibrate,] build, verify); exit 5 on failure."""
    info = MODEL.parse(values)
    builds, notes = TARGETS.parse(values)
    spec = RunSpec(
        export=ExportOptions(opset=False).parse(values),
        fuse=FUSE.parse(values),
        builds=builds,
        verify=VERIFY.parse(values),
        calibration=CALIBRATION.parse(values, info),
        fallback=FALLBACK.parse(values),
        profiles=TARGETS.parse_derivation(values),
        package=PACKAGE.parse(values) if make_package else None,
        repository=PACKAGE.repository(values) if make_package else None,
    )
    summary = run_pipeline(
        info=info,
        out=values["out"],
        spec=spec,
        force=values["force"],
        wait_lock=values["wait_lock"],
    )
    lines = [*(f"note: {n}" for n in notes), f"summary: {Layout(summary.out).summary}"]
    lines += [engine.lines(summary.pytorch_fp32_metric) for engine in summary.engines]
    if summary.repository:
        lines.append(f"Triton repository: {summary.repository.path}")
    emit({**summary.to_json(), "notes": list(notes)}, values["as_json"], "\n".join(lines))
    if not summary.ok:
        raise ParityError(summary.failures())
