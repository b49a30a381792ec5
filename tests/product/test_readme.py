"""Every command in the README runs, and every relative link in the docs resolves.

The README's fenced bash blocks are, in order: `scripts/run-default.sh`, `scripts/test.sh` and the
CLI quickstart; then one Python block, the Encoder quickstart. The two scripts set up `.venv`
(pip installs) before their main job, so here their setup is a stub and the rest runs for real:
run-default's `bert-compile run` on a tiny model, test.sh's steps in order against recording
stand-ins (the suite itself is what CI runs through `.ci/run`;
`tests/run/test_default_model.py` runs the same `run --out` on the default model). The quickstarts
run as written on a tiny model: its folder for `default`, and the quick gates of a random model
(conftest.TINY_VERIFY) added.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV = Path(sys.prefix)  # the environment running the tests: the README's .venv
# A random model's metric is noise (conftest.TINY_VERIFY), and a small calibration set is enough.
QUICK_RUN = "--metric-limit 100 --no-metric-gate --num-samples 64"
QUICK_VERIFY = "--metric-limit 100 --no-metric-gate"
TEXTS = ["A man plays a guitar.", "Two dogs run."]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """A bash block's command lines, comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def readme_blocks() -> tuple[list[str], list[str]]:
    text = README.read_text(encoding="utf-8")
    return fenced(text, "bash"), fenced(text, "python")


def test_readme_blocks_are_the_ones_tested_here():
    """A new README command block fails here until a test below runs it."""
    bash, python = readme_blocks()
    assert [commands(b)[0] for b in bash] == [
        "scripts/run-default.sh",
        "scripts/test.sh",
        "source .venv/bin/activate",
    ]
    assert commands(bash[0]) == ["scripts/run-default.sh"]
    assert commands(bash[1]) == ["scripts/test.sh"]
    assert len(python) == 1


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
    head = "\n".join(lines[:40])
    assert "```bash\nscripts/run-default.sh\n```" in head
    assert "```bash\nscripts/test.sh\n```" in head


def _sandbox(tmp_path: Path, *scripts: str) -> tuple[Path, Path]:
    """A copy of ``scripts`` under tmp_path, beside a stub scripts/setup.sh that records its
    arguments instead of installing anything. Returns (root, the calls log)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for script in scripts:
        (root / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / script, root / script)
    log = tmp_path / "calls.log"
    _stub(root / "scripts" / "setup.sh", "setup", log)
    return root, log


def _stub(path: Path, name: str, log: Path) -> None:
    path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _calls(log: Path) -> list[str]:
    return [line.rstrip() for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("script", ["scripts/run-default.sh", "scripts/test.sh", ".ci/run"])
def test_fresh_machine_scripts_parse_and_are_executable(script):
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_ci_and_the_test_command_set_up_lint_type_check_and_run_pytest(tmp_path):
    """`.ci/run` is the README's `scripts/test.sh`, and that sets up with the Triton server,
    runs ruff, mypy and pytest with the arguments given (--mutants: the mutation check)."""
    root, log = _sandbox(tmp_path, "scripts/test.sh", ".ci/run")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("ruff", "mypy", "python"):
        _stub(bin_dir / tool, tool, log)

    def calls(*argv: str) -> list[str]:
        log.unlink(missing_ok=True)
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return _calls(log)

    steps = ["setup --triton-server", "ruff check .", "mypy"]
    assert calls(str(root / ".ci" / "run")) == [*steps, "python -m pytest"]
    assert calls(str(root / "scripts" / "test.sh"), "-m", "unit", "-x") == [
        *steps,
        "python -m pytest -m unit -x",
    ]
    assert calls(str(root / "scripts" / "test.sh"), "--mutants", "--list") == [
        "setup --triton-server",
        "python scripts/mutants.py --list",
    ]


@pytest.mark.e2e
def test_run_default_script_compiles_and_verifies(tiny_embedding_model, tmp_path):
    """scripts/run-default.sh after its setup: `bert-compile run` into ./bert-compile-out, its
    extra arguments passed on (here the tiny model and its quick gates)."""
    root, log = _sandbox(tmp_path, "scripts/run-default.sh")
    (root / ".venv").symlink_to(VENV)
    done = subprocess.run(
        [str(root / "scripts" / "run-default.sh"), "--model", str(tiny_embedding_model)]
        + QUICK_VERIFY.split(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _calls(log) == ["setup"]
    out = root / "bert-compile-out"
    summary = (out / "run.json").read_text()
    assert '"ok": true' in summary
    reports = sorted(out.glob("verify/tiny-embed/*/report.json"))
    assert reports and sorted(out.glob("engines/tiny-embed/*/manifest.json"))
    assert re.search(r"^PASS ", done.stdout, flags=re.M)
    assert (out / "triton" / "manifest.json").is_file()


def _quickstart_script(model: Path) -> str:
    """The CLI quickstart as a bash script: the tiny model for `default`, the quick gates added to
    the lines that take the model, the rest as written."""
    bash, _python = readme_blocks()
    lines = commands(bash[2])
    assert "model=default" in lines
    script = []
    for line in lines:
        if line == "model=default":
            line = f"model={model}"
        elif line.startswith("bert-compile run ") and '--model "$model"' in line:
            line += f" {QUICK_RUN}"
        elif line.startswith("bert-compile verify ") and '--model "$model"' in line:
            line += f" {QUICK_VERIFY}"
        script.append(line)
    trap = "trap 'echo \"README line failed: $BASH_COMMAND\" >&2' ERR"
    return "\n".join(["set -eo pipefail", trap, *script]) + "\n"


@pytest.mark.e2e
def test_quickstarts_run_on_a_tiny_model(tiny_embedding_model, tmp_path, monkeypatch, capsys):
    """The CLI quickstart builds, verifies and gates fp32 and INT8 engines; the Python quickstart
    then encodes with the fp32 one, as sentence-transformers does."""
    (tmp_path / ".venv").symlink_to(VENV)
    done = subprocess.run(
        ["bash", "-c", _quickstart_script(tiny_embedding_model)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out" / "m"
    engines = sorted(p.name for p in (out / "engines" / "tiny-embed").iterdir())
    assert [e.rsplit("-", 1)[1] for e in engines] == ["fp32", "int8"]
    assert all(name in done.stdout for name in engines)  # the `ls` line
    assert "PASS tokenizer tiny-embed-tokenizer" in done.stdout  # verify --repository
    assert len(re.findall(r"^PASSED tiny-embed-ort-cpu-", done.stdout, flags=re.M)) == 2
    assert "Usage: bert-compile run" in done.stdout  # run --help

    _bash, (python,) = readme_blocks()
    assert 'resolve_model("default")' in python
    code = python.replace(
        'resolve_model("default")', f"resolve_model({str(tiny_embedding_model)!r})"
    )
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python quickstart)", "exec"), namespace)
    vectors = namespace["vectors"]
    assert capsys.readouterr().out.strip() == str(vectors.shape)
    from sentence_transformers import SentenceTransformer

    expected = SentenceTransformer(str(tiny_embedding_model), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


# The workplace's read-only shared/ folder sits in the repository root in some checkouts only
# (docs/hostile.md links its HOSTILE.md): not this project's file to check.
OUTSIDE = ROOT / "shared"


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    slugs = set()
    for heading in re.findall(r"^#+\s+(.*)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_every_relative_link_in_the_docs_resolves():
    """README.md and docs/**/*.md: every relative link names a file or folder that exists, and
    an anchor into a markdown file names one of its headings."""
    broken = []
    for path in _markdown_files():
        text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: {target}"
            if not resolved.exists() and not resolved.is_relative_to(OUTSIDE):
                broken.append(where)
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{where} (no such heading)")
    assert broken == []
