"""bert-compile: a thin click layer; each command lists its option groups (cli/options.py),
which parse its flags into specs, and calls the library.

Exit codes: 0 ok; 1 internal error (traceback); 2 usage; 3 bad input; 4 unsupported model;
5 parity failed; 6 missing environment; 7 fusion incomplete; 8 artifact does not match its manifest.
With --json the last stdout line is one JSON object, on success and on failure.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from bert_compiler.bench.measure import format_table, run_bench, write_report
from bert_compiler.cli.bench_options import BenchOptions
from bert_compiler.cli.config import apply_config
from bert_compiler.cli.doctor import diagnose, require_target
from bert_compiler.cli.options import (
    CalibrationOptions,
    ExportOptions,
    FallbackOptions,
    FuseOptions,
    MaxLengthOptions,
    ModelOptions,
    ProgressOptions,
    TargetOptions,
    TextOptions,
    VerifyOptions,
    input_option,
    out_option,
    precision_option,
    target_option,
    uses,
)
from bert_compiler.cli.package_options import PackageOptions
from bert_compiler.cli.sweep_options import SweepOptions
from bert_compiler.core import interrupts, progress
from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import (
    NO_SPACE_ERRNOS,
    BertCompileError,
    InputError,
    Interrupted,
    ParityError,
    UnsupportedModelError,
    is_rust_panic,
)
from bert_compiler.core.lock import output_lock
from bert_compiler.core.outdir import claim_output, release_if_unused
from bert_compiler.core.stage import StageResult
from bert_compiler.core.targets import detect
from bert_compiler.engines.targets import plan_targets
from bert_compiler.models.loading import ModelInfo
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.stages.build import ProfileText, build, engine_folder_name, resolve_build_spec
from bert_compiler.stages.calibrate import calibrate
from bert_compiler.stages.export import MODEL_FILE, export
from bert_compiler.stages.fuse import fuse
from bert_compiler.stages.layout import DEFAULT_OUT, Layout, find_engine
from bert_compiler.stages.simplify import simplify
from bert_compiler.stages.sweep import format_table as sweep_table
from bert_compiler.stages.sweep import run_sweep
from bert_compiler.stages.sweep import write_report as write_sweep
from bert_compiler.stages.verify import REPORT_FILE, require_passed, verify
from bert_compiler.triton.gate import verify_repository
from bert_compiler.triton.package import (
    package,
    repository_summary,
)
from bert_compiler.triton.server import (
    LOG_FILE,
    READY_TIMEOUT_S,
    describe,
    find_server,
    plan_serving,
    triton_server,
)

_JSON_KEY = "bert_compile.json"
_FORCE_KEY = "bert_compile.force"
log = logging.getLogger("bert_compile")


class _Cli(click.Group):
    """Turns user errors into one stderr line (plus a JSON line with --json) and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BertCompileError as err:
            self._fail(ctx, err)
        except OSError as err:
            if err.errno not in NO_SPACE_ERRNOS:
                raise
            # A disk that fills anywhere (a copy in package, a write a stage left to a
            # library): staging files are removed as the stack unwinds; one line says what.
            where = f" while writing {err.filename}" if err.filename else ""
            self._fail(
                ctx,
                InputError(
                    f"no space left on the device{where} ({err.strerror}); free space or "
                    "choose another output folder, then rerun"
                ),
            )
        except Interrupted as err:
            # With --force the same command starts over; without it, it resumes.
            again = "without --force " if ctx.meta.get(_FORCE_KEY) else ""
            message = (
                f"interrupted by {err.signal_name}: the stage in progress has no manifest, so "
                f"nothing half-written looks complete; run the command again {again}to resume"
            )
            _exit_with(ctx, f"bert-compile: {message}", "interrupted", message, err.exit_code)
        except BaseException as err:
            if not is_rust_panic(err):
                raise
            # A text or a tokenizer.json that makes the Rust tokenizer panic: what it said, in
            # one line (its own report went to stderr above, as Rust prints it).
            said = str(err).splitlines()[0] if str(err) else type(err).__name__
            self._fail(
                ctx,
                UnsupportedModelError(
                    f"a Rust library (tokenizers or safetensors) panicked: {said}; the model's "
                    "tokenizer.json (or weights) holds something it cannot run"
                ),
            )

    @staticmethod
    def _fail(ctx: click.Context, err: BertCompileError) -> None:
        line = f"bert-compile: {err.kind} error: {err}"
        _exit_with(ctx, line, err.kind, str(err), err.exit_code)


def _exit_with(ctx: click.Context, line: str, kind: str, message: str, exit_code: int) -> None:
    """One stderr line, with --json the error as the last stdout line, and the exit code."""
    click.echo(line, err=True)
    if ctx.meta.get(_JSON_KEY):
        error = {"kind": kind, "message": message, "exit_code": exit_code}
        click.echo(json.dumps({"ok": False, "error": error}))
    ctx.exit(exit_code)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta[_JSON_KEY] = value
    return value


_json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    is_eager=True,
    callback=_set_json,
    help="Print one JSON object as the last stdout line.",
)


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    import transformers  # heavy: only once a command runs, never for --help

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# The groups each command lists (one instance each: a group holds no state).
MODEL = ModelOptions()
MAX_LENGTH = MaxLengthOptions()
VERIFY = VerifyOptions()
TEXT = TextOptions()
CALIBRATION = CalibrationOptions()
TARGETS = TargetOptions()
PACKAGE = PackageOptions()
FUSE = FuseOptions()
BENCH = BenchOptions()
SWEEP = SweepOptions()
FALLBACK = FallbackOptions()
PROGRESS = ProgressOptions()


def _load_config(ctx: click.Context, _param: click.Parameter, value: Path | None):
    """Turn a TOML config into this command's defaults (flags on the command line still win)."""
    if value is not None:
        apply_config(ctx, value)
    return value


def stage_command(func):
    """Options every stage command takes (the config file, the model, the output folder and how
    to run), and the lock: one writer per output folder."""

    @click.option(
        "--config",
        type=click.Path(path_type=Path),
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="TOML file of option values (keys are option names; [run], [build], ... tables "
        "per command; [fp32], [fp16], [int8] tables for one precision's gates). Command-line "
        "options win.",
    )
    @uses(MODEL)
    @out_option("Output folder; each stage writes a subfolder.")
    @click.option("--force", is_flag=True, help="Rebuild even when the stage is up to date.")
    @click.option(
        "--wait-lock",
        type=click.FloatRange(0, 86_400),
        default=0,
        show_default=True,
        help="Seconds to wait for another bert-compile writing the same --out or Triton "
        "repository (0: fail now).",
    )
    @click.option(
        "--force-out",
        is_flag=True,
        help="Write into a non-empty --out that bert-compile did not make: it replaces only the "
        "stage outputs it names (export/model.onnx, ...) and deletes no file it did not write.",
    )
    @click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
    @uses(PROGRESS)
    @_json_option
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _configure_logging(kwargs["quiet"])
        progress.configure(PROGRESS.parse(kwargs))
        with progress.logging_through_bars():
            return _run_stage_command(func, args, kwargs)

    return wrapper


def _run_stage_command(func, args, kwargs):
    """A stage command's body, run with its output folder claimed and locked."""
    click.get_current_context().meta[_FORCE_KEY] = kwargs["force"]
    out = Path(kwargs["out"])
    # Before anything is written: never the root, the home folder, the model's parents or a
    # user's folder.
    created = claim_output(out, model_folder=MODEL.folder(kwargs), force=kwargs.pop("force_out"))
    # A second command fails (or waits) naming the holder; then nothing of ours is cleaned
    # up, since the folder is the holder's.
    with output_lock(out, wait_s=kwargs["wait_lock"]):
        try:
            return func(*args, **kwargs)
        except BaseException:
            if created:
                # Under the lock: nobody else writes into the folder meanwhile.
                release_if_unused(out)
            raise


def _emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    click.echo(human, err=as_json)
    if as_json:
        click.echo(strict_json(result))


def strict_json(value: Any) -> str:
    """``value`` as one line of strict JSON: a NaN or infinite number (a metric of constant
    scores, INT8's unlimited max_abs_err) becomes null, since json.dumps would write bare NaN
    and Infinity, which JSON parsers refuse; anything else not JSON becomes its str()."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), default=str, allow_nan=False)


def _stage_output(result: StageResult) -> dict[str, Any]:
    return {
        "ok": True,
        "stage": result.stage,
        "path": str(result.path),
        "skipped": result.skipped,
        "results": result.results,
    }


def _stage_file(folder: Path) -> Path:
    """The model.onnx of a complete stage folder, checked against its manifest."""
    artifact = ArtifactDir(folder)
    artifact.require_complete()
    return artifact.output_path(MODEL_FILE)


def _model_stage_file(layout: Layout, folder: Path, info: ModelInfo) -> Path:
    """``_stage_file`` for a stage that reads ``info`` beside the graph: the graphs under OUT
    come from the model OUT/export was made from, and a stage given another --model (the
    default, when the flag is left out) would check or name them as that model's (fuse's
    operator counts, build's OUT/engines/MODEL folder).

    Raises:
        InputError: OUT/export records another model than ``info``.
    """
    exported = (ArtifactDir(layout.export).read_manifest() or {}).get("inputs", {}).get("model")
    if isinstance(exported, dict) and exported.get("sha256") != info.fingerprint()["sha256"]:
        raise InputError(
            f"{layout.export}: exported from {exported.get('path')}, not from --model "
            f"{info.path}; pass --model {exported.get('path')} to this stage, or export "
            f"--model {info.path} first"
        )
    return _stage_file(folder)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _speed_line(engine: dict[str, Any]) -> str:
    """``\n  speed: ...`` from verify's timed metric pass, labelled as the rough figure it is."""
    speed = engine.get("speed")
    if not speed:
        return ""
    return (
        f"\n  speed: {speed['sentences_per_s']:,.0f} sentences/s over {speed['sentences']} "
        "metric sentences in verify (tokenization included; rough: `bert-compile bench` measures)"
    )


def _float_ops_line(engine: dict[str, Any]) -> str:
    """``\n  float_ops: 2/36 ...`` for an INT8 engine: its quantizable MatMuls left in float."""
    float_ops = engine.get("float_ops")
    if not float_ops:
        return ""
    line = f"\n  float_ops: {float_ops['float']}/{float_ops['total']} quantizable MatMuls in float"
    fallback = engine.get("fallback")
    if fallback and fallback["rounds"]:
        line += f" (fallback: {fallback['rounds']} rounds, {fallback['seconds']:.0f}s)"
    return line


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bert-compiler")
def cli() -> None:
    """Compile BERT-family encoders into verified inference engines.

    Stages: export -> simplify -> fuse -> [calibrate ->] build -> verify; `run` chains them and
    skips what is up to date; `targets` shows what this machine can build for. Each stage writes
    OUT/<stage>/ with a manifest.json (inputs' and outputs' sha256, tool versions, settings,
    results).
    """


@cli.command("targets")
@_json_option
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
    _emit(result, as_json, "\n".join(lines))


@cli.command("doctor")
@out_option("Where outputs would go (free space and writability are checked there).")
@target_option("Exit 6 unless this target can be built here (auto: report only).")
@_json_option
def doctor_command(out: Path, target: str, as_json: bool) -> None:
    """Check this machine: versions, GPUs, TensorRT, ONNX Runtime providers, disk; say what is
    missing for which target."""
    report = diagnose(detect(), out)
    lines = [
        f"bert-compiler {report['versions']['bert-compiler']}, python "
        f"{report['versions']['python']}, onnxruntime {report['versions'].get('onnxruntime')}"
    ]
    lines += [f"GPU {g['index']}: {g['name']} ({g['sm']})" for g in report["gpus"]] or ["GPU: none"]
    lines.append(f"TensorRT: {report['tensorrt']}")
    for name, entry in report["targets"].items():
        state = "ready: " + ", ".join(entry["builds"]) if entry["ready"] else entry["missing"]
        lines.append(f"target {name}: {state}")
    package = report["package"]
    lines.append(f"package: {'ready' if package['ready'] else package['missing']}")
    disk = report["disk"]
    lines.append(
        f"disk: {disk['free_mib']} MiB free at {disk['path']}"
        f"{'' if disk['writable'] else ' (not writable)'}"
    )
    lines += [f"problem: {p}" for p in report["problems"]]
    _emit(report, as_json, "\n".join(lines))
    if not disk["writable"]:
        raise InputError(report["problems"][0])
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
    _emit(_stage_output(result), values["as_json"], f"exported: {result.output(MODEL_FILE)}")


@cli.command("simplify")
@stage_command
@input_option("ONNX file to simplify (default: OUT/export/model.onnx).")
def simplify_command(input_path: Path | None, **values: Any) -> None:
    """Simplify the exported graph with onnxsim, checked numerically (OUT/simplify)."""
    layout = Layout(values["out"])
    source = input_path or _stage_file(layout.export)
    result = simplify(source=source, out_dir=layout.simplify, force=values["force"])
    _emit(_stage_output(result), values["as_json"], f"simplified: {result.output(MODEL_FILE)}")


@cli.command("fuse")
@stage_command
@input_option("ONNX file to fuse (default: OUT/simplify/model.onnx).")
@uses(FUSE)
def fuse_command(input_path: Path | None, **values: Any) -> None:
    """Apply ORT's transformers fusions and check their counts (OUT/fuse)."""
    layout = Layout(values["out"])
    info = MODEL.parse(values)
    source = input_path or _model_stage_file(layout, layout.simplify, info)
    result = fuse(
        info=info,
        source=source,
        out_dir=layout.fuse,
        spec=FUSE.parse(values),
        force=values["force"],
    )
    note = result.results.get("fusion_note")
    partial = f" (partial: {note})" if note else ""
    _emit(
        _stage_output(result),
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
        report["file"] = str(written)
        _emit(report, values["as_json"], f"{sweep_table(report)}\nresults: {written}")
        return
    source = input_path or _model_stage_file(layout, layout.simplify, info)
    spec = CALIBRATION.parse(values, info)
    result = calibrate(
        info=info,
        source=source,
        out_dir=layout.calibration(spec.format),
        spec=spec,
        force=values["force"],
    )
    summary = {
        **_stage_output(result),
        "results": {k: v for k, v in result.results.items() if k != "scales"},
    }
    _emit(summary, values["as_json"], f"calibrated: {result.output(MODEL_FILE)}")


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
            source=input_path or _model_stage_file(layout, layout.root / spec.source_stage, info),
            out_dir=layout.engine(info.name, engine_folder_name(spec)),
            spec=spec,
            input_names=tuple(info.architecture.input_names),
            # A graph given by path may be any model's: only OUT's own records the model.
            model=None if input_path else info.fingerprint(),
            force=values["force"],
        )
        built.append(_stage_output(result))
    _emit(
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
    float_ops = (ArtifactDir(engine_dir).read_manifest() or {}).get("results", {}).get("float_ops")
    float_ops = float_ops and {k: float_ops[k] for k in ("float", "total")}
    _emit(
        {**_stage_output(result), "ok": bool(result.results.get("passed")), "float_ops": float_ops},
        values["as_json"],
        f"{'PASS' if result.results.get('passed') else 'FAIL'} {engine_dir}"
        f"{_float_ops_line({'float_ops': float_ops})}\n  report: {result.output(REPORT_FILE)}",
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
    tokenizer = summary["tokenizer"]
    lines = [
        f"{'PASS' if tokenizer['identical'] else 'FAIL'} tokenizer {tokenizer['model']}: "
        f"{tokenizer['batches']} batches compared with the pipeline's tokenization"
    ]
    lines += [f"FOREIGN {name}: yours, left alone (not verified)" for name in summary["foreign"]]
    lines.append(f"reports: {summary['reports']}")
    for entry in summary["engines"]:
        where = f"{entry['model']}/{entry['file']}"
        if entry["status"] == "skipped":
            lines.append(f"SKIP {where}: {entry['reason']}")
        else:
            lines.append(
                f"{entry['status'].upper()} {where}: min_cosine="
                f"{entry['parity']['min_cosine']:.6f} {entry['metric']['name']}="
                f"{_fmt(entry['metric']['value'])}"
            )
    _emit(summary, values["as_json"], "\n".join(lines))
    if not summary["ok"]:
        failed = [
            f"{e['model']}/{e['file']}: {'; '.join(e['failures'])}"
            for e in summary["engines"]
            if e["status"] == "failed"
        ]
        failed += [f"tokenizer: {m}" for m in tokenizer["mismatches"][:3]]
        raise ParityError(f"{repository}: " + " | ".join(failed))


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
    summary = {"ok": True, "stage": "package", **repository_summary(result)}
    lines = [f"repository: {result.path}"] + [
        f"  {name} ({role})" for name, role in summary["models"].items()
    ]
    _emit(summary, values["as_json"], "\n".join(lines))


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
    summary["notes"] = list(notes)
    lines = [*(f"note: {n}" for n in notes), f"summary: {Layout(Path(summary['out'])).summary}"]
    torch_value = (summary["pytorch_fp32_metric"] or {}).get("value")
    for engine in summary["engines"]:
        metric = engine["metric"]
        lines.append(
            f"{'PASS' if engine['passed'] else 'FAIL'} {engine['backend']} {engine['device']} "
            f"{engine['precision']}: {engine['path']}\n"
            f"  parity min_cosine={engine['parity']['min_cosine']:.6f} "
            f"max_abs_err={engine['parity']['max_abs_err']:.2e}; "
            f"{metric['name']}={_fmt(metric['value'])} (PyTorch fp32 {_fmt(torch_value)})"
            f"{_float_ops_line(engine)}{_speed_line(engine)}\n  report: {engine['report']}"
        )
    if summary.get("repository"):
        lines.append(f"Triton repository: {summary['repository']['path']}")
    _emit(summary, values["as_json"], "\n".join(lines))
    if not summary["ok"]:
        failed = [
            f"{e['path']}: {'; '.join(e['failures'])}"
            for e in summary["engines"]
            if not e["passed"]
        ]
        raise ParityError(" | ".join(failed))


@cli.command("bench")
@uses(MODEL)
@out_option("Output folder of `run`: its engines are timed; results go to OUT/bench/.")
@click.option(
    "--engine",
    "engine_dirs",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Engine folder to time (repeatable; default: every engine under OUT/engines/MODEL "
    "that runs here).",
)
@uses(MAX_LENGTH, BENCH)
@click.option(
    "--force-out",
    is_flag=True,
    help="Write OUT/bench into a non-empty --out that bert-compile did not make.",
)
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
@_json_option
@uses(PROGRESS)
def bench_command(engine_dirs: tuple[Path, ...], force_out: bool, **values: Any) -> None:
    """Time engines against PyTorch and plain ONNX Runtime on real text and fixed shapes, side
    by side in one process: table on stdout, OUT/bench/bench.json, .txt and .png."""
    _configure_logging(values["quiet"])
    progress.configure(PROGRESS.parse(values))
    layout = Layout(values["out"])
    info = MODEL.parse(values)
    spec = BENCH.parse(values)
    # OUT/bench is written after minutes of timing: a place that is not ours (the root, the
    # home folder, a user's folder) is refused first, as for every stage command.
    created = claim_output(layout.root, model_folder=MODEL.folder(values), force=force_out)
    try:
        report = run_bench(info=info, layout=layout, engine_dirs=engine_dirs, spec=spec)
    except BaseException:
        if created:
            release_if_unused(layout.root)
        raise
    written = write_report(report, layout.root / "bench")
    report["files"] = {kind: str(path) for kind, path in written.items()}
    lines = [format_table(report), *(f"{kind}: {path}" for kind, path in written.items())]
    _emit(report, values["as_json"], "\n".join(lines))


@cli.command("serve")
@click.option(
    "--repository",
    type=click.Path(path_type=Path),
    default=Layout(DEFAULT_OUT).repository,
    show_default=True,
    help="Triton repository written by `package` (or `run`).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; Triton asks no authentication).",
)
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="HTTP port (0: a free one, printed).",
)
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    default=8001,
    show_default=True,
    help="gRPC port (0: a free one, printed).",
)
@click.option(
    "--allow-foreign",
    "foreign",
    multiple=True,
    help="A top-level model folder or file of your own in the repository, left alone and not "
    "served; repeatable.",
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(0.1, 3600),
    default=READY_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the server and every model it loads to be ready.",
)
@_json_option
def serve_command(
    repository: Path,
    host: str,
    http_port: int,
    grpc_port: int,
    foreign: tuple[str, ...],
    ready_timeout: float,
    as_json: bool,
) -> None:
    """Serve a repository with a local Triton until Ctrl-C (or SIGTERM), then stop it; exit 0.

    The server is the CPU tritonserver of nvidia-pytriton (scripts/setup.sh --triton-server):
    Python backend only, so it serves the tokenizer model, Python-backend engines (package
    with --python-cpu-engine) and their ensembles, and lists what it leaves out. The repository
    is checked first as the gate reads it (every file against its manifest, every config; exit
    8); Triton loads it through a temporary view, so nothing is written into it. Prints the HTTP
    and gRPC addresses and the models once every model is ready (with --json, one JSON object).
    Production: NGC's Triton container (README).
    """
    workdir = Path(tempfile.mkdtemp(prefix="bert-compile-serve-"))
    failed = True
    try:
        plan = plan_serving(repository, foreign=foreign)
        files = find_server()
        with triton_server(
            files,
            plan,
            workdir,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            ready_timeout_s=ready_timeout,
        ) as server:
            summary = describe(server, files, repository)
            _emit(summary, as_json, _serve_lines(summary))
            click.echo("bert-compile: serving; Ctrl-C stops it", err=True)
            server.wait()  # returns only by an exception: the server exited, or a signal came
    except Interrupted as err:
        failed = False
        started = (workdir / LOG_FILE).exists()
        what = "tritonserver stopped" if started else "stopped before tritonserver started"
        click.echo(f"bert-compile: {err.signal_name}: {what}", err=True)
    finally:
        # A failed server's log stays where its message said; everything else goes.
        keep = failed and (workdir / LOG_FILE).is_file()
        for entry in workdir.iterdir() if keep else [workdir]:
            if entry.name != LOG_FILE:
                shutil.rmtree(entry, ignore_errors=True)


def _serve_lines(summary: dict[str, Any]) -> str:
    server = summary["server"]
    lines = [
        f"serving {summary['repository']} with Triton {server['triton']} (nvidia-pytriton "
        f"{server['nvidia-pytriton']}: CPU, {', '.join(server['backends'])} backend)",
        f"  HTTP: http://{summary['http']}",
        f"  gRPC: {summary['grpc']}",
        *(f"  model: {name}" for name in summary["models"]),
        *(f"  not served: {name} ({why})" for name, why in summary["not_served"].items()),
        f"  log: {summary['log']}",
    ]
    text_models = [m for m in summary["models"] if m.endswith("-text")]
    if text_models:
        # A cross-encoder's text model scores pairs: query<TAB>passage, as bash's $'...' writes
        # it.
        text = (
            "$'A man plays a guitar.\\tSomeone plays music.'"
            if text_models[0] in summary.get("text_pairs", ())
            else "'A man plays a guitar.'"
        )
        lines.append(
            f"  try: python scripts/triton_client.py --url {summary['http']} --model "
            f"{text_models[0]} {text}"
        )
    return "\n".join(lines)


def main() -> None:
    """Console entry point: SIGINT and SIGTERM unwind like an exception (staging files removed,
    lock released, one line, exit 130/143) instead of killing the process mid-write."""
    interrupts.install()
    cli(prog_name="bert-compile")


if __name__ == "__main__":
    main()
