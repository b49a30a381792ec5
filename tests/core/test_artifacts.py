"""Atomic writes and manifests: nothing half-written looks complete; tampering is caught."""

from __future__ import annotations

import json
import os

import pytest

from bert_compiler.core import artifacts
from bert_compiler.core.artifacts import ArtifactDir, StageRecord, atomic_path, atomic_write_text
from bert_compiler.core.errors import ArtifactError
from bert_compiler.core.stage import run_stage


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    final = tmp_path / "a.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as staging:
        staging.write_text("half")
        raise RuntimeError("killed mid-write")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_replaces(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "new")
    assert (tmp_path / "a.txt").read_text() == "new"


def _body(text):
    def body(artifact):
        atomic_write_text(artifact.path / "out.txt", text)
        return ["out.txt"], {"length": len(text)}

    return body


def test_stage_skips_when_up_to_date_and_reruns_on_change(tmp_path):
    record = StageRecord("demo", {"x": 1}, {"k": "v"})
    first = run_stage(record, tmp_path / "s", _body("a"), force=False)
    assert not first.skipped and first.manifest["complete"]
    assert first.manifest["outputs"]["out.txt"]["bytes"] == 1
    assert run_stage(record, tmp_path / "s", _body("a"), force=False).skipped
    assert not run_stage(record, tmp_path / "s", _body("a"), force=True).skipped
    changed = StageRecord("demo", {"x": 2}, {"k": "v"})
    assert not run_stage(changed, tmp_path / "s", _body("b"), force=False).skipped


def test_tampered_output_is_detected_and_rebuilt(tmp_path):
    record = StageRecord("demo", {"x": 1}, {})
    run_stage(record, tmp_path / "s", _body("abc"), force=False)
    (tmp_path / "s" / "out.txt").write_text("abd")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        ArtifactDir(tmp_path / "s").require_complete()
    assert not run_stage(record, tmp_path / "s", _body("abc"), force=False).skipped


def test_interrupted_stage_leaves_no_complete_manifest(tmp_path):
    record = StageRecord("demo", {"x": 1}, {})
    run_stage(record, tmp_path / "s", _body("abc"), force=False)

    def crashing(artifact):
        # What an interrupted atomic write leaves, beside a user's file of a similar name.
        (artifact.path / ".out.txt.bert-compile.tmp-999").write_text("partial")
        (artifact.path / ".notes.tmp-1").write_text("the user's")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(record, tmp_path / "s", crashing, force=True)
    assert ArtifactDir(tmp_path / "s").read_manifest() is None
    with pytest.raises(ArtifactError, match="no complete artifact"):
        ArtifactDir(tmp_path / "s").require_complete()
    rerun = run_stage(record, tmp_path / "s", _body("abc"), force=False)
    assert not rerun.skipped
    assert [p.name for p in (tmp_path / "s").glob(".*tmp-*")] == [".notes.tmp-1"]


def test_manifest_names_cannot_escape(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "manifest.json").write_text(
        json.dumps({"complete": True, "outputs": {"../../etc/passwd": {"sha256": "0"}}})
    )
    with pytest.raises(ArtifactError, match="leaves its folder"):
        ArtifactDir(folder).require_complete()


def test_corrupt_manifest_is_an_artifact_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid UTF-8 JSON"):
        ArtifactDir(tmp_path).require_complete()


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "nested", "huge"])
def test_a_manifest_that_is_no_regular_json_file_is_one_line_without_blocking(tmp_path, kind):
    """A FIFO (reading would wait for a writer), a folder, a link to /dev/zero (endless), JSON
    nested past the parser's recursion and a file over the cap: one line each, read no further
    than the cap, nothing waiting."""
    manifest = tmp_path / "manifest.json"
    if kind == "fifo":
        os.mkfifo(manifest)
    elif kind == "folder":
        manifest.mkdir()
    elif kind == "device":
        manifest.symlink_to("/dev/zero")
    elif kind == "nested":
        manifest.write_text("[" * 100_000 + "]" * 100_000)
    else:
        with manifest.open("wb") as handle:
            handle.truncate(artifacts.MAX_MANIFEST_BYTES + 1)
    expected = {
        "fifo": "not a regular file",
        "folder": "not a regular file",
        "device": "not a regular file",
        "nested": "nested too deeply",
        "huge": "over 64 MiB",
    }[kind]
    with pytest.raises(ArtifactError, match=expected) as raised:
        ArtifactDir(tmp_path).read_manifest()
    assert "rerun with --force" in str(raised.value) and "\n" not in str(raised.value)


def test_an_output_is_reused_only_when_nothing_but_the_ignored_settings_differ(tmp_path):
    folder = tmp_path / "s"
    made = StageRecord("demo", {"x": 1}, {"k": "v", "keep": ["a"], "path": tmp_path})
    run_stage(made, folder, _body("ranges"), force=False)
    artifact = ArtifactDir(folder)

    def reused(record):
        return artifact.reusable_output(record, "out.txt", ignore=("keep",))

    assert reused(StageRecord("demo", {"x": 1}, {"k": "v", "keep": ("a", "b"), "path": tmp_path}))
    assert reused(made) == folder / "out.txt"
    spec = dict(made.spec)
    assert reused(StageRecord("demo", {"x": 2}, spec)) is None  # another input
    assert reused(StageRecord("demo", {"x": 1}, {**spec, "k": "w"})) is None  # another setting
    assert reused(StageRecord("other", {"x": 1}, spec)) is None  # another stage
    assert artifact.reusable_output(made, "nothing.txt", ignore=("keep",)) is None
    (folder / "out.txt").write_text("edited")  # no longer the output the manifest hashed
    assert reused(made) is None


def test_a_link_planted_at_a_staging_name_is_refused_and_never_followed(tmp_path):
    """HOSTILE row 34: the staging name beside a final file is predictable (its pid is the
    writer's). A link planted there is refused, the file it points at untouched and the link
    left; a leftover regular staging file of an interrupted run is cleared and the write goes
    through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    final = tmp_path / "out" / "run.json"
    final.parent.mkdir()
    staging = final.with_name(f".run.json.bert-compile.tmp-{os.getpid()}")
    staging.symlink_to(victim)
    with pytest.raises(ArtifactError, match="a link or other entry where bert-compile writes"):
        atomic_write_text(final, "{}\n")
    assert victim.read_text() == "a user's file\n" and staging.is_symlink() and not final.exists()
    staging.unlink()
    staging.write_text("half a summary from an interrupted run")
    atomic_write_text(final, "{}\n")
    assert final.read_text() == "{}\n" and not staging.exists()


def test_a_link_planted_at_a_final_name_is_replaced_and_never_followed(tmp_path):
    """HOSTILE row 34, the final name: a link where run.json will be (pointing at a user's
    file) is replaced by the rename, so the user's file keeps its bytes and run.json is the
    tool's own regular file."""
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    final = tmp_path / "out" / "run.json"
    final.parent.mkdir()
    final.symlink_to(victim)
    atomic_write_text(final, "{}\n")
    assert victim.read_text() == "a user's file\n"
    assert not final.is_symlink() and final.read_text() == "{}\n"
