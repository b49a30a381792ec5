"""Never touch what we did not write: output folders are claimed before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.outdir import BOOKKEEPING, MARKER_FILE
from tests.tiny_models import edit_config


def _invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _users_folder(tmp_path: Path) -> Path:
    """A folder of a user's own, laid out like ours: the names alone must not make it ours."""
    folder = tmp_path / "mine"
    (folder / "export").mkdir(parents=True)
    (folder / "export" / "model.onnx").write_bytes(b"my own graph")
    (folder / "export" / "manifest.json").write_text('{"mine": true}')
    (folder / "export" / ".notes.tmp-1").write_text("draft")
    (folder / "run.json").write_text("{}")
    return folder


def test_a_users_folder_is_refused_before_anything_is_written(tiny_embedding_model, tmp_path):
    folder = _users_folder(tmp_path)
    before = _snapshot(folder)
    result = _invoke("run", "--model", tiny_embedding_model, "--out", folder, "--target", "cpu")
    assert result.exit_code == 3, result.output
    assert (
        "not an output folder of bert-compile" in result.stderr and "--force-out" in result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == ["export", "run.json"]


@pytest.mark.e2e
def test_force_out_writes_beside_the_users_files_and_deletes_none(tiny_embedding_model, tmp_path):
    folder = _users_folder(tmp_path)
    result = _invoke("export", "--model", tiny_embedding_model, "--out", folder, "--force-out")
    assert result.exit_code == 0, result.output
    assert (folder / "export" / ".notes.tmp-1").read_text() == "draft"
    assert (folder / "run.json").read_text() == "{}"
    assert (folder / MARKER_FILE).is_file()
    # Now ours: the next command needs no --force-out.
    again = _invoke("export", "--model", tiny_embedding_model, "--out", folder)
    assert again.exit_code == 0, again.output


def _no_writes_at_the_root(monkeypatch) -> None:
    """Creating anything directly under / fails (CI runs as root): a product that regressed to
    writing there fails this test instead of writing."""
    import builtins

    def guarded(function, name_of):
        def call(*args, **kwargs):
            target = Path(os.fsdecode(name_of(args, kwargs))).absolute()
            if target.parent == Path("/") and target != Path("/"):
                raise PermissionError(13, "the test forbids writing at the filesystem root")
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "mkdir", guarded(os.mkdir, lambda a, k: a[0]))
    monkeypatch.setattr(os, "open", guarded(os.open, lambda a, k: a[0]))
    monkeypatch.setattr(builtins, "open", guarded(builtins.open, lambda a, k: a[0]))


@pytest.mark.parametrize("where", ["root", "home", "model parent", "model itself", "file"])
def test_places_that_are_never_an_output_folder(where, tiny_model_copy, tmp_path, monkeypatch):
    if where == "root":
        _no_writes_at_the_root(monkeypatch)
        with pytest.raises(PermissionError):  # the guard holds
            os.mkdir("/bert-compile-test-guard")
    home = tmp_path / "home"
    home.mkdir()
    out = {
        "root": Path("/"),
        "home": home,
        "model parent": tiny_model_copy.parent,
        "model itself": tiny_model_copy,
        "file": tmp_path / "a-file",
    }[where]
    if where == "file":
        out.write_text("x")
    before = _snapshot(tmp_path)
    result = _invoke("export", "--model", tiny_model_copy, "--out", out, env={"HOME": str(home)})
    assert result.exit_code == 3, result.output
    message = {
        "root": "the filesystem root",
        "home": "your home folder",
        "model parent": "holds the model folder",
        "model itself": "holds the model folder",
        "file": "is a file, not a folder",
    }[where]
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _snapshot(tmp_path) == before
    assert not Path("/export").exists()


def test_a_failed_command_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "out"
    result = _invoke("run", "--model", tmp_path / "no-such-model", "--out", out)
    assert result.exit_code == 3 and "no such local folder" in result.stderr
    assert not out.exists()


def test_a_first_stage_that_fails_inside_leaves_no_folder_behind(tiny_model_copy, tmp_path):
    """Weights that do not fit config.json fail export's body, after its stage folder was made:
    the new OUT holds only bookkeeping and an empty folder, and goes; a folder that was there
    before the command stays, with what the user put in it."""
    edit_config(tiny_model_copy, intermediate_size=40)  # the file's tensors are 37 wide
    out = tmp_path / "out"
    result = _invoke("run", "--model", tiny_model_copy, "--out", out, "--target", "cpu")
    assert result.exit_code == 3 and "mis-shaped" in result.stderr, result.output
    assert not out.exists()
    existing = tmp_path / "existing"
    (existing / "empty-of-theirs").mkdir(parents=True)
    result = _invoke("run", "--model", tiny_model_copy, "--out", existing, "--force-out")
    assert result.exit_code == 3 and "mis-shaped" in result.stderr, result.output
    assert (existing / "empty-of-theirs").is_dir()


def test_an_unwritable_repository_is_refused_before_the_first_stage(tiny_embedding_model, tmp_path):
    # Under a regular file nothing can be created, whoever runs the test (root included).
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = tmp_path / "out"
    argv = ["run", "--model", tiny_embedding_model, "--out", out, "--target", "cpu"]
    result = _invoke(*argv, "--repository", blocker / "repo", "--json")
    assert result.exit_code == 3, result.output
    assert "choose another output folder (--repository)" in result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["error"]["kind"] == "input"
    assert not out.exists()


def test_a_foreign_repository_is_refused_before_the_first_stage(tiny_embedding_model, tmp_path):
    out = tmp_path / "out"
    (out / "triton").mkdir(parents=True)
    (out / "triton" / "their-model.txt").write_text("not ours")
    argv = ["run", "--model", tiny_embedding_model, "--out", out, "--target", "cpu", "--force-out"]
    result = _invoke(*argv)
    assert result.exit_code == 3 and "not a repository bert-compile wrote" in result.stderr
    # Nothing but the tool's own bookkeeping was added: no stage ran.
    assert {p.name for p in out.iterdir()} - BOOKKEEPING == {"triton"}
    assert (out / "triton" / "their-model.txt").read_text() == "not ours"
