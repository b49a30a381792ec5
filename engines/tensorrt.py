"""TensorRT backend: a serialized plan built from the standard-ops ONNX graph, strongly typed.

Precision comes from the graph, never from builder flags (TensorRT 11 removed the FP16/INT8 flags
and implicit calibration): the build stage hands this module an fp16 graph (engines/fp16.py) or
the explicit Q/DQ graph of the calibrate stage, and the network is created STRONGLY_TYPED so
TensorRT runs each tensor in the type the graph gives it.

Everything here that needs no GPU (profiles, profile choice, compatibility checks, graph checks,
options) is plain Python and tested on CPU; ``tensorrt`` and ``torch.cuda`` are imported only by
``build_engine`` and ``load``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError, Interrupted
from bert_compiler.core.targets import current_gpu
from bert_compiler.engines.feeds import require_inputs, run_numpy_on_gpu

log = logging.getLogger("bert_compile")

PLAN_FILE = "model.plan"
NETWORK_FILE = "network.onnx"
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
MAX_PROFILE_BATCH = 4096


@dataclass(frozen=True)
class Profile:
    """One optimization profile: the batch and sequence ranges an engine accepts, and the shape
    its kernels are tuned for (``opt``)."""

    min_batch: int
    opt_batch: int
    max_batch: int
    min_seq: int
    opt_seq: int
    max_seq: int

    def validate(self, max_positions: int | None = None) -> None:
        """Raises InputError for empty, inverted or absurd ranges."""
        batch = (self.min_batch, self.opt_batch, self.max_batch)
        seq = (self.min_seq, self.opt_seq, self.max_seq)
        if not (1 <= batch[0] <= batch[1] <= batch[2] <= MAX_PROFILE_BATCH):
            raise InputError(
                f"profile batch {batch}: need 1 <= min <= opt <= max <= {MAX_PROFILE_BATCH}"
            )
        limit = max_positions or 1 << 16
        if not (1 <= seq[0] <= seq[1] <= seq[2] <= limit):
            raise InputError(
                f"profile sequence {seq}: need 1 <= min <= opt <= max <= {limit} "
                "(the model's max_position_embeddings)"
            )

    def accepts(self, batch: int, seq: int) -> bool:
        return self.min_batch <= batch <= self.max_batch and self.min_seq <= seq <= self.max_seq

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) shapes of every [batch, sequence] input."""
        return (
            (self.min_batch, self.min_seq),
            (self.opt_batch, self.opt_seq),
            (self.max_batch, self.max_seq),
        )

    @classmethod
    def parse(cls, text: str) -> Profile:
        """Parse ``BxS:BxS:BxS`` (min, opt, max; batch x sequence), e.g. ``1x8:32x128:64x128``.

        Raises:
            InputError: malformed text.
        """
        try:
            shapes = [tuple(int(v) for v in part.split("x")) for part in text.split(":")]
            if len(shapes) != 3 or any(len(s) != 2 for s in shapes):
                raise ValueError
        except ValueError as err:
            raise InputError(
                f"--profile {text!r}: expected min:opt:max as BxS:BxS:BxS, e.g. 1x8:32x128:64x128"
            ) from err
        (b0, s0), (b1, s1), (b2, s2) = shapes
        return cls(b0, b1, b2, s0, s1, s2)

    def __str__(self) -> str:
        (b0, s0), (b1, s1), (b2, s2) = self.shapes()
        return f"{b0}x{s0}:{b1}x{s1}:{b2}x{s2}"


def derive_profiles(
    token_lengths: Sequence[int], *, max_batch: int, max_length: int, buckets: int = 2
) -> tuple[Profile, ...]:
    """Profiles from the token lengths of a sample of real inputs.

    Sequence ranges split at length quantiles (rounded up to a multiple of 8, where tensor-core
    kernels tile), so short inputs run on kernels tuned for short shapes; the last profile always
    reaches ``max_length`` so no input is refused. Each profile is tuned at its largest sequence
    and the full batch: the shape that decides throughput.

    Raises:
        InputError: no lengths, or bad limits.
    """
    if not token_lengths:
        raise InputError("cannot derive profiles from an empty dataset")
    if buckets < 1 or max_batch < 1 or max_length < 1:
        raise InputError("profiles need buckets, max_batch and max_length >= 1")
    ordered = sorted(token_lengths)
    bounds: list[int] = []
    for k in range(1, buckets):
        quantile = ordered[min(len(ordered) - 1, math.ceil(k * len(ordered) / buckets) - 1)]
        bound = min(max_length, max(8, -(-quantile // 8) * 8))
        if bound < max_length and (not bounds or bound > bounds[-1]):
            bounds.append(bound)
    bounds.append(max_length)
    profiles = []
    low = 1
    for bound in bounds:
        profiles.append(Profile(1, max_batch, max_batch, low, bound, bound))
        low = bound + 1
    return tuple(profiles)


def select_profile(profiles: Sequence[Profile], batch: int, seq: int) -> int:
    """Index of the profile to run ``[batch, seq]`` with: the narrowest one that accepts it.

    Raises:
        InputError: no profile accepts the shape.
    """
    fits = [i for i, p in enumerate(profiles) if p.accepts(batch, seq)]
    if not fits:
        ranges = ", ".join(str(p) for p in profiles)
        raise InputError(
            f"input shape batch={batch} sequence={seq} is outside every profile of the engine "
            f"({ranges}); rebuild with a --profile that covers it"
        )
    return min(fits, key=lambda i: (profiles[i].max_seq, profiles[i].max_batch))


@dataclass(frozen=True)
class TensorRTOptions:
    """How a plan is built and what it needs at load time.

    Attributes:
        profiles: optimization profiles; empty means derive them from the dataset's token lengths.
        builder_optimization_level: 0-5; higher searches more tactics (slower build).
        workspace_mib: cap on the builder's scratch memory; 0 leaves TensorRT's default.
        timing_cache: file the timing cache is read from and written back to; reused across
            builds (and models) of the same TensorRT version and GPU, it skips re-timing tactics.
        hardware_compatibility: ``none`` (this compute capability only), ``ampere_plus`` (any
            sm80+) or ``same_compute_capability``.
        version_compatible: plan runs on later TensorRT versions; it embeds host code, which the
            loader must explicitly allow.
    """

    profiles: tuple[Profile, ...] = ()
    builder_optimization_level: int = 3
    workspace_mib: int = 0
    timing_cache: str = ""
    hardware_compatibility: str = "none"
    version_compatible: bool = False

    def validate(self, max_positions: int | None = None) -> None:
        if not 0 <= self.builder_optimization_level <= 5:
            raise InputError(
                f"--builder-optimization-level {self.builder_optimization_level}: expected 0-5"
            )
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise InputError(
                f"--hardware-compatibility {self.hardware_compatibility!r}: expected one of "
                f"{', '.join(HARDWARE_COMPATIBILITY)}"
            )
        if self.workspace_mib < 0:
            raise InputError(f"--workspace-mib {self.workspace_mib}: must be >= 0")
        for profile in self.profiles:
            profile.validate(max_positions)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [str(p) for p in self.profiles]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorRTOptions:
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["profiles"] = tuple(Profile.parse(p) for p in data.get("profiles", ()))
        return cls(**values)


def target_tag(compute_capability: str, options: TensorRTOptions) -> str:
    """The GPU part of an engine's folder name: ``sm90``, or the compatibility level."""
    if options.hardware_compatibility == "ampere_plus":
        return "ampere_plus"
    return "sm" + compute_capability.replace(".", "")


def compatibility_problems(
    *,
    built_tensorrt: str,
    built_compute_capability: str,
    options: TensorRTOptions,
    runtime_tensorrt: str,
    runtime_compute_capability: str,
) -> list[str]:
    """Why a plan built with ``built_*`` cannot run here (empty when it can).

    TensorRT's own rules: a plan runs only on the TensorRT version that built it unless it is
    version-compatible (then on the same or a later version of that major, and TensorRT 10 plans
    on 11); only on the building GPU's compute capability unless built hardware-compatible
    (``ampere_plus``: any sm80 or newer).
    """
    problems = []
    built_v = tuple(int(p) for p in built_tensorrt.split(".")[:3] if p.isdigit())
    runtime_v = tuple(int(p) for p in runtime_tensorrt.split(".")[:3] if p.isdigit())
    if options.version_compatible:
        if runtime_v < built_v or runtime_v[:1] > (built_v[0] + 1,):
            problems.append(
                f"TensorRT {runtime_tensorrt} cannot run a version-compatible plan built with "
                f"{built_tensorrt} (needs that version or a later one, up to the next major)"
            )
    elif runtime_v != built_v:
        problems.append(
            f"plan built with TensorRT {built_tensorrt}, this machine has {runtime_tensorrt}; "
            "rebuild it here (or build with --version-compatible)"
        )
    built_cc = tuple(int(p) for p in built_compute_capability.split("."))
    runtime_cc = tuple(int(p) for p in runtime_compute_capability.split("."))
    if options.hardware_compatibility == "ampere_plus":
        if runtime_cc < (8, 0):
            problems.append(
                f"plan is hardware-compatible for Ampere and newer; this GPU is sm"
                f"{runtime_compute_capability.replace('.', '')}"
            )
    elif runtime_cc != built_cc:
        problems.append(
            f"plan built for compute capability {built_compute_capability}, this GPU is "
            f"{runtime_compute_capability}; build an engine for this GPU (--target auto)"
        )
    return problems


def prepare_network_graph(model: Any, *, precision: str, keep_float_ops: Sequence[str] = ()) -> Any:
    """The graph TensorRT parses: standard ops only, in the precision asked for.

    Raises:
        InputError: the graph holds ORT contrib ops (a fused graph), or an int8 build got a graph
            without Q/DQ, or an unknown precision.
    """
    from bert_compiler.engines.fp16 import convert_to_fp16

    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise InputError(
            f"the TensorRT backend takes the standard-ops graph (simplify/ or calibrate/), "
            f"not one with ONNX Runtime contrib ops ({', '.join(contrib)})"
        )
    if precision == "fp16":
        return convert_to_fp16(model, keep_float_ops=keep_float_ops)
    if precision == "int8":
        if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
            raise InputError("int8 TensorRT engines need the Q/DQ graph of the calibrate stage")
        return model
    if precision == "fp32":
        return model
    raise InputError(f"TensorRT precision {precision!r}: expected fp32, fp16 or int8")


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

    from bert_compiler.core.artifacts import atomic_path

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

    def __init__(self, plan: bytes, options: TensorRTOptions, path: Path):
        import torch

        _import_tensorrt()
        import tensorrt as trt

        self._torch = torch
        self.path = path
        self.options = options
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

    The caller has checked the plan's sha256 against its manifest (pipeline.build.load_engine):
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
