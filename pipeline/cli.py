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

from pipeline.errors import BertCompileError, ParityError

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


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    ctx.meta[_JSON_KEY] = value
    return value


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def common_options(func):
    """Options every stage command takes."""

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
    @click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr.")
    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        callback=_set_json,
        help="Print one JSON object as the last stdout line.",
    )
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        _configure_logging(kwargs["quiet"])
        return func(*args, **kwargs)

    return wrapper


def _resolve(kwargs: dict[str, Any]):
    from pipeline.models import resolve_model

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


def _calibration_spec(kwargs: dict[str, Any]):
    from pipeline.calibrate import CalibrationSpec

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
    from pipeline.verify import VerifySpec

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

    Stages: export -> simplify -> fuse -> build -> verify; `run` chains them and skips what is up
    to date. Each stage writes OUT/<stage>/ with a manifest.json (inputs' and outputs' sha256, tool
    versions, settings, results).
    """


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
    from pipeline.export import ExportSpec, export
    from pipeline.runner import Layout

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
    from pipeline.runner import Layout
    from pipeline.simplify import simplify

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
    from pipeline.fuse import FuseSpec, fuse
    from pipeline.runner import Layout

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
    from pipeline.calibrate import calibrate
    from pipeline.runner import Layout

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
@_input_option("ONNX file to build from (default: OUT/fuse/model.onnx).")
@click.option(
    "--threads",
    type=int,
    default=0,
    show_default=True,
    help="ONNX Runtime intra-op threads recorded with the engine (0: one per core).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="fp32 builds from OUT/fuse, int8 from OUT/calibrate.",
)
def build_command(input_path: Path | None, threads: int, precision: str, **kwargs: Any) -> None:
    """Build a CPU ONNX Runtime engine (OUT/engines/onnxruntime-cpu-PRECISION)."""
    from pipeline.build import BuildSpec, build
    from pipeline.runner import Layout

    layout = Layout(kwargs["out"])
    spec = BuildSpec(intra_op_num_threads=threads, precision=precision)
    default = layout.fuse if precision == "fp32" else layout.calibrate
    source = input_path or _stage_file(default)
    result = build(source=source, out_dir=layout.engine(spec), spec=spec, force=kwargs["force"])
    _emit(_stage_output(result), kwargs["as_json"], f"engine: {result.path}")


@cli.command("verify")
@common_options
@_verify_options
@click.option(
    "--engine",
    "engine_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Engine folder (default: OUT/engines/onnxruntime-cpu-fp32).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="Selects the default engine folder and tolerances.",
)
def verify_command(engine_dir: Path | None, precision: str, **kwargs: Any) -> None:
    """Check an engine against PyTorch on real text plus the task metric; exit 5 on failure."""
    from pipeline.build import BuildSpec
    from pipeline.runner import Layout
    from pipeline.verify import REPORT_FILE, require_passed, verify

    layout = Layout(kwargs["out"])
    info = _resolve(kwargs)
    build_spec = BuildSpec(precision=precision)
    engine_dir = engine_dir or layout.engine(build_spec)
    result = verify(
        info=info,
        engine_dir=engine_dir,
        out_dir=layout.root / "verify" / Path(engine_dir).name,
        spec=_verify_spec(kwargs, build_spec.precision),
        force=kwargs["force"],
    )
    _emit(
        {**_stage_output(result), "ok": bool(result.results.get("passed"))},
        kwargs["as_json"],
        f"report: {result.output(REPORT_FILE)}",
    )
    require_passed(result)


@cli.command("run")
@common_options
@_verify_options
@_calibration_options
@click.option(
    "--precision",
    "precisions",
    type=click.Choice(["fp32", "int8"]),
    multiple=True,
    default=("fp32",),
    show_default=True,
    help="Engines to build; repeatable.",
)
@click.option(
    "--fallback/--no-fallback",
    default=True,
    show_default=True,
    help="int8: keep the most sensitive operators in float until the gate passes.",
)
@click.option(
    "--threads",
    type=int,
    default=0,
    show_default=True,
    help="ONNX Runtime intra-op threads recorded with the engine (0: one per core).",
)
@click.option("--allow-unfused", is_flag=True, help="Warn instead of failing on missing fusions.")
@click.option(
    "--pooling/--no-pooling",
    default=True,
    show_default=True,
    help="Sentence-embedding models: mean pooling + L2 norm in the graph.",
)
def run_command(
    threads: int,
    allow_unfused: bool,
    pooling: bool,
    precisions: tuple[str, ...],
    fallback: bool,
    **kwargs: Any,
) -> None:
    """Run every stage (export, simplify, fuse, [calibrate,] build, verify); exit 5 on failure."""
    from pipeline.build import BuildSpec
    from pipeline.export import ExportSpec
    from pipeline.fuse import FuseSpec
    from pipeline.runner import SUMMARY_FILE, RunSpec, run_pipeline

    info = _resolve(kwargs)
    spec = RunSpec(
        export=ExportSpec(pooling_in_graph=pooling),
        fuse=FuseSpec(require_fusions=not allow_unfused),
        builds=tuple(
            BuildSpec(intra_op_num_threads=threads, precision=p) for p in dict.fromkeys(precisions)
        ),
        verify=_verify_spec(kwargs),
        calibration=_calibration_spec(kwargs),
        fallback=fallback,
    )
    summary = run_pipeline(info=info, out=kwargs["out"], spec=spec, force=kwargs["force"])
    lines = [f"summary: {Path(summary['out']) / SUMMARY_FILE}"]
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
    from pipeline.artifacts import ArtifactDir

    artifact = ArtifactDir(folder)
    artifact.require_complete()
    return artifact.output_path("model.onnx")


def main() -> None:
    """Console entry point."""
    cli(prog_name="bert-compile")


if __name__ == "__main__":
    main()
