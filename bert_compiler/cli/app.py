"""The `bert-compile` group and what every command shares: one line and an exit code for each
error (and the JSON line with --json), logging, the option group instances, and the stage
commands' wrapper (config file, model, output folder claimed and locked)."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import click

from bert_compiler.cli.bench_options import BenchOptions
from bert_compiler.cli.config import apply_config
from bert_compiler.cli.options import (
    CalibrationOptions,
    FallbackOptions,
    FuseOptions,
    MaxLengthOptions,
    ModelOptions,
    ProgressOptions,
    TargetOptions,
    TextOptions,
    VerifyOptions,
    out_option,
    uses,
)
from bert_compiler.cli.package_options import PackageOptions
from bert_compiler.cli.sweep_options import SweepOptions
from bert_compiler.core import progress
from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import (
    NO_SPACE_ERRNOS,
    BertCompileError,
    InputError,
    Interrupted,
    UnsupportedModelError,
    is_rust_panic,
)
from bert_compiler.core.lock import output_lock
from bert_compiler.core.outdir import claim_output, release_if_unused
from bert_compiler.core.stage import StageResult
from bert_compiler.models.loading import ModelInfo
from bert_compiler.stages.export import MODEL_FILE
from bert_compiler.stages.layout import Layout

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


json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    is_eager=True,
    callback=_set_json,
    help="Print one JSON object as the last stdout line.",
)


def configure_logging(quiet: bool) -> None:
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
    @json_option
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        configure_logging(kwargs["quiet"])
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


def emit(result: dict[str, Any], as_json: bool, human: str) -> None:
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


def stage_output(result: StageResult) -> dict[str, Any]:
    return {
        "ok": True,
        "stage": result.stage,
        "path": str(result.path),
        "skipped": result.skipped,
        "results": result.results,
    }


def stage_file(folder: Path) -> Path:
    """The model.onnx of a complete stage folder, checked against its manifest."""
    artifact = ArtifactDir(folder)
    artifact.require_complete()
    return artifact.output_path(MODEL_FILE)


def model_stage_file(layout: Layout, folder: Path, info: ModelInfo) -> Path:
    """``stage_file`` for a stage that reads ``info`` beside the graph: the graphs under OUT
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
    return stage_file(folder)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bert-compiler")
def cli() -> None:
    """Compile BERT-family encoders into verified inference engines.

    Stages: export -> simplify -> fuse -> [calibrate ->] build -> verify; `run` chains them and
    skips what is up to date; `targets` shows what this machine can build for. Each stage writes
    OUT/<stage>/ with a manifest.json (inputs' and outputs' sha256, tool versions, settings,
    results).
    """
