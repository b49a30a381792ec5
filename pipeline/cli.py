"""bert-compile: a thin click layer that parses flags into specs and calls the library.

Exit codes: 0 ok; 1 internal error (traceback); 2 usage; 3 bad input; 4 unsupported model;
5 parity failed; 6 missing environment; 7 fusion incomplete; 8 artifact does not match its manifest.
With --json the last stdout line is one JSON object, on success and on failure.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from bert_compiler.core.errors import BertCompileError, Interrupted, ParityError

_JSON_KEY = "bert_compile.json"
log = logging.getLogger("bert_compile")


class _Cli(click.Group):
    """Turns user errors into one stderr line (plus a JSON line with --json) and their exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BertCompileError as err:
            click.echo(f"bert-compile: {err.kind} error: {err}", err=True)
            if ctx.meta.get(_JSON_KEY):
                error = {"kind": err.kind, "message": str(err), "exit_code": err.exit_code}
                click.echo(json.dumps({"ok": False, "error": error}))
            ctx.exit(err.exit_code)
        except Interrupted as err:
            message = (
                f"interrupted by {err.signal_name}: the stage in progress has no manifest, so "
                "nothing half-written looks complete; run the same command again to resume"
            )
            click.echo(f"bert-compile: {message}", err=True)
            if ctx.meta.get(_JSON_KEY):
                error = {"kind": "interrupted", "message": message, "exit_code": err.exit_code}
                click.echo(json.dumps({"ok": False, "error": error}))
            ctx.exit(err.exit_code)


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
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load_config(ctx: click.Context, _param: click.Parameter, value: Path | None):
    """Turn a TOML config into this command's defaults (flags on the command line still win)."""
    if value is not None:
        from bert_compiler.pipeline.config import command_defaults

        commands = ctx.find_root().command.commands
        defaults = command_defaults(value, ctx.command, commands, ctx)
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def common_options(func):
    """Options every stage command takes."""

    @click.option(
        "--config",
        type=click.Path(path_type=Path),
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_load_config,
        help="TOML file of option values (keys are option names; [run], [build], ... tables "
        "per command). Command-line options win.",
    )
    @click.option(
        "--model",
        "model",
        default="default",
        show_default=True,
        help="'default' (all-MiniLM-L6-v2 from its PyPI package) or a local model folder.",
    )
    @click.option(
        "--out",
        "out",
        type=click.Path(path_type=Path),
        default=Path("bert-compile-out"),
        show_default=True,
        help="Output folder; each stage writes a subfolder.",
    )
    @click.option(
        "--task",
        type=click.Choice(
            ["auto", "sentence-embedding", "feature-extraction", "sequence-classification"]
        ),
        default="auto",
        show_default=True,
        help="What the engine outputs; auto reads the model folder.",
    )
    @click.option(
        "--allow-pickle",
        is_flag=True,
        help="Accept pytorch_model.bin (loaded with torch.load(weights_only=True)).",
    )
    @click.option(
        "--trust-remote-code",
        is_flag=True,
        help="Accept a config.json whose auto_map runs the model's own code.",
    )
    @click.option("--force", is_flag=True, help="Rebuild even when the stage is up to date.")
    @click.option(
        "--wait-lock",
        type=click.FloatRange(0, 86_400),
        default=0,
        show_default=True,
        help="Seconds to wait for another bert-compile writing the same --out (0: fail now).",
    )
    @click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
    @_json_option
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from bert_compiler.core.lock import output_lock

        _configure_logging(kwargs["quiet"])
        # One writer per output folder: a second command fails (or waits) naming the holder.
        with output_lock(kwargs["out"], wait_s=kwargs.pop("wait_lock")):
            return func(*args, **kwargs)

    return wrapper


def _resolve(kwargs: dict[str, Any]):
    from bert_compiler.pipeline.models import resolve_model

    return resolve_model(
        kwargs["model"],
        task=kwargs["task"],
        allow_pickle=kwargs["allow_pickle"],
        trust_remote_code=kwargs["trust_remote_code"],
    )


def _emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    click.echo(human, err=as_json)
    if as_json:
        click.echo(json.dumps(result, default=str))


def _stage_output(result) -> dict[str, Any]:
    return {
        "ok": True,
        "stage": result.stage,
        "path": str(result.path),
        "skipped": result.skipped,
        "results": result.results,
    }


def _input_option(help_text: str):
    return click.option(
        "--input", "input_path", type=click.Path(path_type=Path), default=None, help=help_text
    )


def _verify_options(func):
    @click.option(
        "--max-length",
        type=int,
        default=None,
        help="Truncate text to this many tokens (default: the model's).",
    )
    @click.option("--max-abs-err", type=float, default=None, help="Override the max abs error.")
    @click.option("--max-rel-l2", type=float, default=None, help="Override the relative L2 error.")
    @click.option("--min-cosine", type=float, default=None, help="Override the minimum cosine.")
    @click.option(
        "--max-metric-drop",
        type=float,
        default=None,
        help="Largest task-metric drop (points) against PyTorch fp32.",
    )
    @click.option(
        "--min-metric-retention",
        type=float,
        default=None,
        help="Smallest fraction of PyTorch fp32's metric to keep (int8 default 0.995).",
    )
    @click.option(
        "--metric-gate/--no-metric-gate",
        default=True,
        show_default=True,
        help="Fail on the task-metric gates (the metric is reported either way).",
    )
    @click.option(
        "--metric-limit",
        type=int,
        default=None,
        help="Score only the first N metric examples (quick checks).",
    )
    @click.option(
        "--parity-data",
        type=click.Path(path_type=Path),
        default=None,
        help="TSV with a 'sentence' column for parity (default: bundled SST-2 dev).",
    )
    @click.option(
        "--metric-data",
        type=click.Path(path_type=Path),
        default=None,
        help="TSV for the metric: STS-B columns (sentence1, sentence2, score), or for "
        "classifiers SST-2 columns (sentence, label). Default: the bundled dev set.",
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _calibration_options(func):
    @click.option(
        "--method",
        type=click.Choice(["minmax", "percentile", "entropy"]),
        default="percentile",
        show_default=True,
        help="INT8 range calibration method.",
    )
    @click.option(
        "--percentile",
        type=float,
        default=99.999,
        show_default=True,
        help="With --method percentile: share of magnitudes kept unclipped.",
    )
    @click.option(
        "--num-samples",
        type=int,
        default=512,
        show_default=True,
        help="Calibration sentences to use.",
    )
    @click.option(
        "--min-samples",
        type=int,
        default=32,
        show_default=True,
        help="Fewer distinct sentences than this is an error.",
    )
    @click.option(
        "--calibration-data",
        type=click.Path(path_type=Path),
        default=None,
        help="A .tsv, .txt or .jsonl file (default: bundled calibration sentences).",
    )
    @click.option(
        "--text-column",
        default="sentence",
        show_default=True,
        help="TSV column or JSONL key holding the text.",
    )
    @click.option(
        "--keep-float", multiple=True, help="MatMul node name to keep in float; repeatable."
    )
    @click.option(
        "--quantize-op",
        multiple=True,
        type=click.Choice(["Add", "LayerNormalization", "Softmax", "Erf", "Gelu"]),
        help="Also quantize this op type's float inputs (kept float by default); repeatable.",
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _target_options(func):
    """Where engines are built for, and the GPU backends' settings (build and run)."""

    @click.option(
        "--target",
        type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
        default="auto",
        show_default=True,
        help="auto: TensorRT and ONNX Runtime CUDA engines for every distinct GPU here, or the "
        "CPU engine when there is no GPU or GPU backend; cuda: ONNX Runtime CUDA; tensorrt.",
    )
    @click.option(
        "--threads",
        type=int,
        default=0,
        show_default=True,
        help="ONNX Runtime CPU intra-op threads recorded with the engine (0: one per core).",
    )
    @click.option(
        "--keep-float-op",
        "keep_float_ops",
        multiple=True,
        help="fp16: also keep this op type in float32 (repeatable), e.g. Softmax.",
    )
    @click.option("--cuda-graph", is_flag=True, help="ONNX Runtime CUDA: replay CUDA graphs.")
    @click.option(
        "--ort-tensorrt-provider",
        is_flag=True,
        help="ONNX Runtime CUDA: put ORT's TensorRT provider first (needs TensorRT).",
    )
    @click.option(
        "--profile",
        "profiles",
        multiple=True,
        help="TensorRT optimization profile min:opt:max as BxS:BxS:BxS (batch x sequence), "
        "repeatable; default: derived from the calibration sentences' token lengths.",
    )
    @click.option(
        "--profile-max-batch",
        type=int,
        default=64,
        show_default=True,
        help="Largest batch of derived TensorRT profiles.",
    )
    @click.option(
        "--builder-optimization-level",
        type=click.IntRange(0, 5),
        default=3,
        show_default=True,
        help="TensorRT builder optimization level.",
    )
    @click.option(
        "--timing-cache",
        type=click.Path(path_type=Path),
        default=None,
        help="TensorRT timing cache file (default: OUT/engines/timing-cache/...).",
    )
    @click.option(
        "--hardware-compatibility",
        type=click.Choice(["none", "ampere_plus", "same_compute_capability"]),
        default="none",
        show_default=True,
        help="TensorRT: build one plan for several GPU generations (slower).",
    )
    @click.option(
        "--version-compatible",
        is_flag=True,
        help="TensorRT: plan runs on later TensorRT versions (embeds host code).",
    )
    @click.option("--workspace-mib", type=int, default=0, help="TensorRT workspace cap (MiB).")
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _package_options(func):
    """Triton repository settings (package and run)."""

    @click.option(
        "--repository",
        type=click.Path(path_type=Path),
        default=None,
        help="Triton model repository folder (default: OUT/triton).",
    )
    @click.option(
        "--max-batch-size",
        type=click.IntRange(1, 4096),
        default=64,
        show_default=True,
        help="Largest batch of ONNX Runtime models (TensorRT: from the profiles).",
    )
    @click.option(
        "--max-queue-delay-us",
        type=click.IntRange(0, 10_000_000),
        default=0,
        show_default=True,
        help="Dynamic batcher: microseconds to wait for a fuller batch.",
    )
    @click.option(
        "--instances",
        type=click.IntRange(1, 64),
        default=1,
        show_default=True,
        help="Model instances per GPU (GPU models) or in all (CPU models).",
    )
    @click.option(
        "--python-cpu-engine",
        is_flag=True,
        help="Also serve CPU ONNX Runtime engines on Triton's Python backend (for Triton "
        "builds without the onnxruntime backend).",
    )
    @click.option(
        "--warmup/--no-warmup",
        default=True,
        show_default=True,
        help="Real-token warmup requests when Triton loads an engine model.",
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


def _package_spec(kwargs: dict[str, Any], engines: tuple[str, ...] = ()):
    from bert_compiler.pipeline.triton.package import PackageSpec

    return PackageSpec(
        engines=engines,
        max_batch_size=kwargs["max_batch_size"],
        max_queue_delay_us=kwargs["max_queue_delay_us"],
        instances=kwargs["instances"],
        python_cpu_engine=kwargs["python_cpu_engine"],
        warmup=kwargs["warmup"],
    )


def _repository_path(kwargs: dict[str, Any]) -> Path:
    from bert_compiler.pipeline.triton.package import REPOSITORY_FOLDER

    return kwargs["repository"] or Path(kwargs["out"]) / REPOSITORY_FOLDER


def _build_specs(kwargs: dict[str, Any], precisions: tuple[str, ...]):
    """Parse target flags into one BuildSpec per engine to build on this machine."""
    from bert_compiler.core.targets import Environment, detect, plan_targets
    from bert_compiler.engines.tensorrt import Profile, TensorRTOptions
    from bert_compiler.pipeline.build import BuildSpec

    # Flags first: a malformed profile is a usage problem on any machine, not hidden behind
    # "no GPU found".
    trt_options = TensorRTOptions(
        profiles=tuple(Profile.parse(p) for p in kwargs["profiles"]),
        builder_optimization_level=kwargs["builder_optimization_level"],
        workspace_mib=kwargs["workspace_mib"],
        timing_cache=str(kwargs["timing_cache"] or ""),
        hardware_compatibility=kwargs["hardware_compatibility"],
        version_compatible=kwargs["version_compatible"],
    )
    trt_options.validate()
    # --target cpu needs nothing from the machine; every other target looks at it.
    env = Environment() if kwargs["target"] == "cpu" else detect()
    plan = plan_targets(kwargs["target"], tuple(dict.fromkeys(precisions)), env)
    for note in plan.notes:
        log.warning("[target] %s", note)
    specs = []
    for engine in plan.engines:
        gpu_ort = engine["backend"] == "onnxruntime" and engine["device"] == "cuda"
        spec = BuildSpec(
            backend=engine["backend"],
            device=engine["device"],
            precision=engine["precision"],
            compute_capability=engine["compute_capability"],
            intra_op_num_threads=kwargs["threads"],
            cuda_graph=kwargs["cuda_graph"] and gpu_ort,
            ort_tensorrt_provider=kwargs["ort_tensorrt_provider"] and gpu_ort,
            keep_float_ops=tuple(kwargs["keep_float_ops"]),
            tensorrt=trt_options,
        )
        spec.validate()
        specs.append(spec)
    return tuple(specs), plan.notes


def _calibration_spec(kwargs: dict[str, Any]):
    from bert_compiler.pipeline.calibrate import CalibrationSpec

    return CalibrationSpec(
        method=kwargs["method"],
        percentile=kwargs["percentile"],
        num_samples=kwargs["num_samples"],
        min_samples=kwargs["min_samples"],
        data=kwargs["calibration_data"],
        text_column=kwargs["text_column"],
        max_length=kwargs.get("max_length"),
        keep_float=tuple(kwargs["keep_float"]),
        quantize_ops=tuple(kwargs["quantize_op"]),
    )


def _verify_spec(kwargs: dict[str, Any], precision: str = "fp32"):
    from bert_compiler.pipeline.verify import VerifySpec

    overrides = {
        "max_abs_err": kwargs["max_abs_err"],
        "rel_l2_err": kwargs["max_rel_l2"],
        "min_cosine": kwargs["min_cosine"],
    }
    return VerifySpec(
        precision=precision,
        tolerance_overrides=tuple((k, v) for k, v in overrides.items() if v is not None),
        max_metric_drop=kwargs["max_metric_drop"],
        min_metric_retention=kwargs["min_metric_retention"],
        metric_gate=kwargs["metric_gate"],
        max_length=kwargs["max_length"],
        metric_limit=kwargs["metric_limit"],
        parity_data=kwargs["parity_data"],
        metric_data=kwargs["metric_data"],
    )


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
    from bert_compiler.core.targets import detect, plan_targets

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
    lines.extend(f"note: {n}" for n in (*env.notes, *plan.notes))
    for e in plan.engines:
        gpu = f"-sm{e['compute_capability'].replace('.', '')}" if e["compute_capability"] else ""
        lines.append(f"auto builds: {e['backend']}-{e['device']}{gpu}-{e['precision']}")
    result = {"ok": True, **env.to_dict(), "auto": list(plan.engines), "notes": list(plan.notes)}
    _emit(result, as_json, "\n".join(lines))


@cli.command("doctor")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bert-compile-out"),
    show_default=True,
    help="Where outputs would go (free space and writability are checked there).",
)
@click.option(
    "--target",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
    help="Exit 6 unless this target can be built here (auto: report only).",
)
@_json_option
def doctor_command(out: Path, target: str, as_json: bool) -> None:
    """Check this machine: versions, GPUs, TensorRT, ONNX Runtime providers, disk; say what is
    missing for which target."""
    from bert_compiler.core.errors import InputError
    from bert_compiler.core.targets import detect
    from bert_compiler.pipeline.doctor import diagnose, require_target

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
@common_options
@click.option("--opset", type=int, default=17, show_default=True)
@click.option(
    "--pooling/--no-pooling",
    default=True,
    show_default=True,
    help="Sentence-embedding models: mean pooling + L2 norm in the graph.",
)
def export_command(opset: int, pooling: bool, **kwargs: Any) -> None:
    """Export the model to ONNX with dynamic batch and sequence axes (OUT/export)."""
    from bert_compiler.pipeline.export import ExportSpec, export
    from bert_compiler.pipeline.runner import Layout

    info = _resolve(kwargs)
    result = export(
        info=info,
        out_dir=Layout(kwargs["out"]).export,
        spec=ExportSpec(opset=opset, pooling_in_graph=pooling),
        force=kwargs["force"],
    )
    _emit(_stage_output(result), kwargs["as_json"], f"exported: {result.output('model.onnx')}")


@cli.command("simplify")
@common_options
@_input_option("ONNX file to simplify (default: OUT/export/model.onnx).")
def simplify_command(input_path: Path | None, **kwargs: Any) -> None:
    """Simplify the exported graph with onnxsim, checked numerically (OUT/simplify)."""
    from bert_compiler.pipeline.runner import Layout
    from bert_compiler.pipeline.simplify import simplify

    layout = Layout(kwargs["out"])
    source = input_path or _stage_file(layout.export)
    result = simplify(source=source, out_dir=layout.simplify, force=kwargs["force"])
    _emit(_stage_output(result), kwargs["as_json"], f"simplified: {result.output('model.onnx')}")


@cli.command("fuse")
@common_options
@_input_option("ONNX file to fuse (default: OUT/simplify/model.onnx).")
@click.option("--allow-unfused", is_flag=True, help="Warn instead of failing on missing fusions.")
def fuse_command(input_path: Path | None, allow_unfused: bool, **kwargs: Any) -> None:
    """Apply ORT's transformers fusions and check their counts (OUT/fuse)."""
    from bert_compiler.pipeline.fuse import FuseSpec, fuse
    from bert_compiler.pipeline.runner import Layout

    layout = Layout(kwargs["out"])
    info = _resolve(kwargs)
    source = input_path or _stage_file(layout.simplify)
    result = fuse(
        info=info,
        source=source,
        out_dir=layout.fuse,
        spec=FuseSpec(require_fusions=not allow_unfused),
        force=kwargs["force"],
    )
    _emit(_stage_output(result), kwargs["as_json"], f"fused: {result.results['fused_operators']}")


@cli.command("calibrate")
@common_options
@_calibration_options
@click.option("--max-length", type=int, default=None, help="Token limit (default: the model's).")
@_input_option("Float ONNX file to calibrate (default: OUT/simplify/model.onnx).")
def calibrate_command(input_path: Path | None, **kwargs: Any) -> None:
    """Calibrate INT8 ranges on text and write the Q/DQ graph every INT8 engine builds from."""
    from bert_compiler.pipeline.calibrate import calibrate
    from bert_compiler.pipeline.runner import Layout

    layout = Layout(kwargs["out"])
    info = _resolve(kwargs)
    source = input_path or _stage_file(layout.simplify)
    result = calibrate(
        info=info,
        source=source,
        out_dir=layout.calibrate,
        spec=_calibration_spec(kwargs),
        force=kwargs["force"],
    )
    summary = {
        **_stage_output(result),
        "results": {k: v for k, v in result.results.items() if k != "scales"},
    }
    _emit(summary, kwargs["as_json"], f"calibrated: {result.output('model.onnx')}")


@cli.command("build")
@common_options
@_target_options
@_input_option("ONNX file to build from (default: the stage folder the engine needs).")
@click.option(
    "--precision",
    "precisions",
    type=click.Choice(["fp32", "fp16", "int8"]),
    multiple=True,
    default=None,
    help="Repeatable (default: fp16 on GPUs, fp32 on the CPU). fp32/fp16 build from OUT/fuse "
    "(ONNX Runtime) or OUT/simplify (TensorRT); "
    "int8 from OUT/calibrate.",
)
def build_command(input_path: Path | None, precisions: tuple[str, ...], **kwargs: Any) -> None:
    """Build engines for --target (OUT/engines/MODEL/ENGINE, one folder per engine)."""
    from bert_compiler.pipeline.build import build
    from bert_compiler.pipeline.runner import (
        Layout,
        RunSpec,
        engine_folder_name,
        resolve_build_spec,
    )

    layout = Layout(kwargs["out"])
    info = _resolve(kwargs)
    specs, notes = _build_specs(kwargs, precisions)
    run_spec = RunSpec(profile_max_batch=kwargs["profile_max_batch"])
    built = []
    for requested in specs:
        spec = resolve_build_spec(requested, info=info, layout=layout, spec=run_spec)
        name = engine_folder_name(spec)
        result = build(
            source=input_path or _stage_file(layout.root / spec.source_stage),
            out_dir=layout.engine(info.name, name),
            spec=spec,
            input_names=tuple(info.architecture.input_names),
            force=kwargs["force"],
        )
        built.append(_stage_output(result))
    _emit(
        {"ok": True, "notes": list(notes), "engines": built},
        kwargs["as_json"],
        "\n".join([*(f"note: {n}" for n in notes), *(f"engine: {b['path']}" for b in built)]),
    )


@cli.command("verify")
@common_options
@_verify_options
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine folder (default: the only engine of --precision under OUT/engines/MODEL).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="Tolerances to apply (default: the engine's own precision).",
)
@click.option(
    "--repository",
    type=click.Path(path_type=Path),
    default=None,
    help="Verify a Triton repository written by `package` instead: files against its manifest, "
    "configs, the tokenizer model, and every engine this machine can run.",
)
def verify_command(
    engine_dir: Path | None, precision: str | None, repository: Path | None, **kwargs: Any
) -> None:
    """Check an engine (or a Triton repository) against PyTorch on real text plus the task
    metric; exit 5 on failure."""
    from bert_compiler.pipeline.runner import Layout, find_engine
    from bert_compiler.pipeline.verify import REPORT_FILE, require_passed, verify

    layout = Layout(kwargs["out"])
    info = _resolve(kwargs)
    if repository is not None:
        if engine_dir is not None:
            raise click.UsageError("--engine and --repository exclude each other")
        _verify_repository(info, repository, layout, kwargs)
        return
    engine_dir, engine_precision = find_engine(layout, info.name, engine_dir, precision)
    result = verify(
        info=info,
        engine_dir=engine_dir,
        out_dir=layout.verify(info.name, Path(engine_dir).name),
        spec=_verify_spec(kwargs, precision or engine_precision),
        force=kwargs["force"],
    )
    _emit(
        {**_stage_output(result), "ok": bool(result.results.get("passed"))},
        kwargs["as_json"],
        f"report: {result.output(REPORT_FILE)}",
    )
    require_passed(result)


def _verify_repository(info, repository: Path, layout, kwargs: dict[str, Any]) -> None:
    from bert_compiler.pipeline.verify import verify_repository

    summary = verify_repository(
        info=info,
        repository=repository,
        out_root=layout.root / "verify" / "repository",
        spec=_verify_spec(kwargs),
        force=kwargs["force"],
    )
    tokenizer = summary["tokenizer"]
    lines = [
        f"{'PASS' if tokenizer['identical'] else 'FAIL'} tokenizer {tokenizer['model']}: "
        f"{tokenizer['batches']} batches compared with the pipeline's tokenization"
    ]
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
    _emit(summary, kwargs["as_json"], "\n".join(lines))
    if not summary["ok"]:
        failed = [
            f"{e['model']}/{e['file']}: {'; '.join(e['failures'])}"
            for e in summary["engines"]
            if e["status"] == "failed"
        ]
        failed += [f"tokenizer: {m}" for m in tokenizer["mismatches"][:3]]
        raise ParityError(f"{repository}: " + " | ".join(failed))


@cli.command("package")
@common_options
@_package_options
@click.option(
    "--engine",
    "engines",
    multiple=True,
    help="Engine folder name under OUT/engines/MODEL to package; repeatable (default: all).",
)
def package_command(engines: tuple[str, ...], **kwargs: Any) -> None:
    """Write a Triton model repository from the verified engines (default OUT/triton)."""
    from bert_compiler.pipeline.triton.package import package, repository_summary

    info = _resolve(kwargs)
    result = package(
        info=info,
        out=kwargs["out"],
        repository=_repository_path(kwargs),
        spec=_package_spec(kwargs, engines),
        force=kwargs["force"],
    )
    summary = {"ok": True, "stage": "package", **repository_summary(result)}
    lines = [f"repository: {result.path}"] + [
        f"  {name} ({role})" for name, role in summary["models"].items()
    ]
    _emit(summary, kwargs["as_json"], "\n".join(lines))


@cli.command("run")
@common_options
@_verify_options
@_calibration_options
@_target_options
@_package_options
@click.option(
    "--package/--no-package",
    "make_package",
    default=True,
    show_default=True,
    help="End with a Triton repository of the engines (when every one passed).",
)
@click.option(
    "--precision",
    "precisions",
    type=click.Choice(["fp32", "fp16", "int8"]),
    multiple=True,
    default=None,
    help="Engines to build; repeatable (default: fp32 on CPU, fp16 on GPU targets).",
)
@click.option(
    "--fallback/--no-fallback",
    default=True,
    show_default=True,
    help="int8: keep the most sensitive operators in float until the gate passes.",
)
@click.option("--allow-unfused", is_flag=True, help="Warn instead of failing on missing fusions.")
@click.option(
    "--pooling/--no-pooling",
    default=True,
    show_default=True,
    help="Sentence-embedding models: mean pooling + L2 norm in the graph.",
)
def run_command(
    allow_unfused: bool,
    pooling: bool,
    precisions: tuple[str, ...],
    fallback: bool,
    make_package: bool,
    **kwargs: Any,
) -> None:
    """Run every stage (export, simplify, fuse, [calibrate,] build, verify); exit 5 on failure."""
    from bert_compiler.pipeline.export import ExportSpec
    from bert_compiler.pipeline.fuse import FuseSpec
    from bert_compiler.pipeline.runner import SUMMARY_FILE, RunSpec, run_pipeline

    info = _resolve(kwargs)
    builds, notes = _build_specs(kwargs, precisions)
    spec = RunSpec(
        export=ExportSpec(pooling_in_graph=pooling),
        fuse=FuseSpec(require_fusions=not allow_unfused),
        builds=builds,
        verify=_verify_spec(kwargs),
        calibration=_calibration_spec(kwargs),
        fallback=fallback,
        profile_max_batch=kwargs["profile_max_batch"],
        package=_package_spec(kwargs) if make_package else None,
        repository=_repository_path(kwargs) if make_package else None,
    )
    summary = run_pipeline(info=info, out=kwargs["out"], spec=spec, force=kwargs["force"])
    summary["notes"] = list(notes)
    lines = [*(f"note: {n}" for n in notes), f"summary: {Path(summary['out']) / SUMMARY_FILE}"]
    torch_value = (summary["pytorch_fp32_metric"] or {}).get("value")
    for engine in summary["engines"]:
        metric = engine["metric"]
        lines.append(
            f"{'PASS' if engine['passed'] else 'FAIL'} {engine['backend']} {engine['device']} "
            f"{engine['precision']}: {engine['path']}\n"
            f"  parity min_cosine={engine['parity']['min_cosine']:.6f} "
            f"max_abs_err={engine['parity']['max_abs_err']:.2e}; "
            f"{metric['name']}={_fmt(metric['value'])} (PyTorch fp32 {_fmt(torch_value)})"
            f"\n  report: {engine['report']}"
        )
    if summary.get("repository"):
        lines.append(f"Triton repository: {summary['repository']['path']}")
    _emit(summary, kwargs["as_json"], "\n".join(lines))
    if not summary["ok"]:
        failed = [
            f"{e['path']}: {'; '.join(e['failures'])}"
            for e in summary["engines"]
            if not e["passed"]
        ]
        raise ParityError(" | ".join(failed))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _stage_file(folder: Path) -> Path:
    """The model.onnx of a complete stage folder, checked against its manifest."""
    from bert_compiler.core.artifacts import ArtifactDir

    artifact = ArtifactDir(folder)
    artifact.require_complete()
    return artifact.output_path("model.onnx")


def _raise_interrupted(signum: int, _frame) -> None:
    import signal

    name = signal.Signals(signum).name
    raise Interrupted(name, 128 + signum)


def main() -> None:
    """Console entry point: SIGINT and SIGTERM unwind like an exception (staging files removed,
    lock released, one line, exit 130/143) instead of killing the process mid-write."""
    import signal

    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    cli(prog_name="bert-compile")


if __name__ == "__main__":
    main()
