"""Which engines ``--target`` builds on this machine: planned by the backends themselves.

Each backend names the ``--target`` values that build its engines alone (``Backend.targets``) and
plans them (``Backend.plan``); ``auto`` asks every GPU backend (``Backend.auto_gpu_rank``)
whether this machine can build its engines, builds those that can for every distinct GPU, and
falls back to the CPU engine (``Backend.auto_cpu_fallback``) with one note saying why.
core/targets.py only detects what the machine has.
"""

from __future__ import annotations

from bert_compiler.core.errors import EnvironmentProblem, InputError
from bert_compiler.core.targets import (
    FP8_MIN_COMPUTE_CAPABILITY,
    Environment,
    fp8_capable,
    fp8_refusal,
)
from bert_compiler.engines.backend import TargetPlan, backends

AUTO_TARGET = "auto"
DEFAULT_TARGET = AUTO_TARGET
# Every --target value: auto, then each backend's own, in the registry's order.
TARGET_CHOICES = (AUTO_TARGET, *(t for backend in backends() for t in backend.targets))


def plan_targets(target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
    """Resolve ``--target`` and ``--precision`` to the engines to build here.

    ``auto`` builds, for every distinct compute capability present, the engines of every GPU
    backend this machine can build (TensorRT where it imports, ONNX Runtime CUDA where ORT has
    the CUDA provider); with no GPU (or no such backend) it builds the CPU ONNX Runtime engine
    instead and says why in one note. fp16 has no CPU engine: on the CPU fallback it becomes
    fp32, also with a note. No precisions means the defaults: fp16 on GPUs, fp32 on the CPU. fp8
    is built by TensorRT only, for GPUs of compute capability 8.9+ (fp8_capable; other GPUs are
    skipped with a note); a target that would build it anywhere else is refused (fp8_refusal).

    Raises:
        InputError: unknown target, or fp8 on a target that cannot build it.
        EnvironmentProblem: an explicit GPU target that this machine cannot build.
    """
    if target not in TARGET_CHOICES:
        raise InputError(f"--target {target!r}: expected one of {', '.join(TARGET_CHOICES)}")
    if target == AUTO_TARGET:
        plan = _plan_auto(precisions, env)
    else:
        plan = next(b for b in backends() if target in b.targets).plan(target, precisions, env)
    if "fp8" in precisions:
        return _check_fp8(plan, env)
    return plan


def _plan_auto(precisions: tuple[str, ...], env: Environment) -> TargetPlan:
    gpus = env.compute_capabilities()
    ranked = sorted(
        (b for b in backends() if b.auto_gpu_rank is not None),
        key=lambda b: b.auto_gpu_rank or 0,
    )
    problems = {b.name: b.gpu_problem(env) for b in ranked}
    ready = [b for b in ranked if not problems[b.name]]
    notes: list[str] = []
    if gpus and ready:
        engines: list[dict[str, str]] = []
        fp8_builders = " and ".join(b.label for b in ranked if b.builds_fp8)
        for backend in ranked:
            if problems[backend.name]:
                built = " and ".join(b.label for b in ready)
                notes.append(
                    f"no {backend.label} ({problems[backend.name]}): building {built} only"
                )
                continue
            engines += backend.gpu_engines(precisions, gpus)
            if "fp8" in precisions and not backend.builds_fp8:
                notes.append(f"fp8 is built by {fp8_builders} only: no {backend.label} fp8 engine")
        return TargetPlan(tuple(engines), tuple(notes))
    if "fp8" in precisions:
        raise InputError(fp8_refusal("--target auto found no GPU with TensorRT here"))
    if not gpus:
        why = "no NVIDIA GPU found"
    else:
        missing = " nor ".join(f"{b.label} ({problems[b.name]})" for b in ranked)
        why = f"GPU present but neither {missing} is available"
    fallback = next(b for b in backends() if b.auto_cpu_fallback)
    plan = fallback.plan_cpu(precisions)
    return TargetPlan(
        plan.engines, (f"{why}: building the {fallback.cpu_label} instead", *plan.notes)
    )


def _check_fp8(plan: TargetPlan, env: Environment) -> TargetPlan:
    """fp8 needs a GPU with fp8 tensor cores and a backend here that builds it; GPUs without
    them are skipped with a note."""
    gpus = env.compute_capabilities()
    capable = [g.compute_capability for g in gpus if fp8_capable(g.compute_capability)]
    builder_here = any(b.builds_fp8 and not b.gpu_problem(env) for b in backends())
    if not capable or not builder_here:
        found = ", ".join(g.compute_capability for g in gpus)
        raise EnvironmentProblem(fp8_refusal(f"this machine (GPU compute capability {found})"))
    skipped = sorted({g.compute_capability for g in gpus} - set(capable))
    if not skipped:
        return plan
    major, minor = FP8_MIN_COMPUTE_CAPABILITY
    note = f"fp8: no engine for compute capability {', '.join(skipped)} (below {major}.{minor})"
    return TargetPlan(plan.engines, (*plan.notes, note))
