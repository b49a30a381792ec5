"""What this machine has for the build stage: its GPUs, TensorRT, ONNX Runtime's providers and
torch's CUDA build. Which engines ``--target`` builds from that is the backends' to say
(engines/targets.py).

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

from bert_compiler.core.errors import EnvironmentProblem

log = logging.getLogger("bert_compile")

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
    # Listing providers needs no CUDA libraries; engines/ort_session.py preloads them before
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


def parse_capability(compute_capability: str) -> tuple[int, ...]:
    """A compute capability as nvidia-smi writes it (``"8.9"``) as numbers to compare with a
    minimum (``(8, 9)``)."""
    return tuple(int(p) for p in compute_capability.split(".") if p.isdigit())


def fp8_capable(compute_capability: str) -> bool:
    """True for a GPU with fp8 tensor cores (compute capability ``"8.9"`` or newer)."""
    return parse_capability(compute_capability) >= FP8_MIN_COMPUTE_CAPABILITY


def fp8_refusal(where: str) -> str:
    """The one line refusing ``--precision fp8`` on ``where`` (a target or backend)."""
    major, minor = FP8_MIN_COMPUTE_CAPABILITY
    return (
        f"{where}: --precision fp8 is built by TensorRT only, on compute capability "
        f"{major}.{minor}+ (ONNX Runtime's only fp8 GEMM ran slower than its fp16 MatMul on an "
        "H100 and cannot be captured in a CUDA graph: docs/benchmarks.md); use --target "
        "tensorrt on an Ada or Hopper GPU, or --precision int8"
    )
