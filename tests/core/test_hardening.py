"""Faults CI runners and shared machines throw at a build: a second writer, signals, SIGKILL,
a full disk. Each leaves a clear error and an output tree where nothing incomplete looks
complete, and the next run resumes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import ArtifactError

pytestmark = pytest.mark.e2e

QUICK = ["--metric-limit", "100", "--no-metric-gate"]


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _start(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bert_compiler.cli.commands", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _assert_nothing_incomplete_looks_complete(out: Path) -> list[Path]:
    """Every folder whose manifest says complete matches it; return the folders without one."""
    incomplete = []
    for folder in sorted({p.parent for p in out.rglob("*") if p.is_file()}):
        manifest = ArtifactDir(folder).read_manifest()
        if manifest is None:
            incomplete.append(folder)
        elif manifest.get("complete"):
            ArtifactDir(folder).require_complete()  # raises on any mismatch
    return incomplete


def test_a_second_writer_is_refused_naming_the_holder(tiny_embedding_model, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from bert_compiler.core.lock import output_lock\n"
            "with output_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = _invoke(
            "export", "--model", tiny_embedding_model, "--out", tmp_path, "--wait-lock", 0.5
        )
        assert result.exit_code == 9
        assert f"pid {holder.pid}" in result.stderr and "--wait-lock" in result.stderr
        assert time.monotonic() - started >= 0.5
        assert not (tmp_path / "export").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    result = _invoke("export", "--model", tiny_embedding_model, "--out", tmp_path)
    assert result.exit_code == 0, result.output


def test_sigterm_unwinds_with_one_line(tiny_embedding_model, tmp_path):
    process = _start("run", "--model", tiny_embedding_model, "--out", tmp_path, *QUICK)
    _wait_for(lambda: (tmp_path / "export" / "manifest.json").exists(), process)
    process.send_signal(signal.SIGTERM)
    _stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    _assert_nothing_incomplete_looks_complete(tmp_path)
    assert not list(tmp_path.rglob(".*.tmp-*"))  # staging files removed on the way out
    assert not (tmp_path / ".bert-compile.lock.json").exists()


def test_sigkill_mid_build_then_the_next_run_resumes(tiny_embedding_model, tmp_path):
    process = _start("run", "--model", tiny_embedding_model, "--out", tmp_path, *QUICK)
    engines = tmp_path / "engines"
    _wait_for(lambda: engines.exists() and any(engines.rglob("*cpu-fp32")), process)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "run.json").exists()  # killed before the end
    for folder in _assert_nothing_incomplete_looks_complete(tmp_path):
        with pytest.raises(ArtifactError, match="no complete artifact"):
            ArtifactDir(folder).require_complete()

    # The lock died with the process; the rerun skips what finished and verifies.
    result = _invoke("run", "--model", tiny_embedding_model, "--out", tmp_path, "--json", *QUICK)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["stages"]["export"]["skipped"]
    _assert_nothing_incomplete_looks_complete(tmp_path)


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_too_little_space_is_refused_before_the_old_artifact_is_touched(
    tiny_embedding_model, tmp_path, monkeypatch
):
    assert _invoke("export", "--model", tiny_embedding_model, "--out", tmp_path).exit_code == 0
    before = (tmp_path / "export" / "manifest.json").read_text()
    import bert_compiler.core.artifacts

    monkeypatch.setattr(
        bert_compiler.core.artifacts.shutil,
        "disk_usage",
        lambda _p: DiskUsage(1 << 40, 1 << 40, 1 << 20),
    )
    result = _invoke("export", "--model", tiny_embedding_model, "--out", tmp_path, "--force")
    assert result.exit_code == 3
    assert "needs about" in result.stderr and "1 MiB are free" in result.stderr
    assert (tmp_path / "export" / "manifest.json").read_text() == before
    ArtifactDir(tmp_path / "export").require_complete()


def test_disk_full_mid_write_is_a_clear_error_and_the_rerun_resumes(
    tiny_embedding_model, tmp_path, monkeypatch
):
    assert _invoke("export", "--model", tiny_embedding_model, "--out", tmp_path).exit_code == 0
    import bert_compiler.core.artifacts

    def full(_fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(bert_compiler.core.artifacts.os, "fsync", full)
        result = _invoke("simplify", "--out", tmp_path)
    assert result.exit_code == 3 and "no space left while writing" in result.stderr
    assert "Traceback" not in result.output
    assert ArtifactDir(tmp_path / "simplify").read_manifest() is None
    assert not list((tmp_path / "simplify").glob(".*tmp-*"))
    ArtifactDir(tmp_path / "export").require_complete()  # earlier stages untouched
    assert _invoke("simplify", "--out", tmp_path).exit_code == 0


def test_a_swallowed_interrupt_still_stops_at_the_next_stage(tmp_path, monkeypatch):
    """A signal handler's exception raised inside a __del__ or a C callback is dropped by Python;
    the handler records it, and the next stage checkpoint raises it again."""
    import signal

    from bert_compiler.core import interrupts
    from bert_compiler.core.artifacts import StageRecord
    from bert_compiler.core.errors import Interrupted
    from bert_compiler.core.stage import run_stage

    monkeypatch.setattr(interrupts, "_pending", None)
    try:
        interrupts._handle(signal.SIGTERM, None)
    except Interrupted:
        pass  # what "Exception ignored in ..." amounts to
    ran = []

    def body(artifact):
        ran.append(True)
        return [], {}

    with pytest.raises(Interrupted) as caught:
        run_stage(StageRecord("demo", {}, {}), tmp_path / "s", body, force=True)
    assert caught.value.exit_code == 128 + signal.SIGTERM and not ran
    assert ArtifactDir(tmp_path / "s").read_manifest() is None


def test_a_signal_swallowed_in_a_finalizer_prints_no_traceback():
    """Where Python drops the handler's exception (here a __del__), it would print "Exception
    ignored ... Traceback"; a user reads that as a crash, so it stays quiet, while any other
    unraisable exception is still reported."""
    script = (
        "import os, signal\n"
        "from bert_compiler.core import interrupts\n"
        "interrupts.install()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        for _ in range(10**6): pass\n"
        "class Broken:\n"
        "    def __del__(self):\n"
        "        raise ValueError('other fault')\n"
        "Finalized(); Broken()\n"
        "try:\n"
        "    interrupts.checkpoint()\n"
        "except BaseException as error:\n"
        "    print('checkpoint raised', type(error).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == "checkpoint raised Interrupted", result.stderr
    assert "Interrupted" not in result.stderr
    assert "ValueError: other fault" in result.stderr


def test_a_rust_tokenizer_panic_is_one_line_and_no_traceback(
    tiny_embedding_model, tmp_path, monkeypatch
):
    """The Rust tokenizer panics on some tokenizer.json regexes (a split whose look-behind holds
    \\K, on any text with a space); pyo3 raises PanicException, a BaseException that escaped
    ``except Exception`` as a traceback. The model's tokenizer is given that pre-tokenizer
    where it is loaded (transformers rebuilds a BERT tokenizer's pre-tokenizer from its class,
    so the file alone does not reach it): the run stops in one line, exit 4."""
    from tokenizers import Regex, pre_tokenizers

    from bert_compiler.models import loading

    original = loading.load_tokenizer

    def panicking(*args, **kwargs):
        tokenizer = original(*args, **kwargs)
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex("(?<=\\K.)."), "isolated"), pre_tokenizers.Whitespace()]
        )
        return tokenizer

    for module in list(sys.modules.values()):
        if getattr(module, "load_tokenizer", None) is original:
            monkeypatch.setattr(module, "load_tokenizer", panicking)
    result = _invoke(
        "run", "--model", tiny_embedding_model, "--out", tmp_path, "--target", "cpu",
        "--no-package", "--json",
    )  # fmt: skip
    assert result.exit_code == 4, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("bert-compile:")]
    assert "a Rust library (tokenizers or safetensors) panicked" in line
    assert json.loads(result.stdout.splitlines()[-1])["error"]["kind"] == "unsupported-model"
    assert "Traceback" not in result.output
