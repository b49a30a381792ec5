"""The GPU CI runner flow's files: the workflow, the Dockerfile and the scripts CI calls. The
scripts run for real here (on a CPU runner `--target auto` falls back to the CPU engine); the
workflow and the image need GPU runners and a Docker engine, so their wiring is checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    # The scripts call `bert-compile` as CI does: from the environment's bin folder on PATH.
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _config(tmp_path: Path, model: Path) -> Path:
    config = tmp_path / "ci.toml"
    config.write_text(
        f'model = "{model}"\nmetric-limit = 100\nmetric-gate = false\n[run]\nprecision = "fp32"\n'
    )
    return config


@pytest.mark.e2e
def test_ci_build_script_builds_verifies_packages_and_gates(tiny_embedding_model, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "ci-gpu-build.sh"),
            str(_config(tmp_path, tiny_embedding_model)),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    doctor, run, gate = (
        json.loads((out / "ci" / f"{n}.json").read_text()) for n in ("doctor", "run", "gate")
    )
    assert doctor["targets"]["cpu"]["ready"]
    assert run["ok"] and run["repository"]["path"] == str(out / "triton")
    assert gate["ok"] and [e["status"] for e in gate["engines"]] == ["passed"]


@pytest.mark.e2e
def test_ci_build_script_fails_the_job_on_a_missing_backend(tiny_embedding_model, tmp_path):
    result = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "ci-gpu-build.sh"),
            str(_config(tmp_path, tiny_embedding_model)),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**_env(), "BERT_COMPILE_TARGET": "tensorrt"},
        timeout=600,
    )
    doctor = (tmp_path / "out" / "ci" / "doctor.json").read_text()
    if json.loads(doctor).get("ok", True):
        pytest.skip("this machine can build TensorRT engines")
    assert result.returncode == 6 and "doctor: --target tensorrt" in result.stderr
    assert not (tmp_path / "out" / "export").exists()  # the job stopped before building


def test_cache_key_follows_the_config(tiny_embedding_model, tmp_path):
    config = _config(tmp_path, tiny_embedding_model)

    def key() -> str:
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "ci_cache_key.py"), "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return done.stdout.strip()

    first = key()
    assert re.fullmatch(r"[0-9a-f]{32}", first) and key() == first
    config.write_text(config.read_text() + "threads = 1\n")
    assert key() != first


def test_workflow_runs_the_scripts_on_gpu_runners():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "engines.yml").read_text())
    jobs = workflow["jobs"]
    assert "scripts/test.sh" in jobs["tests"]["steps"][-1]["run"]
    engines = jobs["engines"]
    assert engines["runs-on"][:3] == ["self-hosted", "linux", "gpu"]
    assert engines["strategy"]["matrix"]["gpu"] and "--gpus all" in engines["container"]["options"]
    commands = " ".join(step.get("run", "") for step in engines["steps"])
    for script in re.findall(r"scripts/[\w.-]+", commands):
        assert os.access(ROOT / script, os.X_OK), script
    cache = next(s for s in engines["steps"] if s.get("uses", "").startswith("actions/cache"))
    assert "steps.key.outputs.key" in cache["with"]["key"]


def test_dockerfile_builds_from_the_tensorrt_container():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TENSORRT_IMAGE=nvcr\.io/nvidia/tensorrt:\S+-py3$", text, re.M)
    for folder in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / folder).exists(), folder
    assert "onnxruntime-gpu" in text and "import tensorrt" in text


def test_cache_key_hashes_every_module_of_the_package():
    """An engine depends on the code that built it: the key covers every .py under
    bert_compiler/ (a path left stale by a move would hash nothing, and never miss)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import ci_cache_key
    finally:
        sys.path.pop(0)
    import hashlib

    expected = hashlib.sha256()
    modules = sorted((ROOT / "bert_compiler").rglob("*.py"))
    assert len(modules) > 50
    for path in modules:
        expected.update(path.relative_to(ROOT).as_posix().encode())
        expected.update(path.read_bytes())
    assert ci_cache_key.sources_sha256() == expected.hexdigest()


def test_every_mutant_still_finds_the_code_it_plants_its_bug_in():
    """scripts/mutants.py refuses a mutant whose text is not in its file exactly once (the code
    moved); this catches that drift in every run, not only when the mutation check runs."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import mutants
    finally:
        sys.path.pop(0)
    assert len(mutants.MUTANTS) >= 12
    for mutant in mutants.MUTANTS:
        assert (ROOT / mutant.path).read_text().count(mutant.old) == 1, mutant.name
        assert all((ROOT / test.split("::")[0]).is_file() for test in mutant.tests), mutant.name
