"""bert-compile serve: the Triton guide's package, serve and client lines run as written against the
local Triton it starts, a clean stop on Ctrl-C and SIGTERM, and every failure as one line with
a non-zero exit."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import InputError
from bert_compiler.engines.backend import load_engine
from bert_compiler.models.loading import load_tokenizer
from bert_compiler.runtime.text import tokenize
from bert_compiler.triton.package import package
from bert_compiler.triton.package_spec import PackageSpec
from bert_compiler.triton.repository import open_repository
from bert_compiler.triton.serve_plan import make_view, plan_serving
from bert_compiler.triton.server import (
    PYTHON_SITE_VARIABLE,
    check_port,
    log_error,
)
from tests.conftest import cpu_engine_dir
from tests.triton_server import REPO_ROOT, find_server

SERVER = find_server()
needs_server = pytest.mark.skipif(isinstance(SERVER, str), reason=str(SERVER))
BIN = Path(sys.executable).parent
SENTENCES = ["A man is playing a guitar.", "Ünïcödé façade — naïve café 東京", "Two dogs run."]


def guide_serving_commands() -> list[str]:
    """The command lines of docs/guides/triton.md's two code blocks under "Serving a repository"
    (the local server's), continuation lines joined."""
    text = (REPO_ROOT / "docs" / "guides" / "triton.md").read_text(encoding="utf-8")
    section = text.split("### Serving a repository", 1)[1].split("In production", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the Triton guide's serving section lost a code block"
    commands = [
        " ".join(line.strip() for line in command.split("\\\n"))
        for block in blocks
        for command in re.split(r"(?<!\\)\n", block.strip())
    ]
    return [re.sub(r"\s+#.*$", "", command) for command in commands]  # comments dropped


def _env() -> dict[str, str]:
    # The guide's lines run in an activated .venv: bert-compile and python from there.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def _serve(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "bert-compile"), "serve", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
    )


def _read_until(process: subprocess.Popen, done, timeout: float = 150) -> str:
    """Read ``process``'s stdout until ``done(text)`` holds; fail if it exits or times out. (From
    the file descriptor: select cannot see what a buffered reader holds.)"""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data.decode("utf-8", errors="replace")):
        assert time.monotonic() < deadline, f"timed out; so far: {data!r}"
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                process.wait(timeout=30)
                stderr = process.stderr.read()
                pytest.fail(f"serve exited ({process.returncode}): {data!r} {stderr}")
            data += chunk
    return data.decode("utf-8")


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _running_with(text: str) -> list[int]:
    """The processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_text(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _stopped(process: subprocess.Popen, how: signal.Signals) -> str:
    process.send_signal(how)
    _stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 0, stderr
    assert stderr.strip().splitlines()[-1] == f"bert-compile: {how.name}: tritonserver stopped"
    assert "Traceback" not in stderr
    return stderr


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def repository(tiny_run, tmp_path_factory):
    info, out, _spec, _summary = tiny_run
    path = tmp_path_factory.mktemp("serve") / "repo"
    package(info=info, out=out, repository=path, spec=PackageSpec(python_cpu_engine=True))
    return info, out, path


@pytest.mark.e2e
@needs_server
def test_the_guide_lines_serve_and_stop_on_ctrl_c(tiny_run, tiny_embedding_model, tmp_path):
    info, out, _spec, _summary = tiny_run
    commands = guide_serving_commands()
    assert [c.split(" --")[0] for c in commands] == [
        "scripts/setup.sh",
        "source .venv/bin/activate",
        "bert-compile package",
        "bert-compile serve",
        "python scripts/triton_client.py",
        "python scripts/triton_client.py",
    ]
    _setup, _activate, package_line, serve_line, http_line, grpc_line = commands
    repo = tmp_path / "repo"

    def ours(command: str) -> str:
        # The tiny model's names and folders; the rest as written.
        return command.replace("all-MiniLM-L6-v2", info.name).replace(
            "bert-compile-out/triton", str(repo)
        )

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "scripts").symlink_to(REPO_ROOT / "scripts")
    (cwd / "sentences.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")

    def bash(command: str, **kwargs):
        return subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True, text=True, **kwargs
        )

    # The tiny model, the shared run's engines, the test's repository: the rest as written.
    tiny = f"--model {tiny_embedding_model} --out {out} --repository {repo}"
    packaged = bash(f"{ours(package_line)} {tiny}", timeout=300)
    assert packaged.returncode == 0, packaged.stderr
    assert f"{info.name}-ort-cpu-fp32-python-text (python-text)" in packaged.stdout

    # 8000 and 8001 may be taken on a shared machine: free ones, printed, replace them below.
    serve = subprocess.Popen(
        ["bash", "-c", f"exec {ours(serve_line)} --http-port 0 --grpc-port 0"],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = ""
    try:
        shown = _read_until(serve, lambda text: "  try: " in text)
        http = re.search(r"HTTP: http://127\.0\.0\.1:(\d+)\n", shown).group(1)
        grpc = re.search(r"gRPC: 127\.0\.0\.1:(\d+)\n", shown).group(1)
        for model in ("tokenizer", "ort-cpu-fp32-python-text"):
            assert f"  model: {info.name}-{model}\n" in shown
        assert f"not served: {info.name}-ort-cpu-fp32 (needs the onnxruntime backend)" in shown
        (server_pid,) = _children(serve.pid)

        engine, _ = load_engine(cpu_engine_dir(out))
        hf = load_tokenizer(info)

        def embeddings(texts):
            return engine.run(tokenize(hf, texts, info, info.max_length))["sentence_embedding"]

        def local(command: str) -> str:
            command = command.replace("localhost:8000", f"localhost:{http}")
            return ours(command.replace("localhost:8001", f"localhost:{grpc}"))

        result = bash(local(http_line), timeout=60)
        assert result.returncode == 0, result.stderr
        assert f"sentence_embedding: shape [1, {info.hidden_size}]" in result.stderr
        printed = re.search(r"\[([^\]]*)\] \.\.\.$", result.stdout.strip()).group(1)
        expected = embeddings(["A man plays a guitar."])[0, :4]
        np.testing.assert_allclose(np.array(printed.split(), dtype=float), expected, atol=1e-4)

        result = bash(local(grpc_line), timeout=60)
        assert result.returncode == 0, result.stderr
        got = np.array(json.loads(result.stdout.strip().splitlines()[-1])["sentence_embedding"])
        np.testing.assert_allclose(got, embeddings(SENTENCES), atol=1e-5)
    finally:
        if serve.poll() is None:
            stderr = _stopped(serve, signal.SIGINT)
    assert "serving; Ctrl-C stops it" in stderr
    # The server is gone (reaped), its ports free, its temporary folder removed.
    assert _gone(server_pid)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", int(http))):
        pass
    assert not Path(re.search(r"  log: (.*)\n", shown).group(1)).parent.exists()
    # The repository is as package wrote it: no bytecode, the gate's file checks pass, and the
    # same package line finds it up to date.
    assert not list(repo.rglob("__pycache__"))
    open_repository(repo)
    again = bash(f"{ours(package_line)} {tiny} --json", timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["skipped"]


@pytest.mark.e2e
@needs_server
def test_sigterm_stops_cleanly_and_a_server_killed_while_serving_is_one_line(repository):
    _info, _out, repo = repository
    serve = _serve("--repository", repo, "--http-port", 0, "--grpc-port", 0, "--json")
    try:
        shown = json.loads(_read_until(serve, lambda text: text.endswith("}\n")))
    finally:
        _stopped(serve, signal.SIGTERM)
    assert shown["ok"] and shown["models"] and shown["server"]["backends"] == ["python"]
    assert _gone(shown["pid"])

    serve = _serve("--repository", repo, "--http-port", 0, "--grpc-port", 0, "--json")
    try:
        shown = json.loads(_read_until(serve, lambda text: text.endswith("}\n")))
        os.kill(shown["pid"], signal.SIGKILL)
        _stdout, stderr = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert serve.returncode == 6
    line = _error_line(stderr)
    assert line.startswith(
        "bert-compile: environment error: tritonserver exited (killed by SIGKILL) while serving; "
        "its log: "
    )
    # Its log is kept, where the line says.
    log = Path(line.rsplit("its log: ", 1)[1])
    assert log.is_file() and [p.name for p in log.parent.iterdir()] == [log.name]
    shutil.rmtree(log.parent)


@pytest.mark.e2e
@needs_server
def test_a_model_instance_process_killed_while_serving_stops_serving_in_one_line(repository):
    """Triton keeps a model whose Python stub died "ready", logs nothing, and fails the
    requests routed to it: serve notices the stub's exit, stops, and says which instance."""
    from bert_compiler.triton.server import python_stubs

    _info, _out, repo = repository
    serve = _serve("--repository", repo, "--http-port", 0, "--grpc-port", 0, "--json")
    try:
        shown = json.loads(_read_until(serve, lambda text: text.endswith("}\n")))
        stubs = python_stubs(shown["pid"])
        assert stubs and {i.rsplit("_", 2)[0] for i in stubs.values()} <= set(shown["models"])
        victim, instance = sorted(stubs.items())[0]
        os.kill(victim, signal.SIGKILL)
        _stdout, stderr = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert serve.returncode == 6
    line = _error_line(stderr)
    assert line.startswith(
        f"bert-compile: environment error: model instance {instance} (Python process {victim}) "
        "exited while serving"
    )
    assert _gone(shown["pid"]) and all(_gone(pid) for pid in stubs)
    shutil.rmtree(Path(line.rsplit("its log: ", 1)[1]).parent)


@pytest.mark.e2e
@needs_server
def test_a_server_that_fails_to_load_a_model_is_one_line(repository, tmp_path):
    _info, _out, repo = repository
    empty = tmp_path / "site" / SERVER.python_site.name
    empty.mkdir(parents=True)
    (empty / ".complete").touch()  # "installed", yet no numpy for the tokenizer model
    serve = _serve(
        "--repository", repo, "--http-port", 0, "--grpc-port", 0,
        env={**_env(), PYTHON_SITE_VARIABLE: str(tmp_path / "site")},
    )  # fmt: skip
    try:
        stdout, stderr = serve.communicate(timeout=150)
    finally:
        serve.kill()
    assert serve.returncode == 6 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert "tritonserver exited (code 1) before it was ready" in line
    assert "No module named 'numpy'" in line and "its log: " in line
    shutil.rmtree(Path(line.rsplit("its log: ", 1)[1]).parent)


@pytest.mark.e2e
@needs_server
def test_a_server_not_ready_in_time_is_stopped_with_one_line(repository):
    _info, _out, repo = repository
    serve = _serve("--repository", repo, "--http-port", 0, "--grpc-port", 0, "--ready-timeout", 0.1)
    try:
        stdout, stderr = serve.communicate(timeout=90)
    finally:
        serve.kill()
    assert serve.returncode == 6 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith("bert-compile: environment error: tritonserver not ready after 0.1 s")
    log = Path(line.rsplit("its log: ", 1)[1])
    assert not _running_with(str(log.parent))  # the server was stopped, not left running
    shutil.rmtree(log.parent)


@pytest.mark.e2e
@needs_server
def test_a_port_in_use_is_one_line(repository):
    _info, _out, repo = repository
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = _serve("--repository", repo, "--http-port", port, "--grpc-port", 0)
        try:
            stdout, stderr = serve.communicate(timeout=60)
        finally:
            serve.kill()
    assert serve.returncode == 3 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line == (
        f"bert-compile: input error: 127.0.0.1:{port} is in use (another server?); stop that or "
        "choose another --http-port"
    )


def _invoke(*args, env=None):
    return CliRunner().invoke(cli, ["serve", *map(str, args)], env=env)


def _one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    (line,) = result.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize(
    ("make", "code", "message"),
    [
        (lambda tmp: tmp / "missing", 3, "no such folder; write a repository first"),
        (lambda tmp: tmp, 3, "not a Triton repository bert-compile wrote (no manifest.json)"),
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", 3, "a file, not a"),
    ],
    ids=["missing", "not-a-repository", "a-file"],
)
def test_what_is_no_repository_is_one_line(tmp_path, make, code, message):
    (tmp_path / "notes.txt").write_text("mine")
    line = _one_line(_invoke("--repository", make(tmp_path)), code)
    assert line.startswith("bert-compile: input error: ") and message in line


@pytest.mark.e2e
def test_bytecode_in_the_repository_is_refused_unread(repository, tmp_path):
    _info, _out, repo = repository
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    planted = next(copy.glob("*-tokenizer")) / "1" / "__pycache__"
    planted.mkdir()
    (planted / "model.cpython-311.pyc").write_bytes(b"\x00" * 16)
    line = _one_line(_invoke("--repository", copy), 8)
    assert line.startswith(f"bert-compile: artifact error: {planted}: Python bytecode")
    assert "remove it" in line


@pytest.mark.e2e
def test_a_users_own_model_is_refused_unless_named_and_never_served(repository, tmp_path):
    info, _out, repo = repository
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    (copy / "mine" / "1").mkdir(parents=True)
    (copy / "mine" / "config.pbtxt").write_text('backend: "python"\n')
    line = _one_line(_invoke("--repository", copy), 8)
    assert "['mine'] are not in its manifest" in line and "--allow-foreign" in line
    plan = plan_serving(copy, foreign=["mine"])
    assert "mine" not in plan.models and f"{info.name}-ort-cpu-fp32-python-text" in plan.models
    view = make_view(plan, tmp_path / "view")
    assert sorted(p.name for p in view.iterdir()) == sorted(plan.models)
    assert not (view / f"{info.name}-ort-cpu-fp32").exists()  # not served: not in the view


@pytest.mark.e2e
def test_a_repository_without_a_python_engine_says_to_package_with_python_cpu_engine(
    tiny_run, tmp_path
):
    info, out, _spec, _summary = tiny_run
    package(info=info, out=out, repository=tmp_path / "repo", spec=PackageSpec())
    line = _one_line(_invoke("--repository", tmp_path / "repo"), 6)
    assert "needs the onnxruntime" not in line  # the summary, not each model
    assert "its engines need the onnxruntime backend" in line
    assert "package again with --python-cpu-engine" in line


@pytest.mark.e2e
def test_no_local_server_is_one_line(repository, tmp_path):
    _info, _out, repo = repository
    line = _one_line(_invoke("--repository", repo, env={PYTHON_SITE_VARIABLE: str(tmp_path)}), 6)
    assert "no packages for the Triton Python backend" in line
    assert "scripts/setup.sh --triton-server" in line


def test_the_log_line_that_says_why(tmp_path):
    log = tmp_path / "tritonserver.log"

    def error_of(text: str) -> str:
        log.write_text(text)
        return log_error(log)

    log_lines = [
        'I1124 11:22:47.07 23547 server.cc:305] "Waiting for in-flight requests to complete."',
        "E1124 11:22:47.07 23547 model_lifecycle.cc:654] \"failed to load 'm' version 1: "
        "Internal: ModuleNotFoundError: No module named 'numpy'\"",
        'I1124 11:22:48.07 23547 server.cc:345] "Timeout 29: Found 0 live models"',
    ]
    final = "error: creating server: Invalid argument - load failed for model 'm'"
    assert error_of("\n".join(log_lines)) == (
        "failed to load 'm' version 1: Internal: ModuleNotFoundError: No module named 'numpy'"
    )
    assert error_of("\n".join([*log_lines, final, ""])) == final
    assert error_of("just this\n\n") == "just this"
    assert error_of("") == "empty log"
    long = error_of("x" * 1000)
    assert long.endswith("...") and len(long) == 400
    assert log_error(tmp_path / "missing.log").startswith("no log")
    # What the CPU server logs at every start is never the reason.
    cuda = (
        'E1124 11:54:47.86 6318 ensemble_scheduler.cc:1468] "unable to create stream for m: '
        'CUDA driver version is insufficient for CUDA runtime version"'
    )
    assert error_of("\n".join([log_lines[1], cuda])).startswith("failed to load 'm'")


def test_a_port_in_use_is_refused_before_the_server_starts():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(InputError, match=f"127.0.0.1:{port} is in use.*--grpc-port"):
            check_port("127.0.0.1", port, "--grpc-port")
    check_port("127.0.0.1", port, "--grpc-port")  # free again
    check_port("127.0.0.1", 0, "--http-port")  # 0: any free port


def test_a_model_on_gpu_instances_is_served_only_where_a_gpu_is():
    """A torch engine's text model on KIND_GPU: left out, saying why, on a machine without a
    GPU; loaded where one is. A CPU model and ensembles are unaffected."""
    from bert_compiler.triton import config as tc
    from bert_compiler.triton.serve_plan import LOCAL_BACKENDS, unservable

    text = [tc.TensorSpec("TEXT", "TYPE_STRING", (1,))]
    out = [tc.TensorSpec("sentence_embedding", "TYPE_FP32", (8,))]
    common = {"inputs": text, "outputs": out, "max_batch_size": 8, "parameters": {}}
    gpu = tc.python_config(name="m-pt-cuda-fp16-text", gpu=True, **common)
    cpu = tc.python_config(name="m-pt-cpu-fp32-text", **common)
    no_gpu = "no nvidia-smi on PATH: no NVIDIA driver, so no GPU"
    assert unservable(gpu, LOCAL_BACKENDS, no_gpu) == (
        "runs on GPU instances (KIND_GPU), and no nvidia-smi on PATH: no NVIDIA driver, so no GPU"
    )
    assert unservable(gpu, LOCAL_BACKENDS, "") == ""
    assert unservable(cpu, LOCAL_BACKENDS, no_gpu) == ""
    assert unservable(gpu, {"onnxruntime"}, "") == "needs the python backend"
    assert "KIND_GPU" in tc.render(gpu) and "KIND_CPU" in tc.render(cpu)
