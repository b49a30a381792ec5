"""Targets: which GPUs and backends this machine has, and which engines ``--target`` builds.

Detection never initialises CUDA in this process when it can help it: GPUs come from
``nvidia-smi`` (present wherever the NVIDIA driver is), so ``bert-compile targets`` answers on a
CPU-only machine, in a container without torch's CUDA build and on a GPU runner alike.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess  # nosec B404: fixed argv, no shell
from dataclasses import asdict, dataclass, field
from typing import Any

from bert_compiler.core.errors import EnvironmentProblem, InputError

log = logging.getLogger("bert_compile")

TARGET_CHOICES = ("auto", "cpu", "cuda", "tensorrt", "torch")
DEFAULT_TARGET = "auto"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
# fp8 tensor-core GEMMs exist from compute capability 8.9 (Ada) on, Hopper (9.0) included.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
DEVICES = ("cpu", "cuda")
_SMI_FIELDS = "index,name,compute_cap,memory.total,driver_version"


@dataclass(frozen=True)
class Gpu:
    """One GPU as the driver reports it."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    memory_mib: int
    driver: str

    @property
    def sm(self) -> str:
        """The compute capability as it appears in engine paths: ``sm90``."""
        return "sm" + self.compute_capability.replace(".", "")


@dataclass(frozen=True)
class Environment:
    """What this machine offers the build stage."""

    gpus: tuple[Gpu, ...] = ()
    tensorrt: str | None = None  # version, or None when ``import tensorrt`` fails
    tensorrt_problem: str = ""
    onnxruntime: str | None = None
    ort_providers: tuple[str, ...] = ()
    torch_cuda: str | None = None  # the CUDA version torch was built for; None: a CPU build
    notes: tuple[str, ...] = field(default=())

    @property
    def has_ort_cuda(self) -> bool:
        return "CUDAExecutionProvider" in self.ort_providers

    def compute_capabilities(self) -> list[Gpu]:
        """One GPU per distinct compute capability (the first of each): engines are per SM."""
        seen: dict[str, Gpu] = {}
        for gpu in self.gpus:
            seen.setdefault(gpu.compute_capability, gpu)
        return list(seen.values())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = [{**asdict(g), "sm": g.sm} for g in self.gpus]
        return data


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """Parse ``nvidia-smi --query-gpu=<_SMI_FIELDS> --format=csv,noheader,nounits`` output.

    Raises:
        EnvironmentProblem: a line does not have the expected fields.
    """
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5:
            raise EnvironmentProblem(f"nvidia-smi printed an unexpected line: {line!r}")
        index, name, capability, memory, driver = parts
        try:
            gpus.append(Gpu(int(index), name, capability, int(float(memory)), driver))
        except ValueError as err:
            raise EnvironmentProblem(f"nvidia-smi printed an unexpected line: {line!r}") from err
    return tuple(gpus)


def _detect_gpus() -> tuple[tuple[Gpu, ...], list[str]]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return (), ["no nvidia-smi on PATH: no NVIDIA driver, so no GPU"]
    try:
        done = subprocess.run(  # nosec B603: fixed argv
            [smi, f"--query-gpu={_SMI_FIELDS}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return (), [f"nvidia-smi failed: {err}"]
    if done.returncode != 0:
        return (), [f"nvidia-smi exited {done.returncode}: {done.stderr.strip()[:200]}"]
    return parse_nvidia_smi(done.stdout), []


def gpu_absence() -> str:
    """Why this machine has no NVIDIA GPU ('' when nvidia-smi lists one)."""
    gpus, notes = _detect_gpus()
    return "" if gpus else (notes[0] if notes else "nvidia-smi lists no GPU")


def current_gpu(needed_for: str) -> tuple[str, str]:
    """(compute capability such as ``"9.0"``, name) of the GPU torch runs on.

    Raises:
        EnvironmentProblem: torch sees no CUDA GPU; the message starts with ``needed_for``.
    """
    import torch

    if not torch.cuda.is_available():
        raise EnvironmentProblem(f"{needed_for} needs a CUDA GPU; torch sees none")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}", torch.cuda.get_device_name()


def _detect_tensorrt() -> tuple[str | None, str]:
    if importlib.util.find_spec("tensorrt") is None:
        return None, "the tensorrt package is not installed"
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # the PyPI stub and missing libnvinfer both land here
        return None, f"import tensorrt failed: {err}"
    version = getattr(tensorrt, "__version__", None)
    if not version:
        return None, "import tensorrt gave a module without __version__ (a download stub?)"
    return version, ""


def _detect_onnxruntime() -> tuple[str | None, tuple[str, ...]]:
    try:
        import onnxruntime
    except ImportError:
        return None, ()
    # Listing providers needs no CUDA libraries; engines/onnxruntime.py preloads them before
    # it creates a CUDA session.
    return onnxruntime.__version__, tuple(onnxruntime.get_available_providers())


def _detect_torch_cuda() -> str | None:
    # The build's CUDA version, without initialising CUDA (the GPUs come from nvidia-smi).
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def detect() -> Environment:
    """Look at GPUs, TensorRT, ONNX Runtime and torch's CUDA build on this machine."""
    gpus, notes = _detect_gpus()
    trt_version, trt_problem = _detect_tensorrt()
    ort_version, providers = _detect_onnxruntime()
    return Environment(
        gpus=gpus,
        tensorrt=trt_version,
        tensorrt_problem=trt_problem,
        onnxruntime=ort_version,
        ort_providers=providers,
        torch_cuda=_detect_torch_cuda(),
        notes=tuple(notes),
    )


def _torch_plan(precisions: tuple[str, ...], env: Environment) -> TargetPlan:
    """``--target torch``: one engine for every GPU here (its file is the weights: it runs on
    any GPU), fp16 by default; the CPU engine, fp32, where torch sees no GPU."""
    refused = sorted(set(precisions) - {"fp32", "fp16"})
    if refused:
        raise InputError(
            f"--target torch --precision {','.join(refused)}: the torch backend builds fp32 "
            "and fp16 engines; int8 and fp8 are ONNX Runtime's and TensorRT's"
        )
    notes: tuple[str, ...]
    if env.gpus and env.torch_cuda:
        device, chosen, notes = "cuda", precisions or ("fp16",), ()
    else:
        why = "no NVIDIA GPU found" if not env.gpus else "torch here is a CPU build"
        if "fp16" in precisions:
            raise EnvironmentProblem(f"--target torch --precision fp16: {why}; fp16 needs a GPU")
        device, chosen, notes = "cpu", ("fp32",), (f"{why}: building the torch CPU engine",)
    engines = tuple(
        {"backend": "torch", "device": device, "precision": p, "compute_capability": ""}
        for p in chosen
    )
    return TargetPlan(engines, notes)


def fp8_capable(compute_capability: str) -> bool:
    """True for a GPU with fp8 tensor cores (compute capability ``"8.9"`` or newer)."""
    parts = tuple(int(p) for p in compute_capability.split(".") if p.isdigit())
    return parts >= FP8_MIN_COMPUTE_CAPABILITY


def fp8_refusal(where: str) -> str:
    """The one line refusing ``--precision fp8`` on ``where`` (a target or backend)."""
    major, minor = FP8_MIN_COMPUTE_CAPABILITY
    return (
        f"{where}: --precision fp8 is built by TensorRT only, on compute capability "
        f"{major}.{minor}+ (ONNX Runtime's only fp8 GEMM ran slower than its fp16 MatMul on an "
        "H100 and cannot be captured in a CUDA graph: docs/benchmarks.md); use --target "
        "tensorrt on an Ada or Hopper GPU, or --precision int8"
    )


@dataclass(frozen=True)
class TargetPlan:
    """The engines one ``--target`` resolves to on this machine, and why."""

    engines: tuple[dict[str, Any], ...]  # backend, device, precision, compute_capability
    notes: tuple[str, ...] = ()


def plan_targets(target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
    """Resolve ``--target`` and ``--precision`` to the engines to build here.

    ``auto`` builds, for every distinct compute capability present, a TensorRT engine where
    TensorRT imports and an ONNX Runtime CUDA engine where ORT has the CUDA provider; with no GPU
    (or neither backend) it builds the CPU ONNX Runtime engine instead and says why in one note.
    fp16 has no CPU engine: on the CPU fallback it becomes fp32, also with a note. No
    precisions means the defaults: fp16 on GPUs, fp32 on the CPU. fp8 is built by TensorRT only,
    for GPUs of compute capability 8.9+ (fp8_capable; other GPUs are skipped with a note); a
    target that would build it anywhere else is refused (fp8_refusal).

    Raises:
        InputError: unknown target, or fp8 on a target that cannot build it.
        EnvironmentProblem: an explicit GPU target that this machine cannot build.
    """
    if target not in TARGET_CHOICES:
        raise InputError(f"--target {target!r}: expected one of {', '.join(TARGET_CHOICES)}")
    gpus = env.compute_capabilities()
    defaulted = not precisions
    notes: list[str] = []
    engines: list[dict[str, str]] = []
    fp8 = "fp8" in precisions
    if fp8 and target in ("cpu", "cuda"):
        raise InputError(fp8_refusal(f"--target {target}"))

    def gpu_engines(backend: str, device: str, *, builds_fp8: bool = False) -> None:
        for gpu in gpus:
            for precision in precisions or ("fp16",):
                if precision == "fp8" and not (builds_fp8 and fp8_capable(gpu.compute_capability)):
                    continue
                engines.append(
                    {
                        "backend": backend,
                        "device": device,
                        "precision": precision,
                        "compute_capability": gpu.compute_capability,
                    }
                )

    if target == "torch":
        return _torch_plan(precisions, env)
    if target == "tensorrt":
        if not gpus or env.tensorrt is None:
            raise EnvironmentProblem(
                "--target tensorrt: "
                + ("no NVIDIA GPU found" if not gpus else env.tensorrt_problem)
                + "; use --target auto to fall back to ONNX Runtime"
            )
        gpu_engines("tensorrt", "cuda", builds_fp8=True)
    elif target == "cuda":
        if not gpus or not env.has_ort_cuda:
            raise EnvironmentProblem(
                "--target cuda: "
                + (
                    "no NVIDIA GPU found"
                    if not gpus
                    else f"ONNX Runtime {env.onnxruntime} has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu)"
                )
                + "; use --target auto to fall back to the CPU engine"
            )
        gpu_engines("onnxruntime", "cuda")
    elif target == "auto" and gpus and (env.tensorrt or env.has_ort_cuda):
        if env.tensorrt:
            gpu_engines("tensorrt", "cuda", builds_fp8=True)
        else:
            notes.append(f"no TensorRT ({env.tensorrt_problem}): building ONNX Runtime CUDA only")
        if env.has_ort_cuda:
            gpu_engines("onnxruntime", "cuda")
            if fp8:
                notes.append("fp8 is built by TensorRT only: no ONNX Runtime CUDA fp8 engine")
    else:
        if fp8:
            raise InputError(fp8_refusal("--target auto found no GPU with TensorRT here"))
        if target == "cpu" and "fp16" in precisions:
            raise InputError("--target cpu --precision fp16: the CPU engine is fp32 or int8")
        if target == "auto":
            why = (
                "no NVIDIA GPU found"
                if not gpus
                else f"GPU present but neither TensorRT ({env.tensorrt_problem}) nor ONNX "
                "Runtime's CUDA provider is available"
            )
            notes.append(f"{why}: building the CPU ONNX Runtime engine instead")
        for precision in dict.fromkeys(
            "fp32" if p == "fp16" else p for p in precisions or ("fp32",)
        ):
            engines.append(
                {
                    "backend": "onnxruntime",
                    "device": "cpu",
                    "precision": precision,
                    "compute_capability": "",
                }
            )
        if "fp16" in precisions and not defaulted:
            notes.append("fp16 has no CPU engine: built fp32 instead")
    if fp8:
        capable = [g.compute_capability for g in gpus if fp8_capable(g.compute_capability)]
        if not capable or env.tensorrt is None:
            found = ", ".join(g.compute_capability for g in gpus)
            raise EnvironmentProblem(fp8_refusal(f"this machine (GPU compute capability {found})"))
        skipped = sorted({g.compute_capability for g in gpus} - set(capable))
        if skipped:
            major, minor = FP8_MIN_COMPUTE_CAPABILITY
            notes.append(
                f"fp8: no engine for compute capability {', '.join(skipped)} "
                f"(below {major}.{minor})"
            )
    return TargetPlan(tuple(engines), tuple(notes))
