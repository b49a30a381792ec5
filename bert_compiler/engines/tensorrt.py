"""TensorRT backend: a serialized plan built from the standard-ops ONNX graph, strongly typed.

Precision comes from the graph, never from builder flags (TensorRT 11 removed the FP16/INT8 flags
and implicit calibration): the build stage hands this module an fp16 graph (engines/fp16.py) or
the explicit Q/DQ graph of the calibrate stage, and the network is created STRONGLY_TYPED so
TensorRT runs each tensor in the type the graph gives it.

fp8 (compute capability 8.9+) is the same: the float8 e4m3fn Q/DQ graph of ``calibrate --format
fp8``, its float parts (scales included) turned fp16 by engines/fp16.py, so the projections and
the FFN run as fp8 GEMMs and everything else in fp16. No FP8 or FP16 builder flag is set: NVIDIA's
explicit-quantization guide says to use Q/DQ with strong typing and that precision flags "are not
required and should not be specified" (docs.nvidia.com/deeplearning/tensorrt/latest/
inference-library/quantized-types-explicit-quantization.html); a strongly typed network takes
its types from the graph alone. Weights are stored as float8 with per-output-channel or
per-tensor fp16 scales, as TensorRT's FP8 scheme (castToFp8(clip(x / s, -448, 448))) takes them.

Everything here that needs no GPU (profiles, profile choice, compatibility checks, graph checks,
options) is plain Python and tested on CPU; ``tensorrt`` and ``torch.cuda`` are imported only by
``build_engine`` and ``load``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError, Interrupted
from bert_compiler.core.onnx_io import load_onnx, save_onnx
from bert_compiler.core.targets import Environment, current_gpu, fp8_capable, fp8_refusal
from bert_compiler.engines.backend import (
    Backend,
    BuildJob,
    BuildSpec,
    TargetPlan,
    TritonBatching,
    check_float_source,
    gpu_facts,
    quantized_types,
    register,
)
from bert_compiler.engines.feeds import require_inputs, run_numpy_on_gpu
from bert_compiler.engines.fp16 import convert_to_fp16
from bert_compiler.engines.tensorrt_options import (
    Profile,
    TensorRTOptions,
    compatibility_problems,
    select_profile,
    target_tag,
)

log = logging.getLogger("bert_compile")

PLAN_FILE = "model.plan"
NETWORK_FILE = "network.onnx"


def prepare_network_graph(model: Any, *, precision: str, keep_float_ops: Sequence[str] = ()) -> Any:
    """The graph TensorRT parses: standard ops only, in the precision asked for.

    Raises:
        InputError: the graph holds ORT contrib ops (a fused graph), or an int8 or fp8 build got
            a graph without Q/DQ of its type, or an unknown precision.
    """
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise InputError(
            f"the TensorRT backend takes the standard-ops graph (simplify/ or calibrate/), "
            f"not one with ONNX Runtime contrib ops ({', '.join(contrib)})"
        )
    if precision == "fp16":
        return convert_to_fp16(model, keep_float_ops=keep_float_ops)
    if precision == "int8":
        if "INT8" not in quantized_types(model):
            raise InputError("int8 TensorRT engines need the Q/DQ graph of the calibrate stage")
        return model
    if precision == "fp8":
        if "FLOAT8E4M3FN" not in quantized_types(model):
            raise InputError(
                "fp8 TensorRT engines need the float8 Q/DQ graph of `calibrate --format fp8` "
                "(OUT/calibrate-fp8)"
            )
        # The rest of the network in fp16: strongly typed, TensorRT keeps the graph's types.
        return convert_to_fp16(model, keep_float_ops=keep_float_ops)
    if precision == "fp32":
        return model
    raise InputError(f"TensorRT precision {precision!r}: expected fp32, fp16, int8 or fp8")


if TYPE_CHECKING:
    # The TensorRT API as the type check sees it (tensorrt-stubs; pyproject.toml [tool.mypy]). At
    # run time tensorrt is imported only inside the functions that need it, after
    # _import_tensorrt() has checked that it imports, as `import tensorrt as trt`: a local name
    # bound by an import keeps the module's types, where one returned by a function would not.
    import tensorrt as trt


def _import_tensorrt() -> ModuleType:
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


def _make_logger() -> tuple[trt.ILogger, list[str]]:
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


class SignalWatch:
    """Notices SIGINT/SIGTERM while the main thread is inside a long native call.

    Python runs signal handlers only between bytecodes, so during ``build_serialized_network``
    a Ctrl-C would wait for the whole build. The interpreter's C-level handler writes each
    signal's number to the fd given to ``signal.set_wakeup_fd`` at once, whatever the main thread
    is doing; TensorRT's progress monitor (called on its own threads) polls it through
    ``requested()`` and cancels the build. Inactive (never requested) off the main thread.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._read = self._write = -1
        self._previous: int | None = None

    def __enter__(self) -> SignalWatch:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        try:
            self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: signals are not ours to watch
            self._previous = None
        return self

    def requested(self) -> bool:
        """True once SIGINT or SIGTERM arrived (other signals are ignored)."""
        try:
            data = os.read(self._read, 64)
        except (BlockingIOError, OSError):
            data = b""
        for number in data:
            if number in (signal.SIGINT, signal.SIGTERM):
                self.received = signal.Signals(number)
        return self.received is not None

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
        self.requested()
        os.close(self._read)
        os.close(self._write)


def _make_progress_monitor(signals: SignalWatch) -> trt.IProgressMonitor:
    import tensorrt as trt

    class ProgressMonitor(trt.IProgressMonitor):
        """Logs the builder's phases (a long build shows progress) and cancels it on a signal."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        # parent_phase is None for a top-level phase (the stubs say str; TensorRT passes None).
        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                log.info("[tensorrt] %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return not signals.requested()  # False asks TensorRT to cancel the build

        def phase_finish(self, phase_name: str) -> None:
            pass

    return ProgressMonitor()


@dataclass
class BuildFacts:
    """What the manifest records about a TensorRT build."""

    tensorrt: str
    compute_capability: str
    gpu: str
    profiles: list[str] = field(default_factory=list)
    timing_cache_hit: bool = False
    plan_bytes: int = 0


def build_engine(
    network_onnx: Path,
    plan_path: Path,
    options: TensorRTOptions,
    *,
    input_names: Sequence[str],
) -> dict[str, Any]:
    """Parse ``network_onnx`` into a strongly typed network and write the serialized plan.

    Args:
        network_onnx: the prepared graph (prepare_network_graph), on disk so the parser resolves
            external data beside it.
        plan_path: where the plan goes (a staging path; the caller renames it into place).
        options: profiles must be resolved (non-empty) by now.
        input_names: the [batch, sequence] token inputs every profile sets.

    Raises:
        InputError: the parser or builder rejects the graph (their messages included).
        EnvironmentProblem: tensorrt or a GPU is missing.
    """

    _import_tensorrt()
    import tensorrt as trt

    capability, gpu = current_gpu("building a TensorRT plan")
    if not options.profiles:
        raise InputError("TensorRT build needs at least one optimization profile")
    logger, trt_errors = _make_logger()
    builder = trt.Builder(logger)
    # TensorRT 11 builds every network strongly typed and ignores this flag (still defined there,
    # deprecated); 10.x needs it. The bit comes from the enum, whose value differs between the two.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(network_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{network_onnx}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.builder_optimization_level
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    # One member looked up at a time: SAME_COMPUTE_CAPABILITY first appears in TensorRT 10.10.
    if options.hardware_compatibility == "ampere_plus":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif options.hardware_compatibility == "same_compute_capability":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(input_names):
        raise InputError(
            f"{network_onnx}: network inputs {sorted(network_inputs)} differ from the model's "
            f"{sorted(input_names)}"
        )
    for profile in options.profiles:
        trt_profile = builder.create_optimization_profile()
        # Dims built here rather than by pybind11's implicit tuple conversion, which the stubs lack.
        low, opt, high = (trt.Dims(list(shape)) for shape in profile.shapes())
        for name in input_names:
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    cache_file = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    with SignalWatch() as signals:
        # Kept referenced until the build returns: TensorRT holds only a raw pointer to it.
        monitor = _make_progress_monitor(signals)
        config.progress_monitor = monitor
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        if signals.received is not None:
            raise Interrupted(signals.received.name, 128 + signals.received)
        raise InputError(
            f"{network_onnx}: TensorRT could not build a plan: {'; '.join(trt_errors) or '?'}"
        )
    Path(plan_path).write_bytes(memoryview(plan))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as staging:
            staging.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return asdict(
        BuildFacts(
            tensorrt=trt.__version__,
            compute_capability=capability,
            gpu=gpu,
            profiles=[str(p) for p in options.profiles],
            timing_cache_hit=bool(cache_bytes),
            plan_bytes=Path(plan_path).stat().st_size,
        )
    )


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

        _import_tensorrt()
        import tensorrt as trt

        self._torch = torch
        self.path = path
        self.options = options
        self.device = "cuda"
        # The largest batch some optimization profile accepts.
        self.max_batch: int | None = max((p.max_batch for p in options.profiles), default=None)
        self._logger, self._errors = _make_logger()
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


def load(
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

    trt = _import_tensorrt()
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


class TensorRTBackend(Backend):
    """TensorRT plans, strongly typed, from the standard-ops graph (fp32, fp16) or the calibrated
    Q/DQ graph (int8; fp8 from the float8 one), with optimization profiles and a timing cache
    shared per GPU."""

    name = "tensorrt"
    tag = "trt"
    file_suffix = ".plan"
    triton_platform = "tensorrt_plan"
    version_key = "tensorrt"
    opaque = True
    builds_fp8 = True
    options_type = TensorRTOptions
    label = "TensorRT"
    targets = ("tensorrt",)
    auto_gpu_rank = 0

    def version(self) -> str:
        return str(_import_tensorrt().__version__)

    def gpu_problem(self, env: Environment) -> str:
        return "" if env.tensorrt else env.tensorrt_problem or "TensorRT is not installed"

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        return self.plan_gpus(target, precisions, env, "ONNX Runtime")

    def check(self, spec: BuildSpec) -> None:
        if spec.device != "cuda":
            raise InputError("TensorRT engines run on cuda only")
        spec.options.validate()
        capability = spec.compute_capability
        if spec.precision == "fp8" and capability and not fp8_capable(capability):
            raise InputError(fp8_refusal(f"--backend tensorrt, compute capability {capability}"))
        if spec.precision == "fp8" and spec.options.hardware_compatibility == "ampere_plus":
            raise InputError(
                "--precision fp8 --hardware-compatibility ampere_plus: an Ampere GPU has no fp8 "
                "GEMMs; build fp8 for this GPU only (--hardware-compatibility none)"
            )

    def source_stage(self, spec: BuildSpec) -> str:
        # The folders of stages/layout.py (Layout.calibration): int8 and fp8 graphs apart.
        return {"int8": "calibrate", "fp8": "calibrate-fp8"}.get(spec.precision, "simplify")

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        return [target_tag(spec.compute_capability, spec.options)]

    def variants(self, spec: BuildSpec) -> list[str]:
        return ["vc"] if spec.options.version_compatible else []

    def complete(
        self,
        spec: BuildSpec,
        *,
        derive_profiles: Callable[[], tuple[Profile, ...]],
        timing_cache: Callable[[str, str], Path],
    ) -> BuildSpec:
        options = spec.options
        if not options.profiles:
            options = replace(options, profiles=derive_profiles())
        if not options.timing_cache:
            cache = timing_cache(self.version(), spec.compute_capability)
            options = replace(options, timing_cache=str(cache))
        return replace(spec, options=options)

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        if not spec.options.profiles:
            raise InputError("TensorRT build needs profiles (given, or derived by the runner)")
        loaded = {}

        def prepare() -> None:
            loaded["model"] = load_onnx(source)
            check_float_source(loaded["model"], precision=spec.precision, where=str(source))

        def body(folder: Path) -> tuple[list[str], dict[str, Any]]:
            gpu_facts(spec)
            network = prepare_network_graph(
                loaded["model"], precision=spec.precision, keep_float_ops=spec.keep_float_ops
            )
            names = input_names or tuple(i.name for i in network.graph.input)
            save_onnx(network, folder / NETWORK_FILE)
            with atomic_path(folder / PLAN_FILE) as staging:
                facts = build_engine(
                    folder / NETWORK_FILE, staging, spec.options, input_names=names
                )
            engine = load(
                folder / PLAN_FILE,
                spec.options,
                built_tensorrt=facts["tensorrt"],
                built_compute_capability=facts["compute_capability"],
            )
            return [NETWORK_FILE, PLAN_FILE], {
                **facts,
                "engine_file": PLAN_FILE,
                "network_file": NETWORK_FILE,
                "inputs": engine.input_names,
                "outputs": engine.output_names,
            }

        settings = {
            "keep_float_ops": list(spec.keep_float_ops),
            "tensorrt": spec.options.to_dict(),
        }
        return BuildJob(settings=settings, prepare=prepare, body=body)

    def load(
        self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]
    ) -> TensorRTEngine:
        return load(
            engine_path,
            self.from_record(spec).options,
            built_tensorrt=results["tensorrt"],
            built_compute_capability=results["compute_capability"],
        )

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        return BuildSpec(
            backend=self.name,
            device=spec["device"],
            precision=spec["precision"],
            compute_capability=spec.get("compute_capability", ""),
            keep_float_ops=tuple(spec.get("keep_float_ops", ())),
            options=TensorRTOptions.from_dict(spec.get("tensorrt", {})),
        )

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        level = spec.options.hardware_compatibility
        return [] if level == "none" else [level]

    def portable(self, spec: Mapping[str, Any]) -> bool:
        # An ampere_plus plan runs on every sm80+ GPU; a same_compute_capability plan still
        # belongs to one compute capability.
        return self.from_record(spec).options.hardware_compatibility == "ampere_plus"

    def shared_settings(self, spec: Mapping[str, Any]) -> Any:
        # One config serves every GPU's plan: batch limits come from one set of profiles.
        return spec.get("tensorrt")

    def io_graph(self, folder: Path, results: Mapping[str, Any]) -> str:
        # A plan cannot be opened without TensorRT: its tensors are those of the graph it parsed.
        return str(results["network_file"])

    def triton_batching(
        self,
        spec: Mapping[str, Any],
        *,
        max_batch_size: int,
        max_length: int,
        where: str,
        ladder: Sequence[int] = (),
        token_budget: int = 0,
    ) -> TritonBatching:
        # The profiles decide: their opt batches are the preferred sizes. Every rung of the
        # ladder is a length up to max_length, which the check below covers.
        profiles = self.from_record(spec).options.profiles
        max_batch = min(p.max_batch for p in profiles)
        covered = 0
        for profile in sorted(profiles, key=lambda p: p.min_seq):
            if profile.min_batch != 1:
                raise InputError(
                    f"{where}: profile {profile} starts at batch {profile.min_batch}; Triton "
                    "sends batches from 1 up: rebuild with profiles starting at batch 1"
                )
            if profile.min_seq <= covered + 1:
                covered = max(covered, profile.max_seq)
        if covered < max_length:
            raise InputError(
                f"{where}: the profiles cover sequences up to {covered} tokens but the tokenizer "
                f"sends up to {max_length}; rebuild with a profile reaching {max_length} (or "
                f"verify with --max-length {covered} and package again)"
            )
        return TritonBatching(
            max_batch_size=max_batch,
            preferred_batch_sizes=tuple(
                sorted({p.opt_batch for p in profiles if p.opt_batch <= max_batch})
            ),
            profiles=tuple(str(i) for i in range(len(profiles))),
            warmup_lengths=tuple(sorted({min(p.opt_seq, max_length) for p in profiles})),
        )


BACKEND = register(TensorRTBackend())
