"""Building a TensorRT plan: the ONNX graph parsed into a strongly typed network, one
optimization profile per resolved profile, a timing cache, and a build that a signal cancels
(engines/tensorrt.py is the backend and says why strongly typed).

``tensorrt`` is imported only inside the functions that build, so this module imports on a
machine without it.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import InputError, Interrupted
from bert_compiler.core.targets import current_gpu
from bert_compiler.engines.tensorrt_options import Profile, TensorRTOptions
from bert_compiler.engines.tensorrt_runtime import import_tensorrt, make_logger

log = logging.getLogger("bert_compile")

if TYPE_CHECKING:
    # The TensorRT API as the type check sees it (tensorrt-stubs; pyproject.toml [tool.mypy]). At
    # run time tensorrt is imported only inside the functions that need it, after
    # import_tensorrt() has checked that it imports, as `import tensorrt as trt`: a local name
    # bound by an import keeps the module's types, where one returned by a function would not.
    import tensorrt as trt


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

    import_tensorrt()
    import tensorrt as trt

    capability, gpu = current_gpu("building a TensorRT plan")
    if not options.profiles:
        raise InputError("TensorRT build needs at least one optimization profile")
    logger, trt_errors = make_logger()
    builder = trt.Builder(logger)
    # TensorRT 11 builds every network strongly typed and ignores this flag (still defined there,
    # deprecated); 10.x needs it. The bit comes from the enum, whose value differs between the two.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(network_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"{network_onnx}: TensorRT's ONNX parser refused the graph: {errors}")
    config = _builder_config(builder, options)
    _check_network_inputs(network, input_names, network_onnx)
    _add_profiles(builder, config, options.profiles, input_names)
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
        _save_timing_cache(config, cache_file)
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


def _builder_config(builder: trt.Builder, options: TensorRTOptions) -> trt.IBuilderConfig:
    """A builder configuration with ``options``' optimization level, workspace limit, hardware
    and version compatibility (the profiles and the timing cache are added to it after)."""
    import tensorrt as trt

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
    return config


def _check_network_inputs(
    network: trt.INetworkDefinition, input_names: Sequence[str], network_onnx: Path
) -> None:
    """Raises InputError unless the parsed network's inputs are the model's."""
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(input_names):
        raise InputError(
            f"{network_onnx}: network inputs {sorted(network_inputs)} differ from the model's "
            f"{sorted(input_names)}"
        )


def _add_profiles(
    builder: trt.Builder,
    config: trt.IBuilderConfig,
    profiles: Sequence[Profile],
    input_names: Sequence[str],
) -> None:
    """One optimization profile per entry of ``profiles``, setting every token input's shapes."""
    import tensorrt as trt

    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        # Dims built here rather than by pybind11's implicit tuple conversion, which the stubs lack.
        low, opt, high = (trt.Dims(list(shape)) for shape in profile.shapes())
        for name in input_names:
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)


def _save_timing_cache(config: trt.IBuilderConfig, cache_file: Path) -> None:
    """The timing cache as the build left it, written over ``cache_file``."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_file) as staging:
        staging.write_bytes(memoryview(config.get_timing_cache().serialize()))
