"""What every engine backend is, and the one registry of them.

Each engine module (engines/onnxruntime.py, engines/tensorrt.py) defines one ``Backend`` object and
registers it here; importing ``bert_compiler.engines`` registers them all. Everything that differs
by backend (the graph it builds from, its folder and Triton names, its build record, how it loads,
which of its files Triton serves) is a method of that object, so no other module tests a backend's
name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bert_compiler.core.artifacts import ArtifactDir
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.targets import (
    DEVICES,
    PRECISIONS,
    Environment,
    Gpu,
    current_gpu,
    fp8_capable,
    fp8_refusal,
)
from bert_compiler.engines.tensorrt_options import Profile


class Engine(Protocol):
    """What ``Backend.load`` returns, whatever the backend.

    Attributes:
        path: the engine file.
        device: ``cpu`` or ``cuda``; a ``cuda`` engine also has ``run_device``, which takes and
            returns torch CUDA tensors [batch, sequence] without host copies.
        max_batch: the largest batch it accepts (None: any).
        packed_rows: it has ``run_packed(ids, type_ids, lengths, longest)``
            (engines/torch_module.py), taking rows packed back to back instead of padded; the
            runtime feeds it that way.
        concurrent_runs: it has ``with_threads(n)`` (engines/ort_session.py), a session of
            ``n`` threads that takes concurrent runs, and its build left the thread count to the
            runtime; the runtime runs several batches at once on a CPU engine that has this.
    """

    path: Path
    device: str
    max_batch: int | None
    input_names: list[str]
    output_names: list[str]
    packed_rows: bool
    concurrent_runs: bool

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One batch of int64 numpy feeds [batch, sequence] -> float32 numpy outputs."""
        ...


def quantized_types(model: Any) -> set[str]:
    """The TensorProto type names (``INT8``, ``FLOAT8E4M3FN``) the graph's QuantizeLinear nodes
    quantize to: their zero points' types."""
    from onnx import TensorProto

    types = {init.name: init.data_type for init in model.graph.initializer}
    return {
        TensorProto.DataType.Name(types[node.input[2]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in types
    }


def check_float_source(model: Any, *, precision: str, where: str) -> None:
    """A float engine (fp32, fp16) builds from a float graph, and an int8 engine from no fp8
    Q/DQ graph: a calibrated graph given with ``--input`` would otherwise run quantized under a
    float engine's name, or fail deep in the backend.

    Raises:
        InputError: Q/DQ nodes of a type the precision does not take.
    """
    types = quantized_types(model)
    if precision in ("fp32", "fp16") and types:
        raise InputError(
            f"{where}: holds {', '.join(sorted(types))} Q/DQ nodes (a calibrated graph); a "
            f"{precision} engine builds from the float graph (OUT/fuse or OUT/simplify), or "
            "build this one with the --precision it was calibrated for"
        )
    if precision == "int8" and types - {"INT8"}:
        raise InputError(
            f"{where}: holds {', '.join(sorted(types - {'INT8'}))} Q/DQ nodes (calibrate "
            "--format fp8); an int8 engine builds from the INT8 graph of OUT/calibrate"
        )


@dataclass(frozen=True)
class BuildSpec:
    """Settings of the build stage: one engine for one target.

    Attributes:
        backend: a registered backend's name (``onnxruntime``, ``tensorrt``, ``torch``).
        device: ``cpu`` or ``cuda`` (TensorRT is always ``cuda``).
        precision: ``fp32``; ``fp16`` (GPU only); ``int8`` from the calibrated Q/DQ graph;
            ``fp8`` (backends with ``builds_fp8`` only: TensorRT) from the fp8 Q/DQ graph.
        compute_capability: the target GPU's (``"9.0"``) for GPU engines; detected when empty.
        keep_float_ops: fp16: op types kept in float32 beyond the defaults (engines/fp16.py).
        options: the backend's own settings, an instance of its ``Backend.options_type``
            (engines/onnxruntime.py OnnxRuntimeBuildOptions, engines/tensorrt_options.py
            TensorRTOptions); None means the backend's defaults.
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    compute_capability: str = ""
    keep_float_ops: tuple[str, ...] = ()
    options: Any = None

    def __post_init__(self) -> None:
        if self.options is None and self.backend in _REGISTRY:
            object.__setattr__(self, "options", _REGISTRY[self.backend].options_type())

    def validate(self) -> None:
        """Raises InputError for a combination no backend builds."""
        backend = get_backend(self.backend)
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: supported: {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device!r}: supported: {', '.join(DEVICES)}")
        if self.device == "cpu" and self.precision == "fp16":
            raise InputError("--precision fp16 needs a GPU target; the CPU engine is fp32 or int8")
        if self.precision == "fp8" and not backend.builds_fp8:
            raise InputError(fp8_refusal(f"--backend {self.backend} --device {self.device}"))
        if not isinstance(self.options, backend.options_type):
            raise TypeError(
                f"{self.backend} build options must be {backend.options_type.__name__}, "
                f"not {type(self.options).__name__}"
            )
        backend.check(self)

    @property
    def source_stage(self) -> str:
        """The stage folder whose model.onnx this engine builds from."""
        return get_backend(self.backend).source_stage(self)


@dataclass(frozen=True)
class NoOptions:
    """The options of a backend that has none of its own."""


@dataclass(frozen=True)
class BuildJob:
    """A backend's build of one engine, as the build stage runs it.

    Attributes:
        settings: the backend's own settings for the build record (they decide the output).
        prepare: loads and checks the source graph before the previous engine is touched.
        body: writes the engine into the folder it is given; returns (output file names,
            results for the manifest).
    """

    settings: Mapping[str, Any]
    prepare: Callable[[], None]
    body: Callable[[Path], tuple[list[str], dict[str, Any]]]


@dataclass(frozen=True)
class TargetPlan:
    """The engines one ``--target`` resolves to on this machine, and why (engines/targets.py)."""

    engines: tuple[dict[str, Any], ...]  # backend, device, precision, compute_capability
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TritonBatching:
    """How Triton batches an engine model: its largest batch, the preferred batch sizes, the
    optimization profiles each instance may use, and the sequence lengths worth warming up."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    profiles: tuple[str, ...] = ()
    warmup_lengths: tuple[int, ...] = ()


class Backend:
    """One inference backend: how it builds, names, loads and serves its engines.

    Subclasses set the class attributes and implement the methods that raise
    NotImplementedError; the defaults fit a backend with no options of its own.

    Attributes:
        name: the name in BuildSpec.backend and in every manifest.
        tag: the short prefix of engine folders and Triton model names (``ort``, ``trt``).
        file_suffix: the engine file's suffix (``.onnx``, ``.plan``).
        triton_platform: the Triton ``platform`` that serves the engine file.
        version_key: the key of a build manifest's results that holds the backend version.
        opaque: the engine file cannot be read without the backend (a TensorRT plan): its
            tensors are those of the graph it was built from, recorded beside it.
        builds_fp8: the backend builds ``--precision fp8`` engines (TensorRT: fp8 GEMMs from
            the fp8 Q/DQ graph); BuildSpec.validate refuses fp8 for the others.
        quantizes_from_qdq: its quantized engines build from a calibrated Q/DQ graph (run
            calibrates it, through the INT8 precision fallback); False: the backend quantizes
            the float graph's weights itself at build (the torch engine's int8).
        serves_as_python_text: package serves its engines in a Python-backend text model whose
            model.py runs the engine itself (the torch backend: no Triton backend runs it), not
            on a backend of Triton's own (onnxruntime, tensorrt).
        options_type: the frozen dataclass of the backend's own build options (BuildSpec.options);
            its defaults are the backend's defaults, and the CLI's option group for the backend
            (cli/backend_flags.py) builds it from the flags.
        label: its name in messages (``TensorRT``, ``ONNX Runtime CUDA``).
        targets: the ``--target`` values that build its engines alone (``plan``).
        auto_gpu_rank: where ``--target auto`` plans its GPU engines among the GPU backends
            (lowest first); None: ``auto`` builds none of its engines on GPUs.
        auto_cpu_fallback: the backend whose CPU engine ``--target auto`` builds when no GPU
            backend can build here (``plan_cpu``); ``cpu_label`` names that engine.
    """

    name: str
    tag: str
    file_suffix: str
    triton_platform: str
    version_key: str
    opaque: bool = False
    builds_fp8: bool = False
    quantizes_from_qdq: bool = True
    serves_as_python_text: bool = False
    options_type: type = NoOptions
    label: str = ""
    targets: tuple[str, ...] = ()
    auto_gpu_rank: int | None = None
    auto_cpu_fallback: bool = False
    cpu_label: str = ""

    def version(self) -> str:
        """The installed version (it goes into engine folder names and manifests).

        Raises:
            EnvironmentProblem: the backend's package is missing.
        """
        raise NotImplementedError

    def check(self, spec: BuildSpec) -> None:
        """Raises InputError for a device, precision or option this backend does not build."""

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        """The engines ``--target <target>`` (one of ``targets``) builds on this machine.

        Raises:
            InputError: a precision this backend does not build there.
            EnvironmentProblem: this machine cannot build them (no GPU, no package).
        """
        raise NotImplementedError

    def gpu_problem(self, env: Environment) -> str:
        """Why this machine cannot build the backend's GPU engines ('' when it can)."""
        return f"{self.name} builds no GPU engines"

    def plan_cpu(self, precisions: tuple[str, ...]) -> TargetPlan:
        """Its CPU engines for ``precisions`` (``auto_cpu_fallback`` backends)."""
        raise NotImplementedError

    def plan_gpus(
        self, target: str, precisions: tuple[str, ...], env: Environment, fallback: str
    ) -> TargetPlan:
        """``--target <target>`` for this backend's GPU engines: one per GPU here, or refused in
        one line naming what is missing and ``fallback``, what ``--target auto`` would build.

        Raises:
            EnvironmentProblem: no GPU, or ``gpu_problem`` says why not.
        """
        gpus = env.compute_capabilities()
        problem = self.gpu_problem(env) if gpus else "no NVIDIA GPU found"
        if problem:
            raise EnvironmentProblem(
                f"--target {target}: {problem}; use --target auto to fall back to {fallback}"
            )
        return TargetPlan(self.gpu_engines(precisions, gpus))

    def gpu_engines(self, precisions: tuple[str, ...], gpus: Sequence[Gpu]) -> tuple[dict, ...]:
        """One engine per GPU (one per distinct compute capability) and precision, fp16 by
        default; fp8 only where the backend builds it and the GPU has fp8 tensor cores."""
        return tuple(
            {
                "backend": self.name,
                "device": "cuda",
                "precision": precision,
                "compute_capability": gpu.compute_capability,
            }
            for gpu in gpus
            for precision in precisions or ("fp16",)
            if precision != "fp8" or (self.builds_fp8 and fp8_capable(gpu.compute_capability))
        )

    def applicable(self, spec: BuildSpec) -> BuildSpec:
        """``spec`` without the options that do not apply on its device and precision (one set
        of command-line flags feeds every engine of a run: --cuda-graph and the CPU engine)."""
        return spec

    def source_stage(self, spec: BuildSpec) -> str:
        """The stage folder whose graph this engine builds from."""
        raise NotImplementedError

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        """The device/GPU part of the engine folder name (``cpu``, ``cuda-sm90``, ``sm90``)."""
        raise NotImplementedError

    def variants(self, spec: BuildSpec) -> list[str]:
        """Suffixes naming build variants (``cudagraph``, ``vc``) after the precision: in engine
        folder names and Triton model names alike."""
        return []

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        """The BuildSpec a build manifest's ``spec`` records (what names and loads the engine)."""
        raise NotImplementedError

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        """The part of a Triton model name before the precision: the device or the hardware
        compatibility, never the GPU (engines for several GPUs of one kind share a model)."""
        return []

    def complete(
        self,
        spec: BuildSpec,
        *,
        derive_profiles: Callable[[], tuple[Profile, ...]],
        timing_cache: Callable[[str, str], Path],
    ) -> BuildSpec:
        """Fill in what a build learns from the data and the output tree (profiles derived from
        the calibration sentences, the shared timing cache); most backends need nothing."""
        return spec

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        """How the build stage builds ``spec`` from the graph at ``source``."""
        raise NotImplementedError

    def load(
        self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]
    ) -> Engine:
        """Load an engine file with the settings its build manifest recorded.

        The caller has checked the file's sha256 against a manifest this tool wrote.

        Raises:
            EnvironmentProblem: the engine was built for another GPU or backend version, or needs
                a device or package this machine lacks.
        """
        raise NotImplementedError

    def triton_kind(self, spec: Mapping[str, Any]) -> str:
        """The Triton model suffix of a recorded engine: backend, device, precision, variants;
        never the GPU, so engines for several GPUs of one kind share a model."""
        build = self.from_record(spec)
        parts = [self.tag, *self.kind_parts(build), build.precision, *self.variants(build)]
        return "-".join(parts)

    def portable(self, spec: Mapping[str, Any]) -> bool:
        """True when one engine file runs on every GPU of its kind (the model's default file)."""
        return False

    def python_session_problem(self, spec: Mapping[str, Any]) -> str:
        """Why a recorded engine cannot run in an ONNX Runtime session inside Triton's Python
        backend (triton/onnxruntime_model.py), or '' when it can."""
        return f"{self.name} engines do not run in an ONNX Runtime session"

    def shared_settings(self, spec: Mapping[str, Any]) -> Any:
        """Recorded settings every engine of one Triton model must share (they set its config)."""
        return None

    def io_graph(self, folder: Path, results: Mapping[str, Any]) -> str:
        """The output name (in the engine folder) of the ONNX graph whose tensors Triton sees."""
        return str(results["engine_file"])

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
        """Triton's batching for a recorded engine whose requests come padded to the rungs of
        ``ladder`` (empty: to any length up to ``max_length``).

        By default the preferred batch sizes are, per rung, the rows that fill ``token_budget``
        padded positions (a power of two, at most ``max_batch_size``): the batch the runtime
        forms at that length. Triton's dynamic batcher joins only requests of one shape for
        these backends, so requests of one rung batch together.

        Raises:
            InputError: the engine cannot take every batch and length Triton will send.
        """
        return TritonBatching(
            max_batch_size,
            preferred_batch_sizes=budget_batch_sizes(ladder, token_budget, max_batch_size),
            warmup_lengths=(min(max_length, 128),),
        )

    def triton_parameters(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Backend-specific parts of the Triton engine config (tc.EngineModel fields)."""
        return {}


def budget_batch_sizes(
    ladder: Sequence[int], token_budget: int, max_batch_size: int
) -> tuple[int, ...]:
    """Per rung of ``ladder``, the largest power-of-two row count whose padded positions stay
    within ``token_budget`` (at least 1, at most ``max_batch_size``); empty without a ladder or
    a budget."""
    if not ladder or token_budget < 1:
        return ()
    sizes = set()
    for length in ladder:
        rows = max(1, min(max_batch_size, token_budget // length))
        sizes.add(1 << (rows.bit_length() - 1))
    return tuple(sorted(sizes))


def gpu_facts(spec: BuildSpec) -> dict[str, Any]:
    """The GPU a CUDA engine is built on, refusing a build for another compute capability."""
    if spec.device != "cuda":
        return {}
    built_for, gpu = current_gpu("building a GPU engine")
    if spec.compute_capability and spec.compute_capability != built_for:
        raise InputError(
            f"asked to build for compute capability {spec.compute_capability} on a "
            f"{gpu} ({built_for}); build on that GPU"
        )
    return {"compute_capability": built_for, "gpu": gpu}


_REGISTRY: dict[str, Backend] = {}


def backends() -> tuple[Backend, ...]:
    """Every registered backend, in registration order (engines/__init__.py)."""
    return tuple(_REGISTRY.values())


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (each engine module registers its one object)."""
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``.

    Raises:
        InputError: no such backend.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"--backend {name!r}: supported: {', '.join(sorted(_REGISTRY))}") from None


def engine_name(spec: BuildSpec, version: str) -> str:
    """Folder name of an engine: backend and version, device or GPU, precision, variants.

    ``ort1.32.0-cpu-fp32``, ``ort1.31.1-cuda-sm90-fp16-cudagraph``, ``trt10.13.3-sm90-fp16``,
    ``trt10.13.3-ampere_plus-int8-vc``.
    """
    backend = get_backend(spec.backend)
    parts = [f"{backend.tag}{version}", *backend.folder_parts(spec), spec.precision]
    return "-".join(parts + backend.variants(spec))


def load_recorded_engine(engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]):
    """Load an engine file with the settings its build manifest recorded (``spec``, ``results``).

    The caller has checked the file's sha256 against a manifest this tool wrote (an engine
    folder's, or a Triton repository's that copied it).

    Raises:
        ArtifactError: the manifest names no registered backend.
        EnvironmentProblem: the engine was built for another GPU or backend version, or needs a
            device or package this machine lacks.
    """
    if spec.get("backend") not in _REGISTRY:
        raise ArtifactError(f"{engine_path}: recorded backend {spec.get('backend')!r} is unknown")
    return _REGISTRY[spec["backend"]].load(engine_path, spec, results)


def load_engine(engine_dir: Path):
    """Load an engine folder after checking every file against its manifest and, for TensorRT,
    that the plan fits this GPU and TensorRT version.

    Returns:
        (the loaded engine, its build manifest).

    Raises:
        ArtifactError: no complete manifest, or a file's sha256 differs from it.
        EnvironmentProblem: the engine was built for another GPU or backend version.
    """
    folder = ArtifactDir(Path(engine_dir))
    manifest = folder.require_complete()
    spec = manifest.get("spec", {})
    results = manifest.get("results", {})
    if manifest.get("stage") != "build" or spec.get("backend") not in _REGISTRY:
        raise ArtifactError(f"{engine_dir}: not an engine folder this tool built")
    engine_path = folder.output_path(results["engine_file"])
    return load_recorded_engine(engine_path, spec, results), manifest
