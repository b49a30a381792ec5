"""A real Triton Inference Server for tests, on loopback only.

The server is ``tritonserver`` from the PyPI wheel nvidia-pytriton (installed by
``scripts/setup.sh --triton-server``, without pytriton's own Python dependencies): a CPU build
with the Python backend only, so it serves the tokenizer model, Python-backend engine models and
their ensembles, not the onnxruntime or tensorrt backends.

Its Python-backend stub embeds the system Python (it links libpythonX.Y) and ignores PYTHONPATH,
but keeps '' (its working directory) on sys.path: the server is started from the folder where
setup installed numpy 1.x, tokenizers and onnxruntime for that Python (numpy 2 garbles string
tensors in this stub build).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 120


@dataclass(frozen=True)
class ServerFiles:
    binary: Path
    libraries: Path
    backend: Path
    stub: Path
    python_site: Path


def find_server() -> ServerFiles | str:
    """The server's files, or why this machine cannot start it (a skip reason)."""
    try:
        dist = importlib.metadata.distribution("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        return "nvidia-pytriton is not installed (scripts/setup.sh --triton-server)"
    root = Path(dist.locate_file("pytriton/tritonserver"))
    try:
        version = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no /usr/bin/python3 for the Python backend stub to embed"
    files = ServerFiles(
        binary=root / "bin" / "tritonserver",
        libraries=Path(dist.locate_file("nvidia_pytriton.libs")),
        backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        python_site=Path(
            os.environ.get("BERT_COMPILE_TRITON_PYTHON", REPO_ROOT / ".venv" / "triton-python")
        )
        / version,
    )
    for path in (files.binary, files.stub, files.backend / "libtriton_python.so"):
        if not path.is_file():
            return f"{path} is missing from nvidia-pytriton"
    if not (files.python_site / ".complete").is_file():
        return f"{files.python_site}: no packages for the stub (scripts/setup.sh --triton-server)"
    return files


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    http: str
    grpc: str
    log: Path


@contextlib.contextmanager
def triton_server(
    files: ServerFiles, repository: Path, models: Sequence[str], workdir: Path
) -> Iterator[RunningServer]:
    """Start the server on ``repository`` loading ``models`` (explicit control mode), wait until
    it is ready, and stop it afterwards.

    Raises:
        RuntimeError: the server exited or was not ready in time (its log tail included).
    """
    backends = workdir / "backends" / "python"
    backends.mkdir(parents=True)
    sources = [
        files.backend / "libtriton_python.so",
        files.backend / "triton_python_backend_utils.py",
    ]
    for source in (*sources, files.stub):
        shutil.copy2(source, backends / source.name)
    http_port, grpc_port = _free_port(), _free_port()
    log = workdir / "tritonserver.log"
    command = [
        str(files.binary),
        f"--model-repository={repository}",
        f"--backend-directory={backends.parent}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=false",
        "--model-control-mode=explicit",
        *(f"--load-model={m}" for m in models),
    ]
    env = {**os.environ, "LD_LIBRARY_PATH": str(files.libraries)}
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command, cwd=files.python_site, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(process, f"http://127.0.0.1:{http_port}/v2/health/ready", log)
        yield RunningServer(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    # No proxy: the server is on loopback whatever *_proxy variables say.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited ({process.returncode}):\n{_tail(log)}")
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"tritonserver not ready after {READY_TIMEOUT_S} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
