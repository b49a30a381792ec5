"""The commands that time and serve engines: bench, package (a Triton model repository) and
serve."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

from bert_compiler.bench.measure import run_bench
from bert_compiler.bench.report import format_table, write_report
from bert_compiler.cli.app import (
    BENCH,
    MAX_LENGTH,
    MODEL,
    PROGRESS,
    cli,
    configure_logging,
    emit,
    json_option,
)
from bert_compiler.cli.options import (
    out_option,
    uses,
)
from bert_compiler.core import progress
from bert_compiler.core.errors import (
    Interrupted,
)
from bert_compiler.core.outdir import claim_output, release_if_unused
from bert_compiler.stages.layout import DEFAULT_OUT, Layout
from bert_compiler.triton.server import (
    LOG_FILE,
    READY_TIMEOUT_S,
    describe,
    find_server,
    plan_serving,
    triton_server,
)


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
@json_option
@uses(PROGRESS)
def bench_command(engine_dirs: tuple[Path, ...], force_out: bool, **values: Any) -> None:
    """Time engines against PyTorch and plain ONNX Runtime on real text and fixed shapes, side
    by side in one process: table on stdout, OUT/bench/bench.json, .txt and .png."""
    configure_logging(values["quiet"])
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
    files = {kind: str(path) for kind, path in written.items()}
    lines = [format_table(report), *(f"{kind}: {path}" for kind, path in written.items())]
    emit({**report.to_json(), "files": files}, values["as_json"], "\n".join(lines))


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
@json_option
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
    Production: NGC's Triton container (docs/guides/triton.md).
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
            emit(summary.to_json(), as_json, summary.lines())
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
