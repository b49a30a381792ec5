"""ONNX Runtime backend: an offline-optimized graph plus the session and provider options to load
it with, on CPU or CUDA (optionally through ORT's TensorRT provider). Loading and running an
engine is engines/ort_session.py's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bert_compiler.core.artifacts import atomic_path
from bert_compiler.core.errors import ArtifactError, EnvironmentProblem, InputError
from bert_compiler.core.onnx_io import load_onnx
from bert_compiler.core.targets import Environment, current_gpu, fp8_refusal
from bert_compiler.engines.backend import (
    Backend,
    BuildJob,
    BuildSpec,
    TargetPlan,
    check_float_source,
    gpu_facts,
    register,
)
from bert_compiler.engines.fp16 import convert_to_fp16, float16_fraction
from bert_compiler.engines.ort_int8 import (
    check_dynamic_scope,
    lower_qdq_matmuls,
    resolve_weight_type,
)
from bert_compiler.engines.ort_session import (
    ATTENTION_KERNELS,
    DEFAULT_ATTENTION_KERNELS,
    PROVIDERS,
    OrtEngineOptions,
    check_packed_attention,
    check_providers,
    load,
    ort_errors,
    provider_entries,
    session_options_for,
)
from bert_compiler.engines.packed_attention import PACKED_OPS, pack_attention, require_packable
from bert_compiler.engines.token_packing import find_feed_forward_regions, pack_feed_forward

ENGINE_FILE = "model.onnx"
# ORT graph optimization levels as Triton's ONNX Runtime backend spells them in
# optimization.graph.level (0, the default, is ORT_ENABLE_ALL).
TRITON_GRAPH_LEVELS = {"all": 0, "extended": 1, "basic": -1, "disable": 2}


@dataclass(frozen=True)
class OnnxRuntimeBuildOptions:
    """The ONNX Runtime backend's own build settings (BuildSpec.options), as the flags of
    cli/backend_flags.py give them; those that do not apply to an engine's device and precision
    are reset by ``OnnxRuntimeBackend.applicable``.

    Attributes:
        intra_op_num_threads: CPU threads; 0 means one per physical core.
        pack_tokens: CPU: run feed-forward blocks on valid tokens only where the graph has them
            (the standard-ops INT8 graph does; the fused fp32 graph's blocks are not matched
            yet).
        cuda_graph: CUDA: capture and replay CUDA graphs per input shape.
        ort_tensorrt_provider: CUDA: put ORT's TensorRT provider first.
        int8_weights: CPU int8: ``s8`` (exact only with VNNI; without it ORT's u8 x s8 kernel
            saturates, to be judged by verify), ``u8`` (exact everywhere, slower without VNNI)
            or ``auto`` (s8 with VNNI, else u8; engines/ort_int8.py).
        attention_kernels: CUDA: which attention kernels the provider may use
            (ATTENTION_KERNELS).
        packed_attention: CUDA: rewrite the fused graph into ORT's packing mode
            (engines/packed_attention.py: attention and the layers around it on the valid tokens
            only); not with ``cuda_graph``. Off by default: slower than CUDA graphs for MiniLM
            and for one row per call (docs/benchmarks.md, "GPU third pass").
        int8_dynamic: CPU int8: which MatMuls quantize their activation per batch at run time
            instead of with the calibrated scale (engines/ort_int8.py DYNAMIC_SCOPES). ``all``
            was chosen on the selection split with `bert-compile calibrate --sweep`
            (docs/benchmarks.md, "CPU INT8 chosen on a selection split").
    """

    intra_op_num_threads: int = 0
    pack_tokens: bool = True
    cuda_graph: bool = False
    ort_tensorrt_provider: bool = False
    int8_weights: str = "auto"
    attention_kernels: str = DEFAULT_ATTENTION_KERNELS
    packed_attention: bool = False
    int8_dynamic: str = "all"


# An INT8 engine with another dynamic scope than the default is named for it.
_DEFAULT_DYNAMIC = OnnxRuntimeBuildOptions.int8_dynamic


def build_engine(source: Path, destination: Path, options: OrtEngineOptions) -> dict[str, Any]:
    """Optimize ``source`` offline with ORT and write the result to ``destination``.

    Returns:
        Facts about the build for the manifest (provider, ORT version).

    Raises:
        InputError: ORT cannot load or optimize the graph.
        EnvironmentProblem: the requested device's provider is not available.
    """
    import onnxruntime as ort

    options.validate()
    # The TensorRT provider compiles at load time, into the engine folder's cache; the graph
    # written here is optimized for the CUDA provider that runs whatever TensorRT does not take.
    entries = provider_entries(replace(options, tensorrt_provider=False, cuda_graph=False), None)
    provider = check_providers(entries)
    session_options = session_options_for(options.offline_level, options.intra_op_num_threads)
    session_options.optimized_model_filepath = str(destination)
    facts: dict[str, Any] = {"provider": provider, "onnxruntime": ort.__version__}
    model: Any = str(source)
    if options.lower_int8 or options.pack_tokens or options.fp16 or options.packed_attention:
        graph = load_onnx(Path(source))
        if options.fp16:
            graph = convert_to_fp16(graph, keep_float_ops=options.keep_float_ops)
            facts["fp16_weight_fraction"] = round(float16_fraction(graph), 6)
        if options.packed_attention:
            # After the fp16 conversion: its float32 head starts at the last LayerNorm's output,
            # where RestorePadding would otherwise sit (and run in float32).
            graph = pack_attention(graph, where=str(source))
            facts["packed_attention_ops"] = {
                op: sum(node.op_type == op for node in graph.graph.node) for op in PACKED_OPS
            }
        if options.lower_int8:
            graph = lower_qdq_matmuls(
                graph, weights=options.int8_weights, dynamic=options.int8_dynamic
            )
            facts["int8_weights"] = options.int8_weights
            facts["int8_dynamic"] = options.int8_dynamic
        if options.pack_tokens:
            facts["packed_regions"] = len(find_feed_forward_regions(graph))
            graph = pack_feed_forward(graph)
        model = graph.SerializeToString()
    try:
        ort.InferenceSession(
            model,
            session_options,
            providers=[name for name, _ in entries],
            provider_options=[opts for _, opts in entries],
        )
    except ort_errors() as err:
        raise InputError(f"{source}: ONNX Runtime cannot build an engine from it ({err})") from err
    if not Path(destination).is_file():
        raise InputError(f"{source}: ONNX Runtime wrote no optimized model")
    return facts


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU or CUDA: the fused graph (fp32, fp16) or the lowered Q/DQ graph
    (int8, CPU only), optimized offline and loaded with the recorded session options."""

    name = "onnxruntime"
    tag = "ort"
    file_suffix = ".onnx"
    triton_platform = "onnxruntime_onnx"
    version_key = "onnxruntime"
    options_type = OnnxRuntimeBuildOptions
    label = "ONNX Runtime CUDA"
    targets = ("cpu", "cuda")
    auto_gpu_rank = 1
    auto_cpu_fallback = True
    cpu_label = "CPU ONNX Runtime engine"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def check(self, spec: BuildSpec) -> None:
        options: OnnxRuntimeBuildOptions = spec.options
        resolve_weight_type(options.int8_weights)
        if options.attention_kernels not in ATTENTION_KERNELS:
            raise InputError(
                f"--attention-kernels {options.attention_kernels!r}: expected one of "
                f"{', '.join(ATTENTION_KERNELS)}"
            )
        check_dynamic_scope(options.int8_dynamic)
        check_packed_attention(
            packed_attention=options.packed_attention, cuda_graph=options.cuda_graph
        )
        if options.packed_attention and spec.device != "cuda":
            raise InputError(
                f"--packed-attention: only ONNX Runtime CUDA engines take it, not {self.name} "
                f"on {spec.device}; build with --target cuda, or without --packed-attention"
            )
        if spec.device == "cuda" and spec.precision == "int8":
            raise InputError(
                "ONNX Runtime's CUDA provider has no fast path for Q/DQ INT8 graphs; build int8 "
                "with --target tensorrt, or fp16 for ONNX Runtime CUDA"
            )

    def gpu_problem(self, env: Environment) -> str:
        if env.has_ort_cuda:
            return ""
        return (
            f"ONNX Runtime {env.onnxruntime} has no CUDAExecutionProvider (install onnxruntime-gpu)"
        )

    def plan(self, target: str, precisions: tuple[str, ...], env: Environment) -> TargetPlan:
        if "fp8" in precisions:
            raise InputError(fp8_refusal(f"--target {target}"))
        if target == "cpu":
            if "fp16" in precisions:
                raise InputError("--target cpu --precision fp16: the CPU engine is fp32 or int8")
            return self.plan_cpu(precisions)
        return self.plan_gpus(target, precisions, env, "the CPU engine")

    def plan_cpu(self, precisions: tuple[str, ...]) -> TargetPlan:
        # fp16 has no CPU engine: it becomes fp32, and says so.
        chosen = dict.fromkeys("fp32" if p == "fp16" else p for p in precisions or ("fp32",))
        engines = tuple(
            {"backend": self.name, "device": "cpu", "precision": p, "compute_capability": ""}
            for p in chosen
        )
        fp16 = "fp16" in precisions
        return TargetPlan(engines, ("fp16 has no CPU engine: built fp32 instead",) if fp16 else ())

    def applicable(self, spec: BuildSpec) -> BuildSpec:
        # CUDA graphs, ORT's TensorRT provider, the attention kernels and packing mode exist
        # only on the CUDA provider; the INT8 weight type and dynamic scope only on the CPU
        # int8 engine.
        options: OnnxRuntimeBuildOptions = spec.options
        defaults = OnnxRuntimeBuildOptions()
        if spec.device != "cpu" or spec.precision != "int8":
            options = replace(
                options, int8_weights=defaults.int8_weights, int8_dynamic=defaults.int8_dynamic
            )
        if spec.device != "cuda":
            options = replace(
                options,
                cuda_graph=defaults.cuda_graph,
                ort_tensorrt_provider=defaults.ort_tensorrt_provider,
                attention_kernels=defaults.attention_kernels,
                packed_attention=defaults.packed_attention,
            )
        return replace(spec, options=options)

    @staticmethod
    def _attention_variant(spec: BuildSpec) -> str:
        # The build's default kernels keep the plain name; the other choice names its engine.
        kernels = spec.options.attention_kernels
        named = spec.device == "cuda" and kernels != DEFAULT_ATTENTION_KERNELS
        return f"attn-{kernels}" if named else ""

    def source_stage(self, spec: BuildSpec) -> str:
        return "calibrate" if spec.precision == "int8" else "fuse"

    def folder_parts(self, spec: BuildSpec) -> list[str]:
        if spec.device == "cuda":
            return [spec.device, "sm" + spec.compute_capability.replace(".", "")]
        return [spec.device]

    def variants(self, spec: BuildSpec) -> list[str]:
        # An explicit INT8 weight type names its engine, so that s8 and u8 engines of one model
        # can be built, verified and benchmarked side by side; ``auto`` keeps the plain name.
        options: OnnxRuntimeBuildOptions = spec.options
        return [
            name
            for name, on in (
                ("cudagraph", options.cuda_graph),
                ("trtep", options.ort_tensorrt_provider),
                (options.int8_weights, options.int8_weights != "auto"),
                (self._attention_variant(spec), bool(self._attention_variant(spec))),
                ("packed-attention", options.packed_attention),
                (f"dynamic-{options.int8_dynamic}", options.int8_dynamic != _DEFAULT_DYNAMIC),
            )
            if on
        ]

    @staticmethod
    def session_options(spec: BuildSpec) -> OrtEngineOptions:
        """The engine's session options a build spec asks for."""
        build: OnnxRuntimeBuildOptions = spec.options
        int8 = spec.precision == "int8"
        return OrtEngineOptions(
            device=spec.device,
            intra_op_num_threads=build.intra_op_num_threads,
            lower_int8=int8,
            # Part of the build record: an engine built on a VNNI CPU differs from one without.
            int8_weights=resolve_weight_type(build.int8_weights) if int8 else "s8",
            int8_dynamic=build.int8_dynamic if int8 else "none",
            pack_tokens=build.pack_tokens and spec.device == "cpu",
            fp16=spec.precision == "fp16",
            keep_float_ops=spec.keep_float_ops,
            cuda_graph=build.cuda_graph,
            tensorrt_provider=build.ort_tensorrt_provider,
            attention_kernels=build.attention_kernels
            if spec.device == "cuda"
            else DEFAULT_ATTENTION_KERNELS,
            packed_attention=build.packed_attention and spec.device == "cuda",
        )

    def build_job(self, source: Path, spec: BuildSpec, *, input_names: tuple[str, ...]) -> BuildJob:
        options = self.session_options(spec)

        def prepare() -> None:
            # ORT would follow the graph's external-data paths itself: check containment first.
            graph = load_onnx(source)
            check_float_source(graph, precision=spec.precision, where=str(source))
            if options.packed_attention:
                require_packable(graph, where=str(source))

        def body(folder: Path) -> tuple[list[str], dict[str, Any]]:
            facts = gpu_facts(spec)
            with atomic_path(folder / ENGINE_FILE) as staging:
                facts.update(build_engine(source, staging, options))
            # Prove the engine loads with the options recorded for it before calling it complete.
            engine = load(folder / ENGINE_FILE, options)
            return [ENGINE_FILE], {
                **facts,
                "engine_file": ENGINE_FILE,
                "inputs": engine.input_names,
                "outputs": engine.output_names,
            }

        settings = {
            "session": options.to_dict(),
            # Relative cache path: the record must not change when the output tree moves.
            "providers": provider_entries(options, Path(".")),
        }
        if spec.options.int8_weights != "auto":
            # What was asked for (it names the engine); the session records what it resolved to.
            settings["int8_weights"] = spec.options.int8_weights
        return BuildJob(settings=settings, prepare=prepare, body=body)

    def load(self, engine_path: Path, spec: Mapping[str, Any], results: Mapping[str, Any]):
        options = OrtEngineOptions.from_dict(spec.get("session", {}))
        if options.device == "cuda":
            # An ORT CUDA engine is optimized offline for one GPU: refuse it on another.
            capability, _ = current_gpu(f"{engine_path}: this CUDA engine")
            if results.get("compute_capability") != capability:
                raise EnvironmentProblem(
                    f"{engine_path}: built for compute capability "
                    f"{results.get('compute_capability')}, this GPU is {capability}; build an "
                    "engine for it (--target auto)"
                )
        return load(engine_path, options)

    def from_record(self, spec: Mapping[str, Any]) -> BuildSpec:
        session = OrtEngineOptions.from_dict(spec.get("session", {}))
        return BuildSpec(
            backend=self.name,
            device=spec["device"],
            precision=spec["precision"],
            compute_capability=spec.get("compute_capability", ""),
            keep_float_ops=session.keep_float_ops,
            options=OnnxRuntimeBuildOptions(
                intra_op_num_threads=session.intra_op_num_threads,
                pack_tokens=session.pack_tokens,
                cuda_graph=session.cuda_graph,
                ort_tensorrt_provider=session.tensorrt_provider,
                int8_weights=spec.get("int8_weights", "auto"),
                attention_kernels=session.attention_kernels,
                packed_attention=session.packed_attention,
                int8_dynamic=session.int8_dynamic
                if spec["precision"] == "int8"
                else _DEFAULT_DYNAMIC,
            ),
        )

    def kind_parts(self, spec: BuildSpec) -> list[str]:
        return [spec.device]

    def python_session_problem(self, spec: Mapping[str, Any]) -> str:
        session = spec.get("session", {})
        if session.get("cuda_graph"):
            return (
                "a CUDA-graph engine replays runs of fixed shapes through bound buffers, and a "
                "text model's runs vary in shape; package an engine built without --cuda-graph"
            )
        if session.get("tensorrt_provider"):
            return "it runs through ORT's TensorRT provider, which Triton's Python lacks"
        return ""

    def triton_parameters(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        session = spec.get("session", {})
        gpu = spec["device"] == "cuda"
        return {
            "graph_level": TRITON_GRAPH_LEVELS[session.get("runtime_level", "all")],
            "parameters": session_parameters(session),
            # fp32 CUDA engines were verified without TF32; ORT's CUDA provider enables it.
            "gpu_accelerator": {"use_tf32": "0"} if gpu and spec["precision"] == "fp32" else None,
        }


def recorded_cuda_options(spec: Mapping[str, Any]) -> dict[str, str]:
    """The CUDA provider options a recorded CUDA engine's build ran it with, but its device id
    (a server runs each copy on the GPU it is given).

    Raises:
        ArtifactError: the record names no CUDA provider (not a CUDA engine).
    """
    for name, options in spec.get("providers", []):
        if name == PROVIDERS["cuda"]:
            return {k: str(v) for k, v in options.items() if k != "device_id"}
    names = [entry[0] for entry in spec.get("providers", [])]
    raise ArtifactError(f"the build record has no {PROVIDERS['cuda']} (providers: {names})")


def session_parameters(session: Mapping[str, Any], python: bool = False) -> dict[str, str]:
    """Triton parameters that load a recorded ORT engine as its build recorded: the thread count,
    and (for the Python backend, which creates its own session) the graph optimization level."""
    parameters = {}
    if session.get("intra_op_num_threads"):
        parameters["intra_op_thread_count"] = str(session["intra_op_num_threads"])
    if python:
        parameters["graph_optimization_level"] = session.get("runtime_level", "all")
    return parameters


BACKEND = register(OnnxRuntimeBackend())
