"""TensorRT at run time: importing it, its logger, and a deserialized plan run on its own CUDA
stream (engines/tensorrt.py is the backend; engines/tensorrt_build.py builds the plans).

``tensorrt`` and ``torch.cuda`` are imported only inside the functions that need them, so this
module imports on a machine without them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.targets import current_gpu
from bert_compiler.engines.feeds import require_inputs, run_numpy_on_gpu
from bert_compiler.engines.tensorrt_options import (
    TensorRTOptions,
    compatibility_problems,
    select_profile,
)

log = logging.getLogger("bert_compile")

if TYPE_CHECKING:
    # The TensorRT API as the type check sees it (tensorrt-stubs; pyproject.toml [tool.mypy]). At
    # run time tensorrt is imported only inside the functions that need it, after
    # import_tensorrt() has checked that it imports, as `import tensorrt as trt`: a local name
    # bound by an import keeps the module's types, where one returned by a function would not.
    import tensorrt as trt


def import_tensorrt() -> ModuleType:
    """The tensorrt module, once it is known to import with its libraries.

    Raises:
        EnvironmentProblem: tensorrt or its libraries are missing, or it is an empty stub.
    """
    try:
        import tensorrt
    except (ImportError, OSError) as err:
        raise EnvironmentProblem(
            f"the TensorRT backend needs the tensorrt package with its libraries ({err}); "
            "use --target auto to fall back to ONNX Runtime"
        ) from err
    if not getattr(tensorrt, "__version__", None):
        raise EnvironmentProblem("import tensorrt gave a module without __version__ (a stub?)")
    return tensorrt


def make_logger() -> tuple[trt.ILogger, list[str]]:
    """A logger for Builder/Runtime, and the list it collects TensorRT's error messages in."""
    import tensorrt as trt

    errors: list[str] = []

    class Logger(trt.ILogger):
        """Routes TensorRT's messages to our log and keeps the errors for the one-line report."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            levels = trt.ILogger.Severity
            if severity in (levels.INTERNAL_ERROR, levels.ERROR):
                errors.append(msg)
                log.error("[tensorrt] %s", msg)
            elif severity == levels.WARNING:
                log.warning("[tensorrt] %s", msg)
            else:
                log.debug("[tensorrt] %s", msg)

    return Logger(), errors


_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def _torch_dtype(torch: Any, dtype: trt.DataType) -> Any:
    """The torch dtype of a TensorRT DataType (matched by member name across versions)."""
    if dtype.name in _TORCH_DTYPES:
        return getattr(torch, _TORCH_DTYPES[dtype.name])
    raise InputError(f"engine tensor type {dtype} has no torch equivalent")


class TensorRTEngine:
    """A deserialized plan with one execution context on its own CUDA stream.

    ``run_device`` takes and returns torch CUDA tensors (no host copies); ``run`` wraps it for the
    numpy feeds verify uses.
    """

    packed_rows = False
    concurrent_runs = False

    def __init__(self, plan: bytes, options: TensorRTOptions, path: Path):
        import torch

        import_tensorrt()
        import tensorrt as trt

        self._torch = torch
        self.path = path
        self.options = options
        self.device = "cuda"
        # The largest batch some optimization profile accepts.
        self.max_batch: int | None = max((p.max_batch for p in options.profiles), default=None)
        self._logger, self._errors = make_logger()
        self._runtime = trt.Runtime(self._logger)
        # Version-compatible plans carry a lean runtime (host code); allowed only for them.
        self._runtime.engine_host_code_allowed = options.version_compatible
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError(
                f"{path}: TensorRT could not deserialize the plan: "
                f"{'; '.join(self._errors) or 'no message'}"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: _torch_dtype(torch, self.engine.get_tensor_dtype(n)) for n in names}
        self._profile = 0

    def run_device(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Run one batch of CUDA tensors [batch, sequence]; returns CUDA tensors, synchronised
        with the caller's current stream."""
        torch = self._torch
        require_inputs(self.path, self.input_names, tensors)
        batch, seq = tensors[self.input_names[0]].shape
        profile = select_profile(self.options.profiles, batch, seq)
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        keep_alive = []
        for name in self.input_names:
            tensor = tensors[name].to(device="cuda", dtype=self._dtypes[name]).contiguous()
            keep_alive.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            # Dims[:] is a tuple; tuple(Dims) iterates only through __getitem__, unknown to mypy.
            shape = self.context.get_tensor_shape(name)[:]
            outputs[name] = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise InputError(f"{self.path}: TensorRT failed to run batch={batch} sequence={seq}")
        for tensor in (*keep_alive, *outputs.values()):
            tensor.record_stream(self.stream)
        caller.wait_stream(self.stream)
        return outputs

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run one batch of numpy int64 feeds; returns float32 numpy outputs."""
        require_inputs(self.path, self.input_names, feeds)
        return run_numpy_on_gpu(self.run_device, self.input_names, feeds)


def load_plan(
    plan_path: Path,
    options: TensorRTOptions,
    *,
    built_tensorrt: str,
    built_compute_capability: str,
) -> TensorRTEngine:
    """Check the plan fits this GPU and TensorRT version, then deserialize it.

    The caller has checked the plan's sha256 against its manifest (backend.load_engine):
    a plan is executable code and only plans this tool recorded are loaded.

    Raises:
        EnvironmentProblem: no GPU, no tensorrt, or the plan does not fit this machine.
        ArtifactError: TensorRT cannot deserialize the plan.
    """

    trt = import_tensorrt()
    capability, _ = current_gpu(f"{plan_path}: running a TensorRT plan")
    problems = compatibility_problems(
        built_tensorrt=built_tensorrt,
        built_compute_capability=built_compute_capability,
        options=options,
        runtime_tensorrt=trt.__version__,
        runtime_compute_capability=capability,
    )
    if problems:
        raise EnvironmentProblem(f"{plan_path}: " + "; ".join(problems))
    return TensorRTEngine(Path(plan_path).read_bytes(), options, Path(plan_path))
