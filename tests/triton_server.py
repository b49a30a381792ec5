"""The local Triton server in tests: the product's launcher (triton/server.py, which
`bert-compile serve` and scripts/triton_load.py use too), with what this machine lacks to start
it as a skip reason."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from bert_compiler.core.errors import EnvironmentProblem
from bert_compiler.triton import server as launcher

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_server() -> launcher.ServerFiles | str:
    """The server's files, or why this machine cannot start it (a skip reason)."""
    try:
        return launcher.find_server()
    except EnvironmentProblem as err:
        return str(err)


@contextlib.contextmanager
def triton_server(
    files: launcher.ServerFiles, repository: Path, models: Sequence[str], workdir: Path
) -> Iterator[launcher.RunningServer]:
    """A server on ``repository`` loading ``models`` (and what their ensembles call), on free
    loopback ports, stopped afterwards."""
    plan = launcher.plan_serving(repository, models=models)
    with launcher.triton_server(files, plan, workdir) as server:
        yield server
