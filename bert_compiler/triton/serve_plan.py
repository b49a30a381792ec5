"""Which models a local Triton server loads from a repository `package` wrote, and the view of
the repository it reads them from (triton/server.py says why a view: the server writes Python
bytecode beside each model.py, and must load only files checked against the manifest).
"""

from __future__ import annotations

import shutil
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from bert_compiler.core.artifacts import sha256_file
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.targets import gpu_absence
from bert_compiler.triton import config as tc
from bert_compiler.triton.repository import (
    ENGINE_ROLES,
    VERSION,
    Repository,
    open_repository,
)

# The backends the nvidia-pytriton server has (ensembles are built into Triton).
LOCAL_BACKENDS = frozenset({"python"})
# Triton's platform names and the backend that serves each.
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}


@dataclass(frozen=True)
class ServePlan:
    """What a server started on a repository loads, and what it leaves out and why."""

    repository: Repository
    models: tuple[str, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)


def plan_serving(
    repository: Path,
    *,
    models: Sequence[str] = (),
    foreign: Collection[str] = (),
    backends: Collection[str] = LOCAL_BACKENDS,
    no_gpu: str | None = None,
) -> ServePlan:
    """Check a repository as the gate reads it (every entry named by its manifest, no link,
    every file's hash, every config) and choose the models a server with ``backends`` can load:
    ``models`` (default: every one it can), each ensemble only with every model it calls; a
    model on GPU instances only where this machine has a GPU (``no_gpu``: why it has none, ''
    when it has one; None: asked of nvidia-smi when a model needs one).

    Raises:
        InputError: no such folder, not a repository bert-compile wrote, a named model is not
            in it, or a config fails its checks.
        ArtifactError: the repository does not match its manifest.
        EnvironmentProblem: no engine model in it runs on ``backends`` (or a named model does
            not).
    """
    path = Path(repository)
    if not path.exists():
        raise InputError(
            f"{path}: no such folder; write a repository first (bert-compile package "
            f"--python-cpu-engine --repository {path})"
        )
    if not path.is_dir():
        raise InputError(f"{path}: a file, not a Triton repository folder")
    if not (path / "manifest.json").is_file():
        raise InputError(
            f"{path}: not a Triton repository bert-compile wrote (no manifest.json); write one "
            f"with bert-compile package --python-cpu-engine --repository {path}"
        )
    opened = open_repository(path, foreign=foreign)
    configs = {
        name: tc.parse((path / name / tc.CONFIG_FILE).read_text(encoding="utf-8"), path / name)
        for name in opened.models
    }
    skipped: dict[str, str] = {}
    if no_gpu is None and any(_on_gpu(config) for config in configs.values()):
        no_gpu = gpu_absence()
    for name, config in configs.items():  # models that call none first
        reason = unservable(config, backends, no_gpu or "")
        if reason:
            skipped[name] = reason
    for name, config in configs.items():
        if config.platform == "ensemble":
            missing = sorted({s.model_name for s in config.ensemble_scheduling.step} & set(skipped))
            if missing:
                skipped[name] = f"calls {', '.join(missing)}"
    servable = [n for n in sorted(configs) if n not in skipped]
    for name in models:
        if name not in configs:
            raise InputError(f"{path}: holds no model {name!r} ({', '.join(sorted(configs))})")
        if name in skipped:
            raise EnvironmentProblem(
                f"{path}: {name} {skipped[name]}, which the local Triton lacks"
            )
    engines = [n for n in servable if opened.models[n]["role"] in ENGINE_ROLES]
    gpu_only = [r for r in skipped.values() if r.startswith("runs on GPU instances")]
    if not engines and gpu_only and len(gpu_only) == len(skipped):
        raise EnvironmentProblem(
            f"{path}: every engine model {gpu_only[0]}; serve it on a machine with an NVIDIA GPU"
        )
    if not engines:
        lacking = sorted({r.removeprefix("needs the ") for r in skipped.values() if "needs" in r})
        raise EnvironmentProblem(
            f"{path}: no engine model this server can load: its engines need the "
            f"{' and '.join(lacking) or 'missing'}, and the local Triton has only the "
            f"{', '.join(sorted(backends))} backend; package again with --python-cpu-engine "
            "or --python-gpu-engine (ONNX Runtime engines on the Python backend too), or serve "
            "it in NGC's Triton container (docs/guides/triton.md)"
        )
    chosen = tuple(models) if models else tuple(servable)
    return ServePlan(opened, chosen, {n: r for n, r in skipped.items() if n not in chosen})


def unservable(config: Any, backends: Collection[str], no_gpu: str) -> str:
    """Why a server with ``backends`` on this machine cannot load a model that calls no other
    ('' when it can): a backend it lacks, or GPU instances where ``no_gpu`` says why there is
    no GPU."""
    if config.platform == "ensemble":
        return ""
    backend = config.backend or PLATFORM_BACKENDS.get(config.platform, config.platform)
    if backend not in backends:
        return f"needs the {backend} backend"
    if no_gpu and _on_gpu(config):
        return f"runs on GPU instances (KIND_GPU), and {no_gpu}"
    return ""


def _on_gpu(config: Any) -> bool:
    return any(group.kind == group.KIND_GPU for group in config.instance_group)


def _closure(plan: ServePlan, configs_root: Path) -> list[str]:
    """The served models and every model their ensembles call."""
    wanted, pending = set(), list(plan.models)
    while pending:
        name = pending.pop()
        if name in wanted:
            continue
        wanted.add(name)
        path = configs_root / name / tc.CONFIG_FILE
        config = tc.parse(path.read_text(encoding="utf-8"), path)
        pending.extend(s.model_name for s in config.ensemble_scheduling.step)
    return sorted(wanted)


def make_view(plan: ServePlan, view: Path) -> Path:
    """A frozen copy of ``plan``'s models for Triton to load: real folders holding copies of
    the repository's files, only the files its manifest lists, only the models served and those
    their ensembles call, each copy checked against its manifest hash. Triton writes its Python
    bytecode there, never into the repository; and a repository file changed after the check
    cannot reach the server (a link would hand it the live file).

    Returns:
        ``view``.

    Raises:
        ArtifactError: a file changed between the repository's check and its copy.
    """
    repository = plan.repository
    root = repository.path.resolve()
    view.mkdir(parents=True)
    for name in _closure(plan, root):
        (view / name / VERSION).mkdir(parents=True)
    for output, entry in repository.manifest["outputs"].items():
        name = output.split("/", 1)[0]
        if not (view / name).is_dir():
            continue
        copy = view.joinpath(*PurePosixPath(output).parts)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repository.file(name, output.split("/", 1)[1]), copy)
        if sha256_file(copy) != entry["sha256"]:
            raise ArtifactError(
                f"{repository.path / output}: changed since the repository was checked; "
                "serve it again"
            )
    return view
