"""scripts/triton_load.py's bad input: one line and a non-zero exit (its measurements against a
real server are in tests/triton/test_triton_server.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.triton_server import REPO_ROOT


def _load(*args):
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "triton_load.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0,8"], "expected integers >= 1"),
        (["--requests", "0"], "--requests and --rounds must be >= 1"),
        (["--repository", "no-label"], "expected LABEL=FOLDER"),
        (["--data", "/nonexistent/texts.tsv"], "--data /nonexistent/texts.tsv: no such file"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    if "--repository" not in args:
        args = ["--url", "127.0.0.1:1", *args]
    result = _load("--model", "m", *args)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_no_server_is_one_line():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _load("--url", f"127.0.0.1:{port}", "--model", "m")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("triton_load: m: ") and "UNAVAILABLE" in line
