"""doctor: what this machine can build, and what is missing for each target.

Looks, never builds: versions, GPUs (nvidia-smi), TensorRT, ONNX Runtime providers, the Triton
config library the package stage needs, and free space and writability where OUT would go.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
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


def diagnose(env: Environment, out: Path) -> dict[str, Any]:
    """The doctor's report: ``ok`` when the CPU target is ready and OUT is writable with room."""
    targets: dict[str, dict[str, Any]] = {}
    for target in TARGETS:
        if target == "cpu" and env.onnxruntime is None:
            targets[target] = {"ready": False, "missing": "onnxruntime is not installed"}
            continue
        try:
            plan = plan_targets(target, (), env)
        except (EnvironmentProblem, InputError) as err:
            targets[target] = {"ready": False, "missing": str(err)}
            continue
        builds = [
            f"{e['backend']}-{e['device']}"
            + (f"-sm{e['compute_capability'].replace('.', '')}" if e["compute_capability"] else "")
            + f"-{e['precision']}"
            for e in plan.engines
        ]
        targets[target] = {"ready": True, "builds": builds}
    folder = existing_ancestor(Path(out).resolve())
    free_mib = shutil.disk_usage(folder).free >> 20
    writable = os.access(folder, os.W_OK)
    disk = {"path": str(folder), "free_mib": free_mib, "writable": writable}
    problems = []
    if not writable:
        problems.append(f"{folder}: not writable; choose another --out")
    if free_mib < MIN_FREE_MIB:
        problems.append(
            f"{folder}: {free_mib} MiB free, a BERT-base run needs about {MIN_FREE_MIB}"
        )
    if importlib.util.find_spec("tritonclient") is None:
        package_stage = {"ready": False, "missing": "tritonclient[grpc] (run scripts/setup.sh)"}
    else:
        package_stage = {"ready": True, "tritonclient": metadata.version("tritonclient")}
    return {
        "ok": targets["cpu"]["ready"] and not problems,
        "versions": tool_versions(),
        "gpus": env.to_dict()["gpus"],
        "tensorrt": env.tensorrt or f"no ({env.tensorrt_problem})",
        "onnxruntime_providers": list(env.ort_providers),
        "targets": targets,
        "package": package_stage,
        "disk": disk,
        "problems": problems,
        "notes": list(env.notes),
    }


def require_target(report: dict[str, Any], target: str) -> None:
    """Raise EnvironmentProblem when ``target`` (``auto``: any) cannot be built here."""
    if target == "auto":
        return
    entry = report["targets"][target]
    if not entry["ready"]:
        raise EnvironmentProblem(f"doctor: {entry['missing']}")
