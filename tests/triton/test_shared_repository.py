"""A Triton repository shared by several models: packaging one touches only its own folders, the
manifest describes every package, two packagers take turns, and the gate checks one model's
package while refusing (or, when named, leaving alone) what is not packaged."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bert_compiler.cli.commands import cli
from bert_compiler.core.errors import BusyError, InputError
from bert_compiler.core.lock import output_lock
from bert_compiler.models.loading import resolve_model
from bert_compiler.run import RunSpec, run_pipeline
from bert_compiler.triton.package import package
from bert_compiler.triton.package_spec import PackageSpec
from bert_compiler.triton.repository import open_repository
from tests.conftest import TINY_VERIFY

pytestmark = pytest.mark.e2e


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def classifier_run(tiny_classifier_model, tmp_path_factory):
    info = resolve_model(tiny_classifier_model)
    out = tmp_path_factory.mktemp("runs") / "classifier"
    run_pipeline(info=info, out=out, spec=RunSpec(verify=TINY_VERIFY))
    return info, out


def test_two_models_and_a_users_own_share_one_repository(tiny_run, classifier_run, tmp_path):
    embed, embed_out = tiny_run[0], tiny_run[1]
    classifier, classifier_out = classifier_run
    repository = tmp_path / "models"
    package(info=embed, out=embed_out, repository=repository, spec=PackageSpec())
    (repository / "NOTES.md").write_text("our deployment notes")
    (repository / "my-custom-model" / "1").mkdir(parents=True)
    (repository / "my-custom-model" / "config.pbtxt").write_text('name: "my-custom-model"\n')
    embed_files = _snapshot(repository)

    packaged = package(
        info=classifier, out=classifier_out, repository=repository, spec=PackageSpec()
    )
    assert packaged.results["seconds"] > 0  # the run summary's package time
    after = _snapshot(repository)
    assert {k: after[k] for k in embed_files if k != "manifest.json"} == {
        k: v for k, v in embed_files.items() if k != "manifest.json"
    }
    manifest = json.loads((repository / "manifest.json").read_text())
    assert sorted(manifest["inputs"]["packages"]) == ["tiny-cls", "tiny-embed"]
    roles = {name: record["package"] for name, record in manifest["results"]["models"].items()}
    assert {"tiny-embed-tokenizer", "tiny-cls-tokenizer"} <= set(roles)

    # Re-packaging the first model replaces its own folders and nothing else.
    classifier_files = {k: v for k, v in _snapshot(repository).items() if k.startswith("tiny-cls")}
    again = package(
        info=embed, out=embed_out, repository=repository, spec=PackageSpec(), force=True
    )
    assert not again.skipped
    now = _snapshot(repository)
    assert {k: now[k] for k in classifier_files} == classifier_files
    assert now["NOTES.md"] == b"our deployment notes"
    assert "my-custom-model/config.pbtxt" in now
    assert sorted(json.loads((repository / "manifest.json").read_text())["inputs"]["packages"]) == [
        "tiny-cls",
        "tiny-embed",
    ]

    # The gate: what no package wrote fails it, unless named as the user's own.
    gate = ["verify", "--out", tmp_path / "gate", "--repository", repository, "--quiet"]
    refused = _invoke(*gate, "--model", embed.path, "--metric-limit", "40", "--no-metric-gate")
    assert refused.exit_code == 8 and "my-custom-model" in refused.stderr
    allowed = [*gate, "--allow-foreign", "my-custom-model", "--allow-foreign", "NOTES.md"]
    for info in (embed, classifier):
        result = _invoke(
            *allowed, "--model", info.path, "--metric-limit", "40", "--no-metric-gate", "--json"
        )
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout.splitlines()[-1])
        assert summary["foreign"] == ["NOTES.md", "my-custom-model"]
        reports = tmp_path / "gate" / "verify" / "repository"
        assert summary["reports"] == str(reports) and f"reports: {reports}" in result.stderr
        ran = [e for e in summary["engines"] if e["status"] != "skipped"]
        assert ran and all(e["model"].startswith(info.name) for e in ran)
        assert all(e["status"] == "passed" for e in ran)
        skipped = [e for e in summary["engines"] if e["status"] == "skipped"]
        assert skipped and all("gate it with that --model" in e["reason"] for e in skipped)


def test_a_model_folder_of_another_is_never_replaced(tiny_run, classifier_run, tmp_path):
    repository = tmp_path / "models"
    package(info=tiny_run[0], out=tiny_run[1], repository=repository, spec=PackageSpec())
    # A user's own folder with the name the classifier's tokenizer model would take.
    (repository / "tiny-cls-tokenizer").mkdir()
    (repository / "tiny-cls-tokenizer" / "mine.txt").write_text("keep")
    with pytest.raises(InputError, match="exist and are not tiny-cls's"):
        package(
            info=classifier_run[0], out=classifier_run[1], repository=repository, spec=PackageSpec()
        )
    assert (repository / "tiny-cls-tokenizer" / "mine.txt").read_text() == "keep"
    assert not [p for p in repository.iterdir() if ".bert-compile.tmp-" in p.name]


def test_a_held_repository_is_busy(tiny_run, tmp_path):
    repository = tmp_path / "models"
    repository.mkdir()
    with output_lock(repository):
        with pytest.raises(BusyError, match="in use by"):
            package(info=tiny_run[0], out=tiny_run[1], repository=repository, spec=PackageSpec())


def test_two_packagers_of_one_repository_take_turns(tiny_run, tmp_path):
    repository = tmp_path / "models"
    processes = []
    for index in range(2):
        out = tmp_path / f"out{index}"
        shutil.copytree(tiny_run[1], out)
        argv = [sys.executable, "-m", "bert_compiler.cli.commands", "package", "--quiet"]
        argv += ["--model", str(tiny_run[0].path), "--out", str(out), "--force"]
        argv += ["--repository", str(repository), "--wait-lock", "300"]
        processes.append(subprocess.Popen(argv, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    assert open_repository(repository).models
    leftovers = [p.name for p in repository.iterdir() if ".bert-compile.tmp-" in p.name]
    assert leftovers == [] and not list(repository.glob(".*.bert-compile.old-*"))


def test_an_interrupted_package_is_repaired_by_the_next(tiny_run, tmp_path, monkeypatch):
    from bert_compiler.triton import package as package_module

    info, out = tiny_run[0], tiny_run[1]
    real = package_module.replace_tree
    calls = []

    def dies_after_the_first_swap(staging, final):
        calls.append(final)
        real(staging, final)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the process dies between two swaps

    for first in (True, False):  # a first package, then a re-package with another model set
        repository = tmp_path / f"models-{first}"
        if not first:
            package(info=info, out=out, repository=repository, spec=PackageSpec())
        calls.clear()
        monkeypatch.setattr(package_module, "replace_tree", dies_after_the_first_swap)
        with pytest.raises(KeyboardInterrupt):
            package(
                info=info, out=out, repository=repository, spec=PackageSpec(python_cpu_engine=True)
            )
        monkeypatch.setattr(package_module, "replace_tree", real)
        with pytest.raises(Exception, match="interrupted"):
            open_repository(repository)  # the gate refuses a half-swapped repository
        done = package(
            info=info, out=out, repository=repository, spec=PackageSpec(python_cpu_engine=True)
        )
        assert not done.skipped and any(
            n.endswith("-python-text") for n in open_repository(repository).models
        )


def test_a_stale_folder_already_gone_is_no_error(tiny_run, tmp_path):
    info, out = tiny_run[0], tiny_run[1]
    repository = tmp_path / "models"
    package(info=info, out=out, repository=repository, spec=PackageSpec(python_cpu_engine=True))
    shutil.rmtree(repository / f"{info.name}-ort-cpu-fp32-python-text")
    package(info=info, out=out, repository=repository, spec=PackageSpec())
    assert not any("python" in name for name in open_repository(repository).models)


def test_another_model_of_the_same_name_is_refused_unless_forced(tiny_run, tmp_path):
    from bert_compiler.core.errors import InputError as Refused
    from tests.tiny_models import make_tiny_model

    info, out = tiny_run[0], tiny_run[1]
    repository = tmp_path / "models"
    package(info=info, out=out, repository=repository, spec=PackageSpec())
    other = resolve_model(make_tiny_model(tmp_path / "elsewhere" / info.name, seed=1))
    other_out = tmp_path / "other-out"
    run_pipeline(info=other, out=other_out, spec=RunSpec(verify=TINY_VERIFY))
    with pytest.raises(Refused, match="is of another model"):
        package(info=other, out=other_out, repository=repository, spec=PackageSpec())
    package(info=other, out=other_out, repository=repository, spec=PackageSpec(), force=True)


def test_a_package_written_by_other_tool_versions_is_not_up_to_date(
    tiny_run, classifier_run, tmp_path, monkeypatch
):
    from bert_compiler.triton import package as package_module

    info, out = tiny_run[0], tiny_run[1]
    repository = tmp_path / "models"
    package(info=info, out=out, repository=repository, spec=PackageSpec())
    # The tool is upgraded, another model is packaged: the first package is still the old one's.
    newer = {**package_module.tool_versions(), "bert-compiler": "9.9.9"}
    monkeypatch.setattr(package_module, "tool_versions", lambda: newer)
    package(
        info=classifier_run[0], out=classifier_run[1], repository=repository, spec=PackageSpec()
    )
    assert not package(info=info, out=out, repository=repository, spec=PackageSpec()).skipped
    assert package(info=info, out=out, repository=repository, spec=PackageSpec()).skipped


def test_foreign_names_are_top_level_names(tiny_run, tmp_path):
    repository = tmp_path / "models"
    package(info=tiny_run[0], out=tiny_run[1], repository=repository, spec=PackageSpec())
    with pytest.raises(InputError, match="top-level"):
        open_repository(repository, foreign=["tiny-embed-ort-cpu-fp32/2"])
