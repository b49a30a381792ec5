"""Progress bars and captured third-party output (core/progress.py, the --progress option)."""

from __future__ import annotations

import ctypes
import io
import logging
import os
import sys

import pytest

from bert_compiler.cli.options import ProgressOptions
from bert_compiler.core import progress


@pytest.fixture(autouse=True)
def _restore_progress():
    yield
    progress.configure(None)


def test_captured_labels_python_and_file_descriptor_output(capfd, caplog):
    caplog.set_level(logging.INFO, logger="bert_compile")
    libc = ctypes.CDLL(None)
    with progress.captured("simplify"):
        print("Checking 0/3...")
        print("a warning", file=sys.stderr)
        os.write(1, b"from C on fd 1\n")
        os.write(2, b"from C on fd 2\n\n")
        libc.printf(b"buffered printf\n")  # in C's stdio buffer until the capture flushes it
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert sorted(caplog.messages) == sorted(
        [
            "[simplify] Checking 0/3...",
            "[simplify] a warning",
            "[simplify] from C on fd 1",
            "[simplify] from C on fd 2",
            "[simplify] buffered printf",
        ]
    )
    print("after")  # the descriptors are back
    assert capfd.readouterr().out == "after\n"


def test_captured_output_is_logged_when_the_call_fails(caplog):
    caplog.set_level(logging.INFO, logger="bert_compile")
    with pytest.raises(RuntimeError, match="boom"), progress.captured("fuse"):
        print("last words")
        raise RuntimeError("boom")
    assert caplog.messages == ["[fuse] last words"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("flag", "as_json", "quiet", "terminal", "shown"),
    [
        (None, False, False, True, True),  # a terminal: bars by default
        (None, True, False, True, False),  # --json: quiet
        (None, False, True, True, False),  # --quiet: quiet
        (None, False, False, False, False),  # stderr is a file or a pipe
        (True, True, False, False, True),  # --progress wins
        (False, False, False, True, False),  # --no-progress wins
    ],
)
def test_progress_option_default(monkeypatch, flag, as_json, quiet, terminal, shown):
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    values = {"progress": flag, "as_json": as_json, "quiet": quiet}
    assert ProgressOptions().parse(values) is shown


def test_bars_follow_the_setting(monkeypatch):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    progress.configure(False)
    assert list(progress.bar(range(3), desc="parity")) == [0, 1, 2]
    assert stream.getvalue() == ""
    progress.configure(True)
    list(progress.bar(range(3), desc="parity"))
    assert "parity:   0%|" in stream.getvalue()
    progress.configure(None)  # unset: on for a terminal
    assert progress.enabled()
