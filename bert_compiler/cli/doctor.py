"""doctor: what this machine can build, and what is missing for each target.

Looks, never builds: versions, GPUs (nvidia-smi), TensorRT, ONNX Runtime providers, the Triton
config library the package stage needs, and free space and writability where OUT would go.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import existing_ancestor, tool_versions
from bert_compiler.core.errors import EnvironmentProblem, InputError
from bert_compiler.core.targets import Environment
from bert_compiler.engines.targets import DEFAULT_TARGET, TARGET_CHOICES, plan_targets

# Every target but auto, which only picks among them.
TARGETS = tuple(t for t in TARGET_CHOICES if t != DEFAULT_TARGET)
# Below this, a BERT-base run (graphs, engines for one GPU, a repository) will not fit.
MIN_FREE_MIB = 4096


@dataclass(frozen=True)
class Readiness:
    """Whether one target (or the package stage) can be built here: what it builds, or what is
    missing."""

    ready: bool
    builds: tuple[str, ...] = ()
    missing: str = ""
    tritonclient: str = ""

    def to_json(self) -> dict[str, Any]:
        if not self.ready:
            return {"ready": False, "missing": self.missing}
        if self.tritonclient:
            return {"ready": True, "tritonclient": self.tritonclient}
        return {"ready": True, "builds": list(self.builds)}

    def state(self) -> str:
        return "ready: " + ", ".join(self.builds) if self.ready else self.missing


@dataclass(frozen=True)
class DiskSpace:
    path: Path
    free_mib: int
    writable: bool

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "free_mib": self.free_mib, "writable": self.writable}


@dataclass(frozen=True)
class DoctorReport:
    """What this machine can build; ``ok`` when the CPU target is ready and OUT is writable with
    room."""

    versions: Mapping[str, str | None]
    env: Environment
    targets: Mapping[str, Readiness]
    package: Readiness
    disk: DiskSpace
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.targets["cpu"].ready and not self.problems

    @property
    def tensorrt(self) -> str:
        """TensorRT's version, or why there is none."""
        return self.env.tensorrt or f"no ({self.env.tensorrt_problem})"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "versions": dict(self.versions),
            "gpus": self.env.to_dict()["gpus"],
            "tensorrt": self.tensorrt,
            "onnxruntime_providers": list(self.env.ort_providers),
            "targets": {name: entry.to_json() for name, entry in self.targets.items()},
            "package": self.package.to_json(),
            "disk": self.disk.to_json(),
            "problems": list(self.problems),
            "notes": list(self.env.notes),
        }

    def lines(self) -> str:
        versions, disk = self.versions, self.disk
        lines = [
            f"bert-compiler {versions['bert-compiler']}, python {versions['python']}, "
            f"onnxruntime {versions.get('onnxruntime')}"
        ]
        lines += [f"GPU {g.index}: {g.name} ({g.sm})" for g in self.env.gpus] or ["GPU: none"]
        lines.append(f"TensorRT: {self.tensorrt}")
        lines += [f"target {name}: {entry.state()}" for name, entry in self.targets.items()]
        lines.append(f"package: {'ready' if self.package.ready else self.package.missing}")
        lines.append(
            f"disk: {disk.free_mib} MiB free at {disk.path}"
            f"{'' if disk.writable else ' (not writable)'}"
        )
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def diagnose(env: Environment, out: Path) -> DoctorReport:
    """The doctor's report for this machine (``env``) and the output folder ``out``."""
    targets: dict[str, Readiness] = {}
    for target in TARGETS:
        if target == "cpu" and env.onnxruntime is None:
            targets[target] = Readiness(False, missing="onnxruntime is not installed")
            continue
        try:
            plan = plan_targets(target, (), env)
        except (EnvironmentProblem, InputError) as err:
            targets[target] = Readiness(False, missing=str(err))
            continue
        builds = tuple(
            f"{e['backend']}-{e['device']}"
            + (f"-sm{e['compute_capability'].replace('.', '')}" if e["compute_capability"] else "")
            + f"-{e['precision']}"
            for e in plan.engines
        )
        targets[target] = Readiness(True, builds=builds)
    folder = existing_ancestor(Path(out).resolve())
    free_mib = shutil.disk_usage(folder).free >> 20
    writable = os.access(folder, os.W_OK)
    problems = []
    if not writable:
        problems.append(f"{folder}: not writable; choose another --out")
    if free_mib < MIN_FREE_MIB:
        problems.append(
            f"{folder}: {free_mib} MiB free, a BERT-base run needs about {MIN_FREE_MIB}"
        )
    if importlib.util.find_spec("tritonclient") is None:
        package_stage = Readiness(False, missing="tritonclient[grpc] (run scripts/setup.sh)")
    else:
        package_stage = Readiness(True, tritonclient=metadata.version("tritonclient"))
    return DoctorReport(
        versions=tool_versions(),
        env=env,
        targets=targets,
        package=package_stage,
        disk=DiskSpace(folder, free_mib, writable),
        problems=tuple(problems),
    )


def require_target(report: DoctorReport, target: str) -> None:
    """Raise EnvironmentProblem when ``target`` (``auto``: any) cannot be built here."""
    if target == "auto":
        return
    entry = report.targets[target]
    if not entry.ready:
        raise EnvironmentProblem(f"doctor: {entry.missing}")
