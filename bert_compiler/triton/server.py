"""A local Triton Inference Server for a repository `package` wrote: `bert-compile serve`,
scripts/triton_load.py and the tests start it here.

The server is ``tritonserver`` from the PyPI wheel nvidia-pytriton (installed by
``scripts/setup.sh --triton-server``, without pytriton's own Python dependencies): a CPU build
with the Python backend only, so it serves the tokenizer model, Python-backend engine models
(``package --python-cpu-engine``) and their ensembles, not the onnxruntime or tensorrt backends
(production runs NGC's Triton container, which has them: docs/guides/triton.md).

Its Python-backend stub embeds the system Python (it links libpythonX.Y) with an isolated
configuration: it ignores PYTHONPATH, PYTHONDONTWRITEBYTECODE and PYTHONPYCACHEPREFIX, but keeps
'' (its working directory) on sys.path, so it is started from the folder where setup installed
numpy 1.x, tokenizers and onnxruntime for that Python (numpy 2 garbles string tensors in this
stub build), with only the system folders on PATH (where it looks for `python3` to find its
prefix: an activated virtual environment would lend it that environment's packages).

Since no setting reaches that Python, it would write ``1/__pycache__/model.*.pyc`` beside each
model.py it imports; Triton is therefore pointed at a view of the repository instead (a
temporary folder of copies of the repository's files, each checked against the manifest, only
the models served), which takes that bytecode and leaves the repository as `package` wrote it.
The server loads the view's models at start with model control off: no load, reload or upload
through its repository API (docs/security.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bert_compiler.core.errors import EnvironmentProblem, InputError, Interrupted
from bert_compiler.triton import config as tc
from bert_compiler.triton.serve_plan import LOCAL_BACKENDS, ServePlan, make_view

# Re-exported: `bert-compile serve`, scripts/triton_load.py and the tests plan a server here.
from bert_compiler.triton.serve_plan import plan_serving as plan_serving
from bert_compiler.triton.tokenizer_model import TEXT_PAIR_INPUT

DISTRIBUTION = "nvidia-pytriton"
READY_TIMEOUT_S = 120.0
# Triton waits this long for requests in flight when it stops; the launcher waits a little longer
# before it kills the server.
EXIT_TIMEOUT_S = 10
STOP_GRACE_S = 20.0
# How long the server's Python-backend stubs get to exit after it did.
STUB_GRACE_S = 10.0
LOG_FILE = "tritonserver.log"
# How often a serving server's model instances are looked at (RunningServer.wait).
WATCH_POLL_S = 1.0
# The server's PATH: the folder of the system Python whose libpython the stub links.
SYSTEM_PATH = "/usr/bin:/bin"
# Where setup installs the packages of the stub's Python: $VENV/triton-python/X.Y.
PYTHON_SITE_VARIABLE = "BERT_COMPILE_TRITON_PYTHON"


@dataclass(frozen=True)
class ServerFiles:
    """The local server's files: binary, libraries, the Python backend and its stub, and the
    packages of the stub's Python."""

    binary: Path
    libraries: Path
    backend: Path
    stub: Path
    python_site: Path
    version: str


def find_server() -> ServerFiles:
    """The local Triton server's files.

    Raises:
        EnvironmentProblem: nvidia-pytriton, the system Python its stub embeds, or the packages
            of that Python are missing (scripts/setup.sh --triton-server installs them).
    """
    setup = "run scripts/setup.sh --triton-server, or serve the repository with NGC's Triton"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise EnvironmentProblem(
            f"no local Triton server: {DISTRIBUTION} is not installed; {setup}"
        ) from None
    root = Path(str(dist.locate_file("pytriton/tritonserver")))
    try:
        python = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise EnvironmentProblem(
            f"no local Triton server: its Python backend embeds /usr/bin/python3, which does "
            f"not run ({err})"
        ) from err
    site = os.environ.get(PYTHON_SITE_VARIABLE) or Path(sys.prefix) / "triton-python"
    files = ServerFiles(
        binary=root / "bin" / "tritonserver",
        libraries=Path(str(dist.locate_file("nvidia_pytriton.libs"))),
        backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / python / "triton_python_backend_stub",
        python_site=Path(site) / python,
        version=dist.version,
    )
    for path in (files.binary, files.stub, files.backend / "libtriton_python.so"):
        if not path.is_file():
            raise EnvironmentProblem(f"{path}: missing from {DISTRIBUTION} {dist.version}; {setup}")
    if not (files.python_site / ".complete").is_file():
        raise EnvironmentProblem(
            f"{files.python_site}: no packages for the Triton Python backend's Python {python} "
            f"(numpy, tokenizers, onnxruntime); {setup}"
        )
    return files


@dataclass
class RunningServer:
    """A started server: where it listens, what it serves, and its process."""

    http: str
    grpc: str
    models: tuple[str, ...]
    skipped: Mapping[str, str]
    # The repository, and the view of it Triton reads (and writes Python bytecode into).
    repository: Path
    view: Path
    log: Path
    process: subprocess.Popen
    version: str = ""
    # pid -> model instance of each Python model instance's process (python_stubs), once ready.
    stubs: Mapping[int, str] = field(default_factory=dict)

    def wait(self, poll_s: float = WATCH_POLL_S) -> None:
        """Block while the server and every model instance's Python process run.

        A Python model instance runs in a stub process of its own; when one exits (killed, out
        of memory, a crash in native code), Triton keeps serving and reporting the model ready,
        writes nothing to its log, and fails every request it routes to that instance ("Stub
        process ... is not healthy"). So a dead stub stops serving, in one line, as a dead
        server does: whatever restarts the service brings it back whole.

        Raises:
            EnvironmentProblem: the server or a model instance's process exited (each is
                expected to run until stopped).
        """
        while True:
            try:
                code = self.process.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                dead = next((s for s in self.stubs.items() if not _running(s[0])), None)
                if dead is None:
                    continue
                pid, instance = dead
                raise EnvironmentProblem(
                    f"model instance {instance} (Python process {pid}) exited while serving: "
                    "Triton fails every request it routes there; serving stopped, start it "
                    f"again; its log: {self.log}"
                ) from None
            # Killed by a signal, the log says nothing of why.
            why = "" if code < 0 else f": {log_error(self.log)}"
            raise EnvironmentProblem(
                f"tritonserver exited ({_exit_status(code)}) while serving{why}; its log: "
                f"{self.log}"
            )


def python_stubs(server_pid: int) -> dict[int, str]:
    """The Python backend's stub processes of a server: pid -> the model instance it runs
    (its command line's instance argument, e.g. M-tokenizer_0_1); empty where /proc is not."""
    stubs = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(_stat_fields(entry)[1]) != server_pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
        if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 8:
            stubs[int(entry.name)] = argv[8].decode(errors="replace")
    return stubs


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited and not yet reaped by its parent, does not)."""
    try:
        return _stat_fields(Path(f"/proc/{pid}"))[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _stat_fields(process: Path) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and
    parentheses): state, parent pid, ..."""
    return (process / "stat").read_text().rsplit(")", 1)[1].split()


def check_port(host: str, port: int, option: str) -> None:
    """Refuse a port another process listens on, before the server is started.

    Raises:
        InputError: the port is taken (or the address cannot be bound here).
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As servers bind: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            what = "in use" if err.errno == errno.EADDRINUSE else f"not usable ({err.strerror})"
            raise InputError(
                f"{host}:{port} is {what} (another server?); stop that or choose another {option}"
            ) from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _die_with_parent() -> Any:
    """A function for the child to run before exec (Linux): it gets SIGTERM if the launcher dies
    without stopping it (SIGKILL), instead of holding its ports as an orphan. libc is loaded
    here, in the parent: nothing is loaded between fork and exec."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_death_signal() -> None:  # pragma: no cover - runs in the child
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return set_death_signal


@contextlib.contextmanager
def triton_server(
    files: ServerFiles,
    plan: ServePlan,
    workdir: Path,
    *,
    host: str = "127.0.0.1",
    http_port: int = 0,
    grpc_port: int = 0,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[RunningServer]:
    """Start the server on a view of ``plan``'s repository (``workdir/repository``: nothing is
    written into the repository itself), wait until it and every planned model are ready, and
    stop it afterwards: SIGTERM, then SIGKILL if it has not stopped after ``STOP_GRACE_S``
    (or at a second SIGINT/SIGTERM while it stops). Port 0 picks a free port.

    The server runs in its own process group, so a Ctrl-C in the launcher's terminal reaches
    the launcher, which stops the server, and not the server directly.

    Raises:
        InputError: a port is in use.
        EnvironmentProblem: the server exited or was not ready in time (the error line of its
            log, and where the log is), or it had to be killed when it was stopped.
    """
    http_port, grpc_port = _choose_ports(host, http_port, grpc_port)
    workdir = Path(workdir)
    backends = _copy_python_backend(files, workdir / "backends" / "python")
    view = make_view(plan, workdir / "repository")
    log = workdir / LOG_FILE
    command = _server_command(
        files, view, backends.parent, host=host, http_port=http_port, grpc_port=grpc_port
    )
    env = _server_environment(files)
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            command,
            cwd=files.python_site,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    address = f"[{host}]" if ":" in host else host
    server = RunningServer(
        http=f"{address}:{http_port}",
        grpc=f"{address}:{grpc_port}",
        models=plan.models,
        skipped=plan.skipped,
        repository=plan.repository.path,
        view=view,
        log=log,
        process=process,
    )
    try:
        server.version = _wait_ready(server, ready_timeout_s)
        # Every instance's process is up once the server is ready: the set wait() watches.
        server.stubs = python_stubs(process.pid)
        yield server
    except BaseException as err:
        if not stop(process) and isinstance(err, Interrupted):
            raise _killed(log) from err
        raise
    if not stop(process):
        raise _killed(log)


def _choose_ports(host: str, http_port: int, grpc_port: int) -> tuple[int, int]:
    """The HTTP and gRPC ports, each checked free, a free one where 0 was given.

    Raises:
        InputError: a port is in use, or both are the same.
    """
    check_port(host, http_port, "--http-port")
    check_port(host, grpc_port, "--grpc-port")
    http_port = http_port or _free_port(host)
    grpc_port = grpc_port or _free_port(host)
    if http_port == grpc_port:
        raise InputError(f"--http-port and --grpc-port are both {http_port}; give two ports")
    return http_port, grpc_port


def _copy_python_backend(files: ServerFiles, backends: Path) -> Path:
    """The Python backend and its stub, copied into ``backends`` (a new folder); returns it."""
    backends.mkdir(parents=True)
    for source in (
        files.backend / "libtriton_python.so",
        files.backend / "triton_python_backend_utils.py",
        files.stub,
    ):
        shutil.copy2(source, backends / source.name)
    return backends


def _server_command(
    files: ServerFiles,
    view: Path,
    backend_directory: Path,
    *,
    host: str,
    http_port: int,
    grpc_port: int,
) -> list[str]:
    """The tritonserver command line serving ``view``."""
    return [
        str(files.binary),
        f"--model-repository={view}",
        f"--backend-directory={backend_directory}",
        f"--http-address={host}",
        f"--grpc-address={host}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=false",
        # Every model of the view, loaded at start, and no load or unload afterwards: with
        # explicit control, Triton's unauthenticated repository API reloads models and loads
        # uploaded Python (a load request's file: overrides) for any local process.
        "--model-control-mode=none",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
    ]


def _server_environment(files: ServerFiles) -> dict[str, str]:
    """The server's environment: this one, with the wheel's libraries and the system PATH."""
    return {
        **os.environ,
        "LD_LIBRARY_PATH": str(files.libraries),
        # The stub's Python finds its prefix (stdlib, site-packages) by looking for `python3` on
        # PATH: with an activated virtual environment first on it, the stub would import that
        # environment's packages (numpy 2) and another Python's stdlib. It links the system
        # libpython, so it gets the system Python's folders.
        "PATH": SYSTEM_PATH,
    }


def _killed(log: Path) -> EnvironmentProblem:
    return EnvironmentProblem(
        f"tritonserver did not stop cleanly within {STOP_GRACE_S:.0f} s of SIGTERM, or a second "
        f"signal came: killed; its log: {log}"
    )


def stop(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM the server and wait for it; SIGKILL it after ``grace_s`` or when SIGINT/SIGTERM
    arrives meanwhile (a second Ctrl-C). Then wait for its Python-backend stubs (its process
    group): a server stopped while it loads models can leave them running for a few seconds.

    Returns:
        True when it had already exited, or exited by itself with code 0 (Triton's clean stop);
        False when it failed to stop cleanly or was killed.
    """
    clean = True
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            clean = process.wait(timeout=grace_s) == 0
        except (subprocess.TimeoutExpired, Interrupted):
            process.kill()
            process.wait()
            clean = False
    _reap_group(process.pid)
    return clean


def _reap_group(group: int, grace_s: float = STUB_GRACE_S) -> None:
    """Wait for the processes left in the server's process group (its stubs exit once they see
    the server gone); SIGKILL what is left after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    try:
        try:
            while time.monotonic() < deadline:
                os.killpg(group, 0)
                time.sleep(0.1)
        finally:  # the grace is over, or a second Ctrl-C came
            os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is empty


def _wait_ready(server: RunningServer, timeout_s: float) -> str:
    """Poll the server until it and every model it loads are ready; returns its version.

    Raises:
        EnvironmentProblem: it exited, or was not ready within ``timeout_s``.
    """
    # No proxy: the server is local whatever *_proxy variables say.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://{server.http}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise EnvironmentProblem(
                f"tritonserver exited ({_exit_status(code)}) before it was ready: "
                f"{log_error(server.log)}; its log: {server.log}"
            )
        try:
            with opener.open(f"{base}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    with opener.open(f"{base}/v2", timeout=2) as metadata:
                        return str(json.load(metadata).get("version", ""))
        except (OSError, ValueError):
            pass
        time.sleep(0.25)
    raise EnvironmentProblem(
        f"tritonserver not ready after {timeout_s:g} s (its last error: "
        f"{log_error(server.log)}); stopped; its log: {server.log}"
    )


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


# Triton's error lines: "error: creating server: ..." at the end of a failed start, and
# "E1124 11:22:47.07 123 file.cc:42] message" log lines.
_ERROR_LINE = re.compile(r"^(?:error: |E\d{4} [\d:.]+ +\d+ [^\]]+\] )(.*)$")
# Error lines every start of the CPU server logs (it was built with CUDA): never the cause.
_NOISE = ("CUDA driver version is insufficient", "CudaDriverHelper has not been initialized")


def log_error(log: Path, limit: int = 400) -> str:
    """The most telling line of a server log: its final ``error:`` line, else the last error
    line, else the last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError as err:
        return f"no log ({err.strerror})"
    lines = [line for line in lines if line]
    final = [line for line in lines if line.startswith("error: ")]
    errors = [
        m.group(1)
        for m in map(_ERROR_LINE.match, lines)
        if m and not any(noise in m.group(1) for noise in _NOISE)
    ]
    # A model that fails to load ends the start with "failed to load all models": the model's
    # own error line says why.
    specific = [line for line in errors if "failed to load all models" not in line]
    if final and "failed to load all models" in final[-1] and specific:
        final, errors = [], specific
    text = final[-1] if final else errors[-1] if errors else lines[-1] if lines else "empty log"
    text = text.strip().strip('"')
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _takes_pairs(repository: Path, model: str) -> bool:
    path = Path(repository) / model / tc.CONFIG_FILE
    inputs, _outputs = tc.tensor_specs(tc.parse(path.read_text(encoding="utf-8"), path))
    return any(tensor.name == TEXT_PAIR_INPUT for tensor in inputs)


@dataclass(frozen=True)
class ServeSummary:
    """What `bert-compile serve` prints: where the server listens and what it serves."""

    repository: Path
    triton: str
    distribution_version: str
    # host:port, as tritonclient takes them.
    http: str
    grpc: str
    models: tuple[str, ...]
    # Cross-encoders' models: they take TEXT_PAIR beside TEXT.
    text_pairs: tuple[str, ...]
    not_served: Mapping[str, str]
    log: Path
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "repository": str(self.repository),
            "server": {
                "triton": self.triton,
                DISTRIBUTION: self.distribution_version,
                "backends": sorted(LOCAL_BACKENDS),
            },
            "http": self.http,
            "grpc": self.grpc,
            "models": list(self.models),
            "text_pairs": list(self.text_pairs),
            "not_served": dict(self.not_served),
            "log": str(self.log),
            "pid": self.pid,
        }

    def lines(self) -> str:
        """Where it listens, each model served and each left out with why, the log, and a
        client line to try the first text model with."""
        lines = [
            f"serving {self.repository} with Triton {self.triton} ({DISTRIBUTION} "
            f"{self.distribution_version}: {', '.join(sorted(LOCAL_BACKENDS))} backend only)",
            f"  HTTP: http://{self.http}",
            f"  gRPC: {self.grpc}",
            *(f"  model: {name}" for name in self.models),
            *(f"  not served: {name} ({why})" for name, why in self.not_served.items()),
            f"  log: {self.log}",
        ]
        text_models = [m for m in self.models if m.endswith("-text")]
        if text_models:
            # A cross-encoder's text model scores pairs: query<TAB>passage, as bash's $'...'
            # writes it.
            text = (
                "$'A man plays a guitar.\\tSomeone plays music.'"
                if text_models[0] in self.text_pairs
                else "'A man plays a guitar.'"
            )
            lines.append(
                f"  try: python scripts/triton_client.py --url {self.http} --model "
                f"{text_models[0]} {text}"
            )
        return "\n".join(lines)


def describe(server: RunningServer, files: ServerFiles, repository: Path) -> ServeSummary:
    """What `bert-compile serve` says of a running server."""
    return ServeSummary(
        repository=Path(repository),
        triton=server.version,
        distribution_version=files.version,
        http=server.http,
        grpc=server.grpc,
        models=tuple(server.models),
        text_pairs=tuple(name for name in server.models if _takes_pairs(repository, name)),
        not_served=dict(server.skipped),
        log=Path(server.log),
        pid=server.process.pid,
    )
